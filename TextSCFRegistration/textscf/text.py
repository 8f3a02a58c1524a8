"""Text branch of textSCF: prompt templates, text encoders, background vector, embedding cache.

Each region name is put into a template ("A computerized tomography of a {} in human abdomen.") and encoded with
CLIP's text encoder (open_clip). The ``M = N - 1`` raw (not normalised) region embeddings ``E (M, C1)`` are completed
by a background vector, the unit direction orthogonal to their span, giving the text matrix

    B = [background; E]  with shape (N, C1),   row 0 = background, rows 1..N-1 = regions in prompt order.

The model stores the B it was trained with; this module builds it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from textscf.errors import CheckpointError, PromptError
from textscf.files import replace_atomically

__all__ = [
    "TEMPLATES",
    "RESERVED_BACKGROUND_NAME",
    "resolve_template",
    "validate_region_names",
    "format_prompts",
    "TextEncoder",
    "OpenCLIPTextEncoder",
    "OneHotTextEncoder",
    "parse_encoder_spec",
    "canonical_encoder_name",
    "make_text_encoder",
    "background_vector",
    "build_text_matrix",
    "default_cache_directory",
    "EmbeddingCache",
]

TEMPLATES: dict[str, str] = {
    "photo": "A photo of a {}.",
    "photo-abdomen": "A photo of a {} in human abdomen.",
    "ct-abdomen": "A computerized tomography of a {} in human abdomen.",
    "mri-brain": "A magnetic resonance imaging of a {} in human brain.",
}

RESERVED_BACKGROUND_NAME = "background"

ONEHOT_SPEC = "onehot"
OPEN_CLIP_PREFIX = "open_clip"
_NO_WEIGHTS = "none"


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------


def resolve_template(name_or_string: str) -> str:
    """Return the template string for a key of ``TEMPLATES`` or a user template containing exactly one ``{}``."""
    if not isinstance(name_or_string, str) or not name_or_string.strip():
        raise PromptError(
            f"prompt template {name_or_string!r} is empty or not a string; "
            f"give one of {sorted(TEMPLATES)} or a sentence with exactly one '{{}}' where the region name goes"
        )
    key = name_or_string.strip().lower()
    if key in TEMPLATES:
        return TEMPLATES[key]
    count = name_or_string.count("{}")
    if count != 1:
        raise PromptError(
            f"prompt template {name_or_string!r} contains {count} '{{}}' placeholders and is not a known template "
            f"name; give one of {sorted(TEMPLATES)} or a sentence with exactly one '{{}}', "
            f"e.g. 'A computerized tomography of a {{}} in human abdomen.'"
        )
    return name_or_string


def validate_region_names(names: Sequence[str]) -> list[str]:
    """Check an ordered list of region names (background excluded) and return them stripped of outer whitespace.

    Raises ``PromptError`` for an empty list, a blank name, duplicates (compared stripped and case-insensitively) or
    the reserved name "background" (region index 0 is always the background and is added automatically).
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise PromptError(
            f"region names must be a list of strings, got {type(names).__name__} {names!r}; "
            f"pass e.g. ['liver', 'spleen']"
        )
    if len(names) == 0:
        raise PromptError("the list of region names is empty; give at least one region name, e.g. ['liver']")
    cleaned: list[str] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise PromptError(
                f"region name #{i + 1} ({name!r}) is empty or not a string; give a non-blank name for every region"
            )
        stripped = name.strip()
        folded = stripped.casefold()
        if folded == RESERVED_BACKGROUND_NAME:
            raise PromptError(
                f"region name #{i + 1} is {name!r}, which is reserved: region index 0 is always the background and "
                f"is added automatically; remove it from the list of region names"
            )
        if folded in seen:
            raise PromptError(
                f"region name {name!r} (#{i + 1}) duplicates #{seen[folded] + 1} ({names[seen[folded]]!r}; names are "
                f"compared ignoring case and outer spaces); give every region once"
            )
        seen[folded] = i
        cleaned.append(stripped)
    return cleaned


