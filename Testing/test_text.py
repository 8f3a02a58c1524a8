"""Tests of the text branch: templates, open_clip / one-hot encoders, background vector, embedding cache.

open_clip runs for real with random weights (ViT-S-32 builds in well under a second); no hub access is needed.
"""
import socket
import warnings
from pathlib import Path

import open_clip
import pytest
import torch

from textscf.errors import CheckpointError, PromptError, TextSCFError
from textscf.text import (
    TEMPLATES,
    EmbeddingCache,
    OneHotTextEncoder,
    OpenCLIPTextEncoder,
    background_vector,
    build_text_matrix,
    canonical_encoder_name,
    default_cache_directory,
    format_prompts,
    make_text_encoder,
    parse_encoder_spec,
    resolve_template,
    validate_region_names,
)

SMALL_MODEL = "ViT-S-32"  # smallest built-in CLIP config; same tokenizer as ViT-L-14-336
SMALL_DIM = 384
ORGANS = ["liver", "spleen", "left kidney", "right kidney", "stomach"]
CLIP_ORGANS = ORGANS[:3]  # CLIP runs cost ~0.1 s per prompt on a 2-core CPU: keep them few


def _orthogonality(e: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |<e_i, b>| / |e_i| over the rows (b has unit norm)."""
    e64, b64 = e.double(), b.double()
    return float(((e64 @ b64).abs() / torch.linalg.vector_norm(e64, dim=1)).max())


@pytest.fixture(scope="module")
def clip_encoder() -> OpenCLIPTextEncoder:
    torch.manual_seed(0)
    return OpenCLIPTextEncoder(SMALL_MODEL, pretrained=None)


@pytest.fixture(scope="module")
def clip_embeddings(clip_encoder) -> torch.Tensor:
    """(3, 384) embeddings of CLIP_ORGANS in the ct-abdomen template, computed once."""
    return clip_encoder.encode(format_prompts(CLIP_ORGANS, "ct-abdomen"))


@pytest.fixture()
def offline(monkeypatch):
    """No network at all: HF hub offline mode plus refused sockets, so nothing can hang on a download."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------------------------------------------------------------
# Templates and prompts
# ---------------------------------------------------------------------------------------------------------------------


def test_templates_and_prompts():
    assert TEMPLATES == {
        "photo": "A photo of a {}.",
        "photo-abdomen": "A photo of a {} in human abdomen.",
        "ct-abdomen": "A computerized tomography of a {} in human abdomen.",
        "mri-brain": "A magnetic resonance imaging of a {} in human brain.",
    }
    assert resolve_template("ct-abdomen") == "A computerized tomography of a {} in human abdomen."
    assert resolve_template(" MRI-Brain ") == TEMPLATES["mri-brain"]
    assert resolve_template("An X of {} with {braces}") == "An X of {} with {braces}"
    assert format_prompts([" liver", "left kidney "], "ct-abdomen") == [
        "A computerized tomography of a liver in human abdomen.",
        "A computerized tomography of a left kidney in human abdomen.",
    ]
    # Braces other than the placeholder stay literal.
    assert format_prompts(["cortex"], "{} {x}") == ["cortex {x}"]
    assert validate_region_names(("Liver", " spleen ")) == ["Liver", "spleen"]


@pytest.mark.parametrize(
    "names, template, fragment",
    [
        ([], "photo", "empty"),
        ("liver", "photo", "list of strings"),
        (["liver", "  "], "photo", "#2"),
        (["liver", ""], "photo", "non-blank"),
        (["liver", 3], "photo", "not a string"),
        (["Liver", "spleen", " liver "], "photo", "duplicates #1"),
        (["liver", "background"], "photo", "reserved"),
        ([" BackGround "], "photo", "reserved"),
        (["liver"], "A photo of a liver.", "0 '{}'"),
        (["liver"], "{} and {}", "2 '{}'"),
        (["liver"], "ct-chest", "not a known template"),
        (["liver"], "   ", "empty"),
        (["liver"], None, "not a string"),
    ],
)
def test_prompt_errors(names, template, fragment):
    with pytest.raises(PromptError) as info:
        format_prompts(names, template)
    assert fragment in str(info.value)
    assert isinstance(info.value, TextSCFError)


# ---------------------------------------------------------------------------------------------------------------------
# open_clip encoder
# ---------------------------------------------------------------------------------------------------------------------


def test_open_clip_random_init_embeddings(clip_encoder, clip_embeddings):
    prompts = format_prompts(CLIP_ORGANS, "ct-abdomen")
    e = clip_embeddings
    assert clip_encoder.name == f"open_clip:{SMALL_MODEL}:none"
    assert clip_encoder.embed_dim == SMALL_DIM
    assert e.shape == (len(CLIP_ORGANS), SMALL_DIM)
    assert e.dtype == torch.float32 and e.device.type == "cpu" and not e.requires_grad
    assert torch.isfinite(e).all()
    # Raw outputs, not unit vectors.
    assert not torch.allclose(torch.linalg.vector_norm(e, dim=1), torch.ones(len(CLIP_ORGANS)), atol=1e-3)
    # Deterministic, independent of batching, and prompt-dependent.
    assert torch.equal(e, clip_encoder.encode(prompts))
    torch.testing.assert_close(clip_encoder.encode(prompts[2:3])[0], e[2], rtol=1e-5, atol=1e-5)
    assert (e[0] - e[1]).abs().max() > 1e-3
    # The image tower is dropped: only the text path is kept in memory.
    assert clip_encoder.model.visual is None


def test_open_clip_prompt_longer_than_context(clip_encoder):
    with pytest.raises(PromptError, match="tokens long"):
        clip_encoder.encode(["liver " * 100])
    with pytest.raises(PromptError, match="non-empty list"):
        clip_encoder.encode([])


def test_local_checkpoint_reproduces_model(tmp_path):
    torch.manual_seed(123)
    model = open_clip.create_model(SMALL_MODEL, pretrained=None).eval()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    prompts = format_prompts(CLIP_ORGANS[:2], "photo")
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer(SMALL_MODEL)(prompts))

    encoder = make_text_encoder(f"open_clip:{SMALL_MODEL}:{path}")
    assert isinstance(encoder, OpenCLIPTextEncoder)
    assert encoder.name == f"open_clip:{SMALL_MODEL}:{path.resolve()}"
    assert canonical_encoder_name(f"open_clip:{SMALL_MODEL}:{path}") == encoder.name
    torch.testing.assert_close(encoder.encode(prompts), expected, rtol=0, atol=1e-6)


