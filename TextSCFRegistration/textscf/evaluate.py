"""``textscf evaluate``: register a list of pairs and report Dice, HD95, SDlogJ, folding and run time.

For every pair :func:`textscf.pipeline.register` runs with both label maps, and the numbers it reports (Dice and
HD95 per region before and after registration, SDlogJ and % |J| <= 0 of the deformable field on the fixed grid,
see :mod:`textscf.metrics`) are collected into

- ``per_region.csv``: one row per pair and region: ``pair, region, dice, hd95_mm, dice_before, hd95_mm_before``
  (Dice as a fraction in [0, 1], HD95 in mm; ``nan`` where a region is missing from a label map);
- ``per_pair.csv``: one row per pair: means over the regions before registration, after the initial alignment
  and after registration, SDlogJ, % |J| <= 0, the minimum Jacobian determinant, the wall time of the registration
  (model loading included) and of the network stage, and the device;
- ``summary.md``: mean ± standard deviation over the pairs (sample standard deviation, ``ddof=1``) of every
  number, and per region;
- ``dice_boxplot.png``: Dice per region, one box per region and method (before registration and the method,
  side by side, like Figure 3 of the textSCF paper).

These files appear together when every pair has been registered (:class:`textscf.io.OutputFolder`, with a
``textscf-manifest.json`` listing them; ``--overwrite`` replaces the previous evaluation as a whole once the new one
has finished). Meanwhile each pair's results are kept as soon as the pair is done, in ``partial/pairs.jsonl`` (one
JSON line per finished pair; the Learn2Reg fields beside it): a pair that fails is reported by name and the others
still run, and an interrupted or failed evaluation continues with ``--resume`` (``resume=True``), which registers
only the pairs not finished yet. ``partial/`` is removed when the evaluation completes.

The Learn2Reg submission layout (``learn2reg=True`` / ``--learn2reg``) is described in
:mod:`textscf.evaluation.learn2reg`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from textscf.errors import InputError, TextSCFError
from textscf.evaluation.learn2reg import LEARN2REG_FOLDER, learn2reg_displacement, learn2reg_names, npz_bytes
from textscf.evaluation.pairs import BTCV_SYNTHETIC_TEST, SYNTHETIC_NOTE, PairCase, case_id_from_path
from textscf.evaluation.partial import PARTIAL_FOLDER, PartialResults
from textscf.evaluation.report import BEFORE_NAME, dice_boxplot, rows_to_csv, summary_markdown
from textscf.evaluation.statistics import PER_PAIR_COLUMNS, PER_REGION_COLUMNS, evaluation_summary, rows_from_result
from textscf.io import MANIFEST_NAME, OutputFolder

# cli.py builds its parser from this module: the command itself lives in evaluate_cli.py

OUTPUT_NAMES = ("per_region.csv", "per_pair.csv", "summary.md", "dice_boxplot.png")


@dataclass
class EvaluationResult:
    """What :func:`evaluate_pairs` measured and wrote.

    Attributes:
        method_name: the name used in the tables and the plot.
        per_region: rows ``pair, region, dice, hd95_mm, dice_before, hd95_mm_before`` (Dice fractions, mm).
        per_pair: rows with the columns of :data:`PER_PAIR_COLUMNS`.
        summary: ``{"pairs": summarise(per_pair), "regions": summarise(per_region, by="region")}``.
        markdown: the text of ``summary.md``.
        files: every file written (final paths).
        notes: remarks printed with the results (e.g. that the images are synthetic).
    """

    method_name: str
    per_region: list[dict]
    per_pair: list[dict]
    summary: dict
    markdown: str
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

def evaluate_pairs(
    cases: Iterable[PairCase],
    options=None,
    output_dir: str | os.PathLike = "evaluation",
    overwrite: bool = False,
    learn2reg: bool = False,
    method_name: str = "textscf",
    progress: bool = True,
    resume: bool = False,
) -> EvaluationResult:
    """Register every pair with :func:`textscf.pipeline.register` and write the reports into ``output_dir``.

    Args:
        cases: the pairs (:class:`PairCase`); names must be unique.
        options: :class:`textscf.pipeline.RegistrationOptions` (None = defaults).
        output_dir: folder for ``per_region.csv``, ``per_pair.csv``, ``summary.md``, ``dice_boxplot.png`` and,
            with ``learn2reg``, ``learn2reg/disp_FFFF_MMMM.npz`` (see :mod:`textscf.evaluation.learn2reg`).
        overwrite: replace the previous evaluation in ``output_dir`` (otherwise existing outputs are refused before
            any registration); an unfinished one in ``partial/`` is discarded.
        learn2reg: also write the Learn2Reg 2020/2021 submission fields.
        method_name: the method's name in the tables and the plot.
        progress: a progress bar over the pairs.
        resume: continue the unfinished evaluation in ``output_dir/partial``: its finished pairs are kept, the
            others are registered (the settings must be the same).

    Each finished pair is kept in ``partial/`` at once. A pair whose registration fails with a
    :class:`~textscf.errors.TextSCFError` is reported by name once the other pairs have run (InputError); the
    report files appear only when every pair is done.
    """
    from textscf.pipeline import RegistrationOptions

    cases = _checked_cases(cases, method_name)
    options = options or RegistrationOptions()
    npz_names = learn2reg_names(cases) if learn2reg else {}
    notes = [SYNTHETIC_NOTE] if any(c.synthetic for c in cases) else []
    output_dir = Path(output_dir)
    settings, signature = _settings(options, method_name, learn2reg)
    inputs = {f"pair {c.name!r} {role.replace('_', ' ')}": source
              for c in cases for role, source in c.sources().items() if isinstance(source, Path)}

    with ExitStack() as stack:
        out = stack.enter_context(OutputFolder(output_dir, overwrite=overwrite, names=OUTPUT_NAMES, inputs=inputs,
                                               manifest=MANIFEST_NAME, known_names=OUTPUT_NAMES))
        l2r = _learn2reg_folder(stack, output_dir, overwrite, npz_names)
        partial = PartialResults(output_dir / PARTIAL_FOLDER, signature)
        done = partial.open(resume=resume, overwrite=overwrite)
        _register_remaining(cases, done, partial, options, npz_names, stack if progress else None, method_name)
        per_region = [row for c in cases for row in done[c.name]["per_region"]]
        per_pair = [done[c.name]["per_pair"] for c in cases]
        summary = evaluation_summary(per_pair, per_region)
        markdown = summary_markdown(method_name, per_pair, summary, notes, settings)
        _write_reports(out, method_name, per_pair, per_region, markdown, synthetic=bool(notes))
        if l2r is not None:
            for case in cases:
                l2r.write_bytes(npz_names[case.name], partial.npz_bytes(npz_names[case.name]))
    partial.remove()

    files = [output_dir / n for n in OUTPUT_NAMES]
    files += [output_dir / LEARN2REG_FOLDER / n for n in npz_names.values()]
    return EvaluationResult(method_name, per_region, per_pair, summary, markdown, files, notes)


def _checked_cases(cases: Iterable[PairCase], method_name: str) -> list[PairCase]:
    """The pairs as a list, refused before any registration when empty, of the wrong type, named twice or with
    missing files (and an empty method name)."""
    cases = list(cases)
    if not cases:
        raise InputError("no pairs to evaluate. Fix: give at least one pair (a pairs CSV, a Learn2Reg JSON or "
                         f"'{BTCV_SYNTHETIC_TEST}')")
    for case in cases:
        if not isinstance(case, PairCase):
            raise InputError(f"evaluate_pairs takes PairCase objects, got a {type(case).__name__}")
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"pair names must be unique; repeated: {', '.join(duplicates)}. Fix: remove the repeated "
                         "pairs or give them distinct names")
    if not isinstance(method_name, str) or not method_name.strip():
        raise InputError("method_name is empty; give the method a name for the tables")
    for case in cases:
        case.check_files()
    return cases


def _settings(options, method_name: str, learn2reg: bool) -> tuple[dict, dict]:
    """The settings ``summary.md`` shows, and the signature (those and more) that must not change between an
    interrupted evaluation and its ``--resume``."""
    settings = {
        "method": method_name, "checkpoint": options.checkpoint or "bundled model", "preset": options.preset,
        "init": options.init, "refine iterations": options.refine_iterations, "device requested": options.device,
    }
    signature = {**settings, "regions": options.region_names, "label values": options.label_values,
                 "refine learning rate": options.refine_learning_rate, "seed": options.seed,
                 "unmapped labels": options.unmapped_labels, "learn2reg": bool(learn2reg)}
    if options.refine_use_moving_labels:  # the moving labels in the loss (by default they only score the pairs)
        signature["moving labels in the loss, weight"] = options.refine_label_weight
    return settings, signature


def _learn2reg_folder(stack: ExitStack, output_dir: Path, overwrite: bool,
                      npz_names: dict[str, str]) -> OutputFolder | None:
    """The Learn2Reg fields' folder when they are written; without them, a previous run's fields are removed on
    success when that run is being replaced."""
    if npz_names:
        return stack.enter_context(OutputFolder(output_dir / LEARN2REG_FOLDER, overwrite=overwrite,
                                                names=list(npz_names.values()), manifest=MANIFEST_NAME))
    if overwrite and (output_dir / LEARN2REG_FOLDER / MANIFEST_NAME).is_file():
        stack.enter_context(OutputFolder(output_dir / LEARN2REG_FOLDER, overwrite=True, manifest=MANIFEST_NAME))
    return None


def _register_remaining(cases: list[PairCase], done: dict[str, dict], partial: PartialResults, options,
                        npz_names: dict[str, str], bar_stack: ExitStack | None, method_name: str) -> None:
    """Register the pairs not in ``done`` yet, keeping each in ``partial`` (and ``done``) as it finishes; then one
    InputError naming every pair that failed."""
    todo = [c for c in cases if c.name not in done]
    bar = None
    if bar_stack is not None and todo:
        from tqdm.auto import tqdm

        bar = bar_stack.enter_context(tqdm(total=len(todo), unit="pair", desc=f"evaluate {method_name}"))
    failures: list[str] = []
    for case in todo:
        if bar is not None:
            bar.set_postfix_str(case.name)
        try:
            pair_row, region_rows, npz = _register_pair(case, options, learn2reg=bool(npz_names))
        except TextSCFError as exc:
            failures.append(f"pair {case.name!r}: {exc}")
        else:
            done[case.name] = partial.add(case.name, pair_row, region_rows, npz_names.get(case.name), npz)
        if bar is not None:
            bar.update(1)
    if failures:
        finished = sum(c.name in done for c in cases)
        raise InputError(
            f"{len(failures)} of {len(cases)} pair(s) failed; " + "; ".join(failures) + ". "
            f"The {finished} finished pair(s) are kept in '{partial.folder}'. Fix: correct the failed pair(s) "
            "(or leave them out of the pair list) and run the same command again with --resume "
            "(resume=True): only the pairs not finished yet are registered.")


def _register_pair(case: PairCase, options, learn2reg: bool) -> tuple[dict, list[dict], bytes | None]:
    """One pair registered: its per-pair row, its per-region rows and (with ``learn2reg``) its field's .npz bytes."""
    from textscf.pipeline import register

    fixed, moving, fixed_labels, moving_labels = case.load()
    start = time.perf_counter()
    result = register(fixed, moving, options, fixed_labels, moving_labels)
    seconds = time.perf_counter() - start
    fixed_id = case.fixed_id or case_id_from_path(case.fixed) or ""
    moving_id = case.moving_id or case_id_from_path(case.moving) or ""
    region_rows, pair_row = rows_from_result(case.name, result, seconds, fixed_id, moving_id)
    npz = npz_bytes(learn2reg_displacement(result.displacement, fixed, moving)) if learn2reg else None
    return pair_row, region_rows, npz


def _write_reports(out: OutputFolder, method_name: str, per_pair: list[dict], per_region: list[dict],
                   markdown: str, synthetic: bool) -> None:
    """``per_region.csv``, ``per_pair.csv``, ``summary.md`` and ``dice_boxplot.png`` into ``out``."""
    out.write_text("per_region.csv", rows_to_csv(per_region, PER_REGION_COLUMNS))
    out.write_text("per_pair.csv", rows_to_csv(per_pair, PER_PAIR_COLUMNS))
    out.write_text("summary.md", markdown)
    before_rows = [{"region": r["region"], "dice": r["dice_before"]} for r in per_region]
    title = f"Dice per region, {len(per_pair)} pair(s)" + (" (synthetic images)" if synthetic else "")
    dice_boxplot({BEFORE_NAME: before_rows, method_name: per_region}, out.temp_path("dice_boxplot.png"), title)
