"""``textscf evaluate``: its command-line options and the command itself (the loop is :mod:`textscf.evaluate`)."""
from __future__ import annotations

from pathlib import Path

from textscf.evaluation.pairs import BTCV_SYNTHETIC_TEST, SYNTHETIC_NOTE, cases_from_argument
from textscf.evaluation.partial import PARTIAL_FOLDER
from textscf.evaluation.report import format_mean_std


def add_evaluate_parser(sub) -> None:
    """Add ``textscf evaluate`` to the ``textscf`` sub-command parsers."""
    from textscf.cli import (  # the option types of every textscf command have one definition, there
        add_debias_option, add_label_guidance_options, comma_list_option, int_list_option, int_option,
        output_folder_option, path_option, refine_iterations_option, refine_lr_option, seed_option,
    )
    from textscf.training_cli import DEFAULT_SHARED_DATA

    p = sub.add_parser(
        "evaluate", help="register a list of pairs and report Dice, HD95, SDlogJ, folding and run time",
        description="Register every pair of --pairs with its label maps and write per_region.csv, per_pair.csv, "
        "summary.md (mean ± std over pairs and per region) and dice_boxplot.png to OUTPUT; with --learn2reg also "
        "learn2reg/disp_FIXED_MOVING.npz (Learn2Reg 2020/2021 layout: float16, (3, I/2, J/2, K/2), voxels of the "
        "full-resolution fixed grid, fixed id first).",
    )
    p.add_argument("--pairs", required=True,
                   help="a CSV (columns fixed, moving, fixed_labels, moving_labels; paths relative to the CSV), a "
                   f"Learn2Reg dataset JSON, or '{BTCV_SYNTHETIC_TEST}' (the 42 BTCV test pairs of the paper's split "
                   "with SYNTHETIC label-derived CT images)")
    p.add_argument("--split", choices=["val", "test"], default=None,
                   help="which pairs of a Learn2Reg JSON: registration_val or registration_test (default: val if "
                   "present)")
    p.add_argument("-o", "--output", required=True, type=output_folder_option,
                   help=f"output folder (finished pairs are kept in OUTPUT/{PARTIAL_FOLDER} as they complete)")
    g = p.add_argument_group("model and registration")
    g.add_argument("--checkpoint", type=path_option, help="textscf checkpoint (.pt); default: the bundled model")
    g.add_argument("--preset", help="prompt preset: abdomen-ct or brain-mri")
    g.add_argument("--prompts", type=comma_list_option, help='region names, e.g. "liver,spleen" (with --label-values)')
    g.add_argument("--label-values", type=int_list_option, help='label value of each prompt, e.g. "6,1"')
    g.add_argument("--unmapped-labels", choices=["error", "background"], default="error",
                   help="label values without a prompt: stop with an error (default) or treat them as background")
    g.add_argument("--init", choices=["none", "center", "affine"], default="center",
                   help="initial alignment (default: center of mass)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--refine", type=refine_iterations_option, default=0, metavar="N",
                   help="instance optimisation iterations per pair")
    g.add_argument("--refine-lr", type=refine_lr_option, default=None,
                   help="refinement learning rate, in (0, 1] (default 1e-3)")
    g.add_argument("--seed", type=seed_option, default=0)
    add_debias_option(g)
    add_label_guidance_options(g)
    o = p.add_argument_group("outputs")
    o.add_argument("--learn2reg", action="store_true", help="also write the Learn2Reg submission fields")
    o.add_argument("--method", default="textscf", help="method name in the tables and the plot")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the previous evaluation in OUTPUT (once the new one has finished) and discard an "
                   "unfinished one")
    o.add_argument("--resume", action="store_true",
                   help=f"continue the unfinished evaluation in OUTPUT/{PARTIAL_FOLDER} (same options): only the "
                   "pairs not finished yet are registered")
    o.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA,
                   help=f"the shared data folder for {BTCV_SYNTHETIC_TEST} (default: ../shared/data)")
    o.add_argument("--limit", type=int_option(1, what="a number of pairs"), default=None, metavar="N", help="only the first N pairs")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)

def cmd_evaluate(args) -> int:
    from textscf.cli import label_guidance
    from textscf.evaluate import evaluate_pairs
    from textscf.pipeline import RegistrationOptions

    cases = cases_from_argument(args.pairs, args.shared_data, args.split)
    if args.limit is not None:
        cases = cases[: args.limit]
    refine_lr = args.refine_lr if args.refine_lr is not None else 1e-3
    options = RegistrationOptions(
        checkpoint=args.checkpoint, preset=args.preset, region_names=args.prompts, label_values=args.label_values,
        init=args.init, device=args.device, refine_iterations=args.refine, refine_learning_rate=refine_lr,
        unmapped_labels=args.unmapped_labels, seed=args.seed, debias=args.debias, **label_guidance(args),
    )
    for note in [SYNTHETIC_NOTE] if any(c.synthetic for c in cases) else []:
        print(f"textscf: note: {note}")
    result = evaluate_pairs(cases, options, args.output, overwrite=args.overwrite, learn2reg=args.learn2reg,
                            method_name=args.method, progress=not args.quiet, resume=args.resume)
    s = result.summary["pairs"]
    print(f"textscf: evaluated {len(result.per_pair)} pair(s) with {args.method}: "
          f"Dice {format_mean_std(s['mean_dice_before'], 100, 1)} % -> {format_mean_std(s['mean_dice'], 100, 1)} %, "
          f"HD95 {format_mean_std(s['mean_hd95_mm'])} mm, SDlogJ {format_mean_std(s['sdlogj'], 1, 3)}, "
          f"|J|<=0 {format_mean_std(s['folding_percent'], 1, 3)} %, {format_mean_std(s['seconds'])} s per pair")
    print(f"textscf: wrote {Path(args.output) / 'summary.md'} and {len(result.files) - 1} other file(s)")
    return 0