def test_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="neither a pretrained tag") as info:
        OpenCLIPTextEncoder(SMALL_MODEL, pretrained=str(missing))
    assert "nope.pt" in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="could not load"):
        OpenCLIPTextEncoder(SMALL_MODEL, pretrained=str(garbage))
    with pytest.raises(CheckpointError, match="no model architecture"):
        OpenCLIPTextEncoder("ViT-Q-99", pretrained=None)
    with pytest.raises(CheckpointError, match="known tags"):
        canonical_encoder_name("open_clip:ViT-L-14-336:laion9000")


def test_uncached_tag_offline_gives_checkpoint_error(tmp_path, offline):
    # The paper's encoder: the tag is known, but nothing is cached in this empty cache_dir and there is no network.
    with pytest.raises(CheckpointError) as info:
        OpenCLIPTextEncoder("ViT-L-14-336", pretrained="openai", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "not cached" in message
    assert "huggingface.co/timm/vit_large_patch14_clip_336.openai" in message
    assert "open_clip:ViT-L-14-336-quickgelu:/path/to/" in message
    # Resolving the name needs no network and spells the tag as open_clip does.
    assert canonical_encoder_name("open_clip:ViT-L-14-336:OpenAI") == "open_clip:ViT-L-14-336:openai"


def test_encoder_specs():
    assert parse_encoder_spec("onehot") == ("onehot", None, None)
    assert parse_encoder_spec(" One-Hot ") == ("onehot", None, None)
    assert parse_encoder_spec("open_clip:ViT-L-14-336:openai") == ("open_clip", "ViT-L-14-336", "openai")
    assert parse_encoder_spec("open_clip:RN50x64") == ("open_clip", "RN50x64", None)
    assert parse_encoder_spec("open_clip:ViT-S-32:none") == ("open_clip", "ViT-S-32", None)
    # A Windows path keeps its drive colon.
    assert parse_encoder_spec(r"open_clip:ViT-B-32:C:\w\clip.bin") == ("open_clip", "ViT-B-32", r"C:\w\clip.bin")
    assert canonical_encoder_name("onehot") == "onehot"
    assert canonical_encoder_name("open_clip:ViT-S-32") == "open_clip:ViT-S-32:none"
    assert isinstance(make_text_encoder("onehot"), OneHotTextEncoder)
    for bad in ["", "clip:ViT-B-32:openai", "open_clip", "open_clip:", "bert"]:
        with pytest.raises(CheckpointError, match="onehot"):
            parse_encoder_spec(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Background vector and text matrix
# ---------------------------------------------------------------------------------------------------------------------


def test_background_vector_known_cases():
    b = background_vector(torch.tensor([[3.0, 0.0, 0.0], [0.0, -2.0, 0.0]]))
    torch.testing.assert_close(b, torch.tensor([0.0, 0.0, 1.0]), rtol=0, atol=1e-7)
    # Null space of [[1, 1, 0], [0, 0, 1]] is +-(1, -1, 0)/sqrt(2); the tie goes to the first component: positive.
    b = background_vector(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0]]))
    s = 2.0 ** -0.5
    torch.testing.assert_close(b, torch.tensor([s, -s, 0.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("m, c1", [(1, 2), (3, 8), (13, 14), (13, 768), (40, 64)])
def test_background_vector_random(m, c1):
    g = torch.Generator().manual_seed(m * 1000 + c1)
    e = torch.randn(m, c1, generator=g) * 10.0 + 3.0
    b = background_vector(e)
    assert b.shape == (c1,) and b.dtype == torch.float32
    assert abs(float(torch.linalg.vector_norm(b)) - 1.0) < 1e-6
    assert _orthogonality(e, b) < 1e-5
    assert b[b.abs().argmax()] > 0
    # Sign rule makes it independent of the rows' signs (the span is the same).
    torch.testing.assert_close(background_vector(-e), b, rtol=0, atol=1e-5)


def test_background_vector_rank_deficient():
    g = torch.Generator().manual_seed(7)
    e = torch.randn(3, 6, generator=g)
    e = torch.cat([e, e[:1] * 2.0], dim=0)  # 4 rows, rank 3
    b = background_vector(e)
    assert _orthogonality(e, b) < 1e-5


def test_reference_column_indexing_is_not_orthogonal():
    # Why background_vector takes a row of Vh: the column Vh[:, -1] (as in the public reference code) is not
    # orthogonal to the embeddings in general.
    g = torch.Generator().manual_seed(3)
    e = torch.randn(4, 10, generator=g)
    _, _, vh = torch.linalg.svd(e, full_matrices=True)
    assert _orthogonality(e, vh[:, -1]) > 1e-2
    assert _orthogonality(e, background_vector(e)) < 1e-5


def test_background_vector_errors():
    with pytest.raises(PromptError, match="no background vector exists"):
        background_vector(torch.randn(5, 5))
    with pytest.raises(PromptError, match="2-D"):
        background_vector(torch.randn(5))
    with pytest.raises(PromptError, match="NaN"):
        background_vector(torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(PromptError, match="at least one"):
        background_vector(torch.zeros(0, 4))


def test_text_matrix_from_clip(clip_encoder, clip_embeddings):
    b = build_text_matrix(CLIP_ORGANS, clip_encoder, "ct-abdomen")
    assert b.shape == (len(CLIP_ORGANS) + 1, SMALL_DIM) and b.dtype == torch.float32
    torch.testing.assert_close(b[1:], clip_embeddings, rtol=1e-5, atol=1e-5)
    assert abs(float(torch.linalg.vector_norm(b[0])) - 1.0) < 1e-6
    assert _orthogonality(clip_embeddings, b[0]) < 1e-5
    torch.testing.assert_close(b[0], background_vector(clip_embeddings), rtol=0, atol=1e-6)


def test_onehot_gives_identity():
    encoder = OneHotTextEncoder()
    assert encoder.name == "onehot" and encoder.embed_dim is None
    e = encoder.encode(["a", "b", "c"])
    torch.testing.assert_close(e, torch.eye(4)[1:], rtol=0, atol=0)
    b = build_text_matrix(ORGANS, encoder, "photo")
    torch.testing.assert_close(b, torch.eye(len(ORGANS) + 1), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


class CountingFactory:
    def __init__(self, make=OneHotTextEncoder):
        self.calls = 0
        self.make = make

    def __call__(self):
        self.calls += 1
        return self.make()


def test_cache_hit_skips_factory_and_is_shared(tmp_path):
    factory = CountingFactory()
    cache = EmbeddingCache(tmp_path)
    first = cache.get_or_build(ORGANS, "ct-abdomen", "onehot", factory)
    torch.testing.assert_close(first, torch.eye(len(ORGANS) + 1))
    assert factory.calls == 1
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".pt"]  # no temp file left behind
    entry = torch.load(files[0], weights_only=True)
    assert entry["encoder"] == "onehot" and entry["template"] == TEMPLATES["ct-abdomen"]
    assert entry["names"] == ORGANS

    # Same instance, a new instance on the same folder, and the template spelled out: all hits.
    again = cache.get_or_build(ORGANS, "ct-abdomen", "onehot", factory)
    other = EmbeddingCache(tmp_path).get_or_build(ORGANS, TEMPLATES["ct-abdomen"], "onehot", factory)
    assert factory.calls == 1
    assert torch.equal(again, first) and torch.equal(other, first)
    # Different names, template or encoder name: different keys.
    assert cache.key(ORGANS, "photo", "onehot") != cache.key(ORGANS, "ct-abdomen", "onehot")
    assert cache.key(ORGANS[:2], "photo", "onehot") != cache.key(ORGANS[:3], "photo", "onehot")
    assert cache.key(ORGANS, "photo", "onehot") != cache.key(ORGANS, "photo", "open_clip:ViT-S-32:none")
    # Returned tensors are copies: editing one does not poison later hits.
    again.zero_()
    torch.testing.assert_close(cache.get_or_build(ORGANS, "ct-abdomen", "onehot", factory), first)


def test_cache_with_clip(tmp_path, clip_encoder, clip_embeddings):
    factory = CountingFactory(lambda: clip_encoder)
    cache = EmbeddingCache(tmp_path)
    built = cache.get_or_build(CLIP_ORGANS, "ct-abdomen", clip_encoder.name, factory)
    loaded = EmbeddingCache(tmp_path).get_or_build(CLIP_ORGANS, "ct-abdomen", clip_encoder.name, factory)
    assert factory.calls == 1
    assert loaded.shape == (len(CLIP_ORGANS) + 1, SMALL_DIM)
    assert torch.equal(built, loaded)
    torch.testing.assert_close(loaded[1:], clip_embeddings, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded[0], background_vector(clip_embeddings), rtol=0, atol=1e-6)


def test_cache_corrupted_file_is_rebuilt(tmp_path):
    cache = EmbeddingCache(tmp_path)
    factory = CountingFactory()
    cache.get_or_build(ORGANS, "photo", "onehot", factory)
    path = cache.path(ORGANS, "photo", "onehot")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        out = cache.get_or_build(ORGANS, "photo", "onehot", factory)
    assert factory.calls == 2
    torch.testing.assert_close(out, torch.eye(len(ORGANS) + 1))
    # The file was replaced by a good one: the next call is a silent hit.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_or_build(ORGANS, "photo", "onehot", factory)
    assert factory.calls == 2

    torch.save({"something": "else"}, path)  # readable but the wrong structure
    with pytest.warns(UserWarning, match="unreadable"):
        cache.get_or_build(ORGANS, "photo", "onehot", factory)
    assert factory.calls == 3


def test_cache_metadata_mismatch_is_a_miss(tmp_path):
    cache = EmbeddingCache(tmp_path)
    factory = CountingFactory()
    path = cache.path(ORGANS, "photo", "onehot")
    # An entry for other names stored under this key (as after a collision or an edit).
    torch.save(
        {"text_matrix": torch.zeros(3, 3), "encoder": "onehot", "template": TEMPLATES["photo"], "names": ["a", "b"]},
        path,
    )
    out = cache.get_or_build(ORGANS, "photo", "onehot", factory)
    assert factory.calls == 1
    torch.testing.assert_close(out, torch.eye(len(ORGANS) + 1))
    assert torch.load(path, weights_only=True)["names"] == ORGANS


def test_cache_factory_name_mismatch_and_bad_input(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(CheckpointError, match="canonical_encoder_name"):
        cache.get_or_build(ORGANS, "photo", "open_clip:ViT-L-14-336:openai", OneHotTextEncoder)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PromptError, match="reserved"):
        cache.get_or_build(["background", "liver"], "photo", "onehot", OneHotTextEncoder)


def test_cache_unwritable_location_still_returns(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = EmbeddingCache(blocker / "embeddings")
    with pytest.warns(UserWarning, match="could not write"):
        out = cache.get_or_build(ORGANS[:2], "photo", "onehot", OneHotTextEncoder)
    torch.testing.assert_close(out, torch.eye(3))


def test_cache_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTSCF_CACHE", str(tmp_path / "root"))
    assert default_cache_directory() == tmp_path / "root" / "embeddings"
    assert EmbeddingCache().directory == tmp_path / "root" / "embeddings"
    monkeypatch.delenv("TEXTSCF_CACHE")
    assert EmbeddingCache().directory == Path.home() / ".cache" / "textscf" / "embeddings"