def format_prompts(names: Sequence[str], template: str) -> list[str]:
    """Put each region name into the template (a ``TEMPLATES`` key or a string with one ``{}``).

    Returns one prompt per name, in order (``M = len(names)`` strings; the background has no prompt).
    """
    cleaned = validate_region_names(names)
    resolved = resolve_template(template)
    # str.replace, not str.format: other braces in a user template stay literal.
    return [resolved.replace("{}", name) for name in cleaned]


# --------------------------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class TextEncoder(Protocol):
    """What the text branch needs from an encoder.

    ``name`` identifies encoder and weights (e.g. "open_clip:ViT-L-14-336:openai", "onehot") and keys the cache.
    ``embed_dim`` is C1, or None when it depends on the number of prompts (one-hot).
    ``encode(prompts)`` returns a float32 CPU tensor ``(M, C1)`` for ``M = len(prompts)``, computed without grad.
    """

    name: str

    @property
    def embed_dim(self) -> Optional[int]: ...

    def encode(self, prompts: list[str]) -> torch.Tensor: ...


def _check_model_name(model_name: str) -> None:
    import open_clip

    if not isinstance(model_name, str) or model_name not in open_clip.list_models():
        raise CheckpointError(
            f"open_clip has no model architecture named {model_name!r}; use one of open_clip.list_models(), "
            f"e.g. 'ViT-L-14-336' (the paper's encoder) or 'RN50x64'"
        )


def _resolve_pretrained(model_name: str, pretrained: Optional[str]) -> tuple[str, Optional[str], dict]:
    """Classify ``pretrained`` for ``model_name``: returns (kind, value, tag_cfg) with kind "none" | "tag" | "file".

    For a tag, value is open_clip's spelling of the tag; for a file, the absolute path. Nothing is loaded.
    """
    import open_clip

    if pretrained is None or (isinstance(pretrained, str) and pretrained.strip().lower() in ("", _NO_WEIGHTS)):
        return "none", None, {}
    if not isinstance(pretrained, (str, os.PathLike)):
        raise CheckpointError(
            f"pretrained must be an open_clip tag, a file path or None, got {type(pretrained).__name__}"
        )
    text = os.fspath(pretrained)
    cfg = open_clip.get_pretrained_cfg(model_name, text)
    if cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        spelled = next((t for t in tags if open_clip.get_pretrained_cfg(model_name, t) is cfg), text)
        return "tag", spelled, cfg
    path = Path(text).expanduser()
    if path.is_file():
        return "file", str(path.resolve()), {}
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise CheckpointError(
        f"text encoder weights {text!r} are neither a pretrained tag of open_clip model {model_name!r} "
        f"(known tags: {tags}) nor an existing file; give a known tag (the paper uses 'openai' with 'ViT-L-14-336') "
        f"or the path of a local open_clip checkpoint (.pt/.bin/.safetensors state dict)"
    )


def _weights_hint(model_name: str, tag_cfg: dict) -> str:
    # open_clip's hf_hub entries are "org/repo/" or "org/repo/filename".
    repo, _ = os.path.split(tag_cfg.get("hf_hub", ""))
    where = f"https://huggingface.co/{repo}" if repo else "the open_clip model hub"
    # A file carries no activation setting: OpenAI's weights need the "-quickgelu" architecture.
    qg = model_name
    if tag_cfg.get("quick_gelu") and not model_name.endswith("-quickgelu"):
        qg = f"{model_name}-quickgelu"
    return (
        f"run once with internet access so open_clip caches the weights (Hugging Face cache, or cache_dir; set "
        f"HF_HUB_OFFLINE=1 to fail fast when offline), or "
        f"download open_clip_model.safetensors / open_clip_pytorch_model.bin from {where} on another machine and pass "
        f"its path as the weights, e.g. 'open_clip:{qg}:/path/to/open_clip_pytorch_model.bin'"
    )


