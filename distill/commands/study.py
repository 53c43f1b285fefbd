"""`distill study RECIPE_DIR`: which distillation method pays on this data? The teacher once (step 1,
or one given with --teacher_ckpt), then the same student under each variant (a set of overrides of the
recipe's student step) over several seeds, with a table, a chart and curves.

Writes OUT/results.json (every run), OUT/results.md (mean +- std and min - max over seeds per variant,
the teacher's accuracy, hardware, run time, the command on top), OUT/results.png (a bar chart) and, when
the runs were validated more than once, val/acc against samples seen (a table in results.md and
OUT/curves.png). Runs live in OUT/runs/<variant>-seed<k>/.

A study resumes: the same command again keeps the teacher and every finished run of the same recipe and
teacher, continues an interrupted run from its last checkpoint, and trains what is missing; a run whose
recipe changed (say, another --student.trainer.max_epochs) is trained again. Several processes can share
a study: the same command started once per core (OMP_NUM_THREADS=1) makes as many workers, each claiming
the next run no other holds. A worker exits 0 when the study is complete, 3 when runs are still held by
other live workers (the last one to finish completes results.json).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .study_variants import DEIT_VARIANTS, VARIANTS, parse_own_variants, variants_help

DESCRIPTION = ("Which distillation method pays on this data? Trains the teacher once (or takes one given), then the "
               "same student under each variant over several seeds; reports mean +- std and min - max per variant, "
               "a chart, and accuracy against samples seen. Resumable; several processes can share one study.")
EPILOG = f"""variants (each changes the recipe's student step; model.init_args. left out below):
{variants_help()}

your own variant: --variant NAME="OVERRIDES" (repeatable), overrides of the student step as on the
command line, e.g. --variant mine="--model.init_args.loss.alpha 0.3 --model.init_args.loss.tau 2".
It runs besides --variants; its overrides are recorded in results.json and results.md.

Extra --section.key VALUE overrides go to both steps (--teacher.KEY / --student.KEY to one), as in
`distill pipeline`. Examples:
  distill study recipes/digits --seeds 3 --out results/digits
  distill study my_recipe --variants none token dkd --seeds 2 --score last --out results/mine
  distill study my_recipe --teacher_ckpt TEACHER.ckpt --variants none fm   # no step 1: a given teacher
  distill study my_recipe --out results/mine --report                      # rewrite the report only
  distill study my_recipe --out results/mine --progress                    # the runs not finished yet"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The epilog (the variants) as written; the description wrapped as usual."""

    def _fill_text(self, text, width, indent):
        if text is DESCRIPTION:
            return argparse.HelpFormatter._fill_text(self, text, width, indent)
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill study", description=DESCRIPTION,
                                     epilog=EPILOG, formatter_class=_Formatter,
                                     allow_abbrev=False)
    parser.add_argument("recipe", help="recipe folder with teacher.yaml and student.yaml, or a shipped recipe name")
    parser.add_argument("--variants", nargs="+", metavar="NAME", default=None,
                        help=f"built-in variants to run (listed below); default: DeiT's ablation ({' '.join(DEIT_VARIANTS)})")
    parser.add_argument("--variant", action="append", metavar='NAME="OVERRIDES"', default=[],
                        help="a variant of your own: overrides of the student step (repeatable)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    parser.add_argument("--teacher_ckpt", default=None,
                        help="students learn from this step-1 checkpoint; no teacher is trained (e.g. a second "
                             "study of the same teacher)")
    parser.add_argument("--out", default=None, help="study folder (default results/<recipe name>)")
    parser.add_argument("--score", choices=["best", "last"], default="best",
                        help="score each run by its best checkpoint by val/acc (as the pipeline does) or by its last "
                             "one (when validation is the test set: nothing chosen on it)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: rewrite OUT/results.md, results.png and curves.png (and the table and "
                             "paths in results.json) from OUT/results.json")
    parser.add_argument("--progress", action="store_true",
                        help="run nothing: write OUT/progress.md (and print it) with the runs not finished yet, as far "
                             "as they got (steps, val/acc at each validation, whether a worker trains them); safe "
                             "while workers run")
    return parser


def chosen_variants(names: list[str] | None, own: dict[str, str]) -> list[str]:
    """--variants (default DeiT's four), then every --variant not listed there."""
    names = list(names or DEIT_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS and n not in own]
    if unknown:
        raise ValueError(f"no variant {', '.join(unknown)} (--variants); the built-in ones are {', '.join(VARIANTS)}"
                         + (f", yours {', '.join(own)}" if own else "") + " (define your own with --variant NAME=\"...\")")
    return list(dict.fromkeys([*names, *own]))


def main(argv: list[str]) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    out = Path(args.out or f"results/{Path(args.recipe).name}")
    if args.report:
        from .study_report import report

        return report(out)
    if args.progress:
        from .study_progress import progress

        return progress(out, list(argv))
    own = parse_own_variants(args.variant)
    variants = chosen_variants(args.variants, own)
    if args.seeds < 1:
        raise ValueError(f"a study needs at least one seed (--seeds {args.seeds}); pass --seeds 1 or more")
    from .pipeline import resolve_recipe, split_overrides
    from .study_runs import run_command

    resolve_recipe(args.recipe)  # bad input is refused before anything is written
    split_overrides(overrides)
    return run_command(args.recipe, variants, args.seeds, out, overrides, list(argv), score=args.score,
                       teacher_ckpt=args.teacher_ckpt, own=own)