def _cached_tag_weights(tag_cfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    """Path of the tag's weights if already in the Hugging Face cache, found without any network access.

    open_clip's own lookup asks the hub first, which offline costs tens of seconds of retries even when cached.
    """
    if tag_cfg.get("file"):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    except ImportError:
        return None
    repo, filename = os.path.split(hub)
    if not filename:
        candidates = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    elif filename.endswith((".bin", ".pth")):
        candidates = [filename[:-4] + ".safetensors", filename]
    else:
        candidates = [filename]
    for candidate in candidates:
        found = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


class OpenCLIPTextEncoder:
    """CLIP text encoder from open_clip; returns raw ``encode_text`` outputs (not normalised).

    Args:
        model_name: open_clip architecture, e.g. "ViT-L-14-336" (paper) or "RN50x64".
        pretrained: an open_clip tag (e.g. "openai"; downloaded on first use and cached by open_clip / the Hugging
            Face cache), the path of a local checkpoint file (a state dict open_clip accepts), or None for random
            initialisation (tests only: random weights are not reproducible across runs).
        device: torch device the model runs on; outputs always come back on the CPU.
        cache_dir: download cache for tags (None = open_clip's default).
        quick_gelu: None = automatic: a tag uses the activation its weights were trained with (OpenAI's weights use
            QuickGELU); a file or None uses the architecture's config (name a "-quickgelu" architecture for a local
            copy of OpenAI's weights). True/False forces it.

    ``encode(prompts)`` returns ``(M, C1)`` float32 on the CPU, e.g. C1 = 768 for ViT-L-14-336.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-336",
        pretrained: Optional[str] = "openai",
        device: str | torch.device = "cpu",
        cache_dir: Optional[str] = None,
        quick_gelu: Optional[bool] = None,
    ) -> None:
        import open_clip

        _check_model_name(model_name)
        kind, value, tag_cfg = _resolve_pretrained(model_name, pretrained)
        self.model_name = model_name
        self.pretrained = value
        self.name = f"{OPEN_CLIP_PREFIX}:{model_name}:{value if value is not None else _NO_WEIGHTS}"
        self.device = torch.device(device)

        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False)) if kind == "tag" else False
        weights: Optional[str] = None
        if kind == "tag":
            # Fetch first so an offline failure is told apart from a broken file; later calls hit the cache.
            try:
                weights = _cached_tag_weights(tag_cfg, cache_dir) or open_clip.download_pretrained(
                    tag_cfg, cache_dir=cache_dir
                )
            except Exception as exc:  # hub/URL errors have many types; all mean "not available here"
                raise CheckpointError(
                    f"the open_clip weights {model_name!r} / {value!r} are not cached on this machine and could not "
                    f"be downloaded ({type(exc).__name__}: {exc}); {_weights_hint(model_name, tag_cfg)}"
                ) from exc
            if not weights:
                raise CheckpointError(
                    f"open_clip gave no download location for {model_name!r} / {value!r}; "
                    f"{_weights_hint(model_name, tag_cfg)}"
                )
        elif kind == "file":
            weights = value

        options = {"device": self.device, "force_quick_gelu": bool(quick_gelu), "cache_dir": cache_dir}
        if "weights_only" in inspect.signature(open_clip.create_model).parameters:
            options["weights_only"] = True  # explicit; open_clip before 2.30 has no such argument
        try:
            model = open_clip.create_model(model_name, pretrained=weights, **options)
        except Exception as exc:
            raise CheckpointError(
                f"could not load {weights!r} as weights of open_clip model {model_name!r} "
                f"({type(exc).__name__}: {exc}); check that the file is complete and is an open_clip state dict "
                f"for this architecture (or re-download it)"
            ) from exc
        # encode_text never touches the image tower; dropping it frees most of the memory (~1.2 GB for ViT-L).
        if getattr(model, "visual", None) is not None:
            model.visual = None
        model.eval()
        self.model = model
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:
            raise CheckpointError(
                f"could not create the tokenizer of open_clip model {model_name!r} ({type(exc).__name__}: {exc}); "
                f"use an architecture with the built-in CLIP tokenizer such as 'ViT-L-14-336'"
            ) from exc
        self._embed_dim = self._infer_embed_dim()

    def _infer_embed_dim(self) -> int:
        projection = getattr(self.model, "text_projection", None)
        if isinstance(projection, torch.nn.Linear):
            return int(projection.out_features)
        if isinstance(projection, torch.Tensor):
            return int(projection.shape[-1])
        return int(self.encode(["a"]).shape[1])

    @property
    def embed_dim(self) -> int:
        """C1, the width of the text embeddings."""
        return self._embed_dim

    def _check_lengths(self, prompts: list[str]) -> None:
        encode = getattr(self.tokenizer, "encode", None)
        context = getattr(self.tokenizer, "context_length", None)
        if encode is None or not context:
            return
        for prompt in prompts:
            n = len(encode(prompt)) + 2  # start and end tokens
            if n > context:
                raise PromptError(
                    f"prompt {prompt!r} is {n} tokens long but the text encoder reads at most {context}; "
                    f"shorten the region name or the template"
                )

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Encode ``M`` prompts into raw CLIP text embeddings, ``(M, C1)`` float32 on the CPU."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise PromptError("encode() needs a non-empty list of prompt strings; build them with format_prompts()")
        prompts = list(prompts)
        self._check_lengths(prompts)
        tokens = self.tokenizer(prompts).to(self.device)
        # no_grad rather than inference_mode: the result may later enter autograd as a buffer.
        with torch.no_grad():
            out = self.model.encode_text(tokens, normalize=False)
        return out.detach().to(device="cpu", dtype=torch.float32).clone()

    def __repr__(self) -> str:
        return f"OpenCLIPTextEncoder({self.name!r}, device={str(self.device)!r})"


class OneHotTextEncoder:
    """The paper's Table 1 row #1: no text model, each region gets its own axis.

    Encoding ``M`` prompts gives ``e_1 .. e_M`` in dimension ``C1 = M + 1`` (row i = row i+1 of the identity), so
    the background rule yields ``e_0`` and the text matrix is ``B = identity(N)``. ``embed_dim`` is None because C1
    depends on the number of prompts (``M + 1``), not on the encoder.
    """

    name = ONEHOT_SPEC

    @property
    def embed_dim(self) -> Optional[int]:
        return None

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(M, M + 1)`` float32: prompt i (0-based) -> unit vector ``e_{i+1}``."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise PromptError("encode() needs a non-empty list of prompt strings; build them with format_prompts()")
        m = len(prompts)
        return torch.eye(m + 1, dtype=torch.float32)[1:].clone()

    def __repr__(self) -> str:
        return "OneHotTextEncoder()"


def parse_encoder_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """Split an encoder spec into (kind, model_name, pretrained).

    "onehot" -> ("onehot", None, None); "open_clip:MODEL[:PRETRAINED]" -> ("open_clip", MODEL, PRETRAINED) where
    PRETRAINED is a tag, a file path (may itself contain ':'), or "none" / missing for random initialisation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CheckpointError(
            f"text encoder spec {spec!r} is empty; use 'onehot' or 'open_clip:MODEL:PRETRAINED', "
            f"e.g. 'open_clip:ViT-L-14-336:openai'"
        )
    text = spec.strip()
    if text.lower() in (ONEHOT_SPEC, "one-hot", "one_hot"):
        return ONEHOT_SPEC, None, None
    prefix, sep, rest = text.partition(":")
    if prefix.lower().replace("-", "_") != OPEN_CLIP_PREFIX or not sep or not rest.strip():
        raise CheckpointError(
            f"text encoder spec {spec!r} is not understood; use 'onehot' or 'open_clip:MODEL:PRETRAINED' where "
            f"PRETRAINED is an open_clip tag or a checkpoint path, e.g. 'open_clip:ViT-L-14-336:openai'"
        )
    model, _, pretrained = rest.partition(":")
    model = model.strip()
    pretrained = pretrained.strip()
    return OPEN_CLIP_PREFIX, model, (pretrained if pretrained and pretrained.lower() != _NO_WEIGHTS else None)


def canonical_encoder_name(spec: str) -> str:
    """The ``name`` the encoder built from ``spec`` will have, without loading any weights.

    Use it as the cache key before deciding whether the encoder is needed. Tags are spelled as open_clip lists
    them; file paths become absolute. Raises ``CheckpointError`` for an unknown model, tag or missing file.
    """
    kind, model, pretrained = parse_encoder_spec(spec)
    if kind == ONEHOT_SPEC:
        return ONEHOT_SPEC
    _check_model_name(model)
    _, value, _ = _resolve_pretrained(model, pretrained)
    return f"{OPEN_CLIP_PREFIX}:{model}:{value if value is not None else _NO_WEIGHTS}"


def make_text_encoder(spec: str, device: str | torch.device = "cpu", cache_dir: Optional[str] = None) -> TextEncoder:
    """Build the encoder named by ``spec`` ("onehot" or "open_clip:MODEL:PRETRAINED", see ``parse_encoder_spec``)."""
    kind, model, pretrained = parse_encoder_spec(spec)
    if kind == ONEHOT_SPEC:
        return OneHotTextEncoder()
    return OpenCLIPTextEncoder(model, pretrained, device=device, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------------------------------
# Background vector and text matrix
# --------------------------------------------------------------------------------------------------------------------


def background_vector(region_embeddings: torch.Tensor) -> torch.Tensor:
    """Unit vector orthogonal to the span of the region embeddings.

    Args:
        region_embeddings: ``E (M, C1)``, one row per region, ``M < C1``.

    Returns:
        ``(C1,)`` float32 with unit norm and ``E @ b ~ 0``; its first largest-magnitude component is positive, so
        the sign is deterministic. For ``M < C1 - 1`` the orthogonal complement has more than one dimension and the
        direction picked here (from the SVD) is one of many; it can differ between platforms or library versions,
        which is why a trained model stores the B it was trained with instead of recomputing it.
    """
    if not isinstance(region_embeddings, torch.Tensor) or region_embeddings.ndim != 2:
        raise PromptError(
            f"region embeddings must be a 2-D tensor (M regions, C1 features), got "
            f"{getattr(region_embeddings, 'shape', type(region_embeddings).__name__)}"
        )
    m, c1 = region_embeddings.shape
    if m == 0:
        raise PromptError("no region embeddings were given; give at least one region")
    if m >= c1:
        raise PromptError(
            f"{m} region embeddings of width {c1} leave no direction orthogonal to all of them, so no background "
            f"vector exists; use at most {c1 - 1} regions or a text encoder with wider embeddings"
        )
    e = region_embeddings.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(e).all():
        raise PromptError("the region embeddings contain NaN or infinite values; check the text encoder weights")
    # Right-singular vectors are the ROWS of Vh; the last row spans part of the null space since M < C1. (The public
    # reference code takes Vh[:, -1], a column, which is not orthogonal to E in general.)
    _, _, vh = torch.linalg.svd(e, full_matrices=True)
    b = vh[-1]
    b = b / torch.linalg.vector_norm(b)
    # the sign: the first component of largest magnitude is positive; magnitudes within 1e-9 of the largest count as
    # ties, so rounding in the SVD (which differs between LAPACK builds and thread counts) cannot flip it
    magnitude = b.abs()
    lead = int(torch.nonzero(magnitude >= magnitude.max() - 1e-9)[0])
    if b[lead] < 0:
        b = -b
    return b.to(torch.float32)


def build_text_matrix(names: Sequence[str], encoder: TextEncoder, template: str) -> torch.Tensor:
    """Text matrix ``B (N, C1)`` with ``N = len(names) + 1``: row 0 = background vector, rows 1.. = region embeddings.

    ``template`` is a ``TEMPLATES`` key or a string with one ``{}``. Float32 on the CPU.
    """
    prompts = format_prompts(names, template)
    e = encoder.encode(prompts)
    if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[0] != len(prompts):
        raise PromptError(
            f"text encoder {getattr(encoder, 'name', encoder)!r} returned shape {tuple(getattr(e, 'shape', ()))} "
            f"for {len(prompts)} prompts; expected ({len(prompts)}, C1)"
        )
    e = e.detach().to(device="cpu", dtype=torch.float32)
    b = background_vector(e)
    return torch.cat([b[None, :], e], dim=0)


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------

_CACHE_FORMAT = 1  # bump when the stored matrix would change (e.g. the background rule), to invalidate old entries


def default_cache_directory() -> Path:
    """``$TEXTSCF_CACHE/embeddings`` when TEXTSCF_CACHE is set, else ``~/.cache/textscf/embeddings``."""
    root = os.environ.get("TEXTSCF_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "textscf"
    return base / "embeddings"


class EmbeddingCache:
    """On-disk cache of text matrices, so CLIP is only loaded when a (encoder, template, names) set is new.

    The key is the sha256 of the JSON of (encoder name, template string, names). The cache trusts the encoder name:
    a different checkpoint saved under the same path, or random weights (pretrained "none"), are not detected.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_directory()

    @staticmethod
    def _identity(names: Sequence[str], template: str, encoder_name: str) -> tuple[list[str], str, str]:
        cleaned = validate_region_names(names)
        resolved = resolve_template(template)
        if not isinstance(encoder_name, str) or not encoder_name:
            raise CheckpointError(
                f"encoder name {encoder_name!r} is empty; pass encoder.name or canonical_encoder_name(spec)"
            )
        return cleaned, resolved, encoder_name

    def key(self, names: Sequence[str], template: str, encoder_name: str) -> str:
        """Hex sha256 identifying (encoder name, template string, names)."""
        cleaned, resolved, enc = self._identity(names, template, encoder_name)
        payload = json.dumps([_CACHE_FORMAT, enc, resolved, cleaned], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, names: Sequence[str], template: str, encoder_name: str) -> Path:
        """File holding the entry (may not exist)."""
        return self.directory / f"{self.key(names, template, encoder_name)}.pt"

    def _load(self, path: Path, names: list[str], template: str, encoder_name: str) -> Optional[torch.Tensor]:
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            matrix = entry["text_matrix"]
            meta = (entry["encoder"], entry["template"], list(entry["names"]))
            if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or not matrix.is_floating_point():
                raise TypeError(f"text_matrix is {type(matrix).__name__} {tuple(getattr(matrix, 'shape', ()))}")
        except Exception as exc:  # truncated zip, bad pickle, wrong structure: all mean "rebuild it"
            warnings.warn(
                f"text embedding cache file {path} is unreadable ({type(exc).__name__}: {exc}); recomputing it",
                stacklevel=3,
            )
            return None
        if meta != (encoder_name, template, names) or matrix.shape[0] != len(names) + 1:
            return None  # hash collision or edited file: not our entry
        if not torch.isfinite(matrix).all():
            warnings.warn(f"text embedding cache file {path} holds non-finite values; recomputing it", stacklevel=3)
            return None
        return matrix.to(torch.float32).clone()

    def _store(self, path: Path, matrix: torch.Tensor, names: list[str], template: str, encoder_name: str) -> None:
        entry = {"text_matrix": matrix, "encoder": encoder_name, "template": template, "names": list(names)}
        def save_synced(temp: Path) -> None:
            with open(temp, "wb") as handle:
                torch.save(entry, handle)
                handle.flush()
                os.fsync(handle.fileno())

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, save_synced)
        except OSError as exc:
            # The cache only saves time; a read-only location must not stop a registration.
            warnings.warn(f"could not write text embedding cache {path} ({exc}); continuing without caching",
                          stacklevel=3)

    def get_or_build(
        self,
        names: Sequence[str],
        template: str,
        encoder_name: str,
        encoder_factory: Callable[[], TextEncoder],
    ) -> torch.Tensor:
        """Return the text matrix ``B (N, C1)`` (float32, CPU) for these names, from disk or freshly built.

        ``encoder_factory()`` is called only on a miss, so CLIP is loaded only then; the encoder it returns must
        have ``name == encoder_name`` (use ``canonical_encoder_name(spec)`` to get it without loading).
        """
        cleaned, resolved, enc = self._identity(names, template, encoder_name)
        path = self.path(cleaned, resolved, enc)
        cached = self._load(path, cleaned, resolved, enc)
        if cached is not None:
            return cached
        encoder = encoder_factory()
        if getattr(encoder, "name", None) != enc:
            raise CheckpointError(
                f"the encoder factory built {getattr(encoder, 'name', encoder)!r} but the cache was asked for "
                f"{enc!r}; pass the built encoder's name (canonical_encoder_name(spec)) so entries are not mixed up"
            )
        matrix = build_text_matrix(cleaned, encoder, resolved)
        self._store(path, matrix, cleaned, resolved, enc)
        return matrix.clone()
