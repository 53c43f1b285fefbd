"""The variants of `distill study`: each one a list of overrides of the recipe's student step (what it
changes in student.yaml), the rows of the study's table, and a user's own variants given as
`--variant NAME="--section.key VALUE ..."`.

Nothing heavy is imported here: `distill study --help` lists the variants from this module.
"""
from __future__ import annotations

import re
import shlex

TOKEN = ["--model.init_args.student.distilled", "true"]
NO_TOKEN = ["--model.init_args.student.distilled", "false"]
LOSS = "--model.init_args.loss."
MIXED = ["--data.mixup", "0.8", "--data.cutmix", "1.0"]  # DeiT's mixup and cutmix, one of them per batch
NO_CACHE = "--model.init_args.teacher_cache=null"  # a mixed image's logits are not the mix of the logits: live teacher
VARIANTS = {
    "none": [*NO_TOKEN, LOSS + "mode", "none"],
    "soft": [*NO_TOKEN, LOSS + "mode", "soft", LOSS + "tau", "3.0", LOSS + "alpha", "0.1", LOSS + "kl_reduction", "deit"],
    "hard": [*NO_TOKEN, LOSS + "mode", "hard", LOSS + "alpha", "0.5"],
    "token": [*TOKEN, LOSS + "mode", "hard", LOSS + "alpha", "0.5"],
    "dkd": [*TOKEN, LOSS + "mode", "dkd", LOSS + "tau", "4.0", LOSS + "alpha", "0.5", LOSS + "dkd_alpha", "1.0",
            LOSS + "dkd_beta", "8.0"],
    "dist": [*TOKEN, LOSS + "mode", "dist", LOSS + "tau", "4.0", LOSS + "alpha", "0.5"],
    "ls": [*TOKEN, LOSS + "mode", "soft", LOSS + "standardize", "true", LOSS + "tau", "2.0", LOSS + "alpha", "0.9"],
    "lg": [*TOKEN, LOSS + "mode", "hard", LOSS + "alpha", "0.5"],
    "lg_dkd": [*TOKEN, LOSS + "mode", "dkd", LOSS + "tau", "4.0", LOSS + "alpha", "0.5", LOSS + "dkd_alpha", "1.0",
               LOSS + "dkd_beta", "8.0"],
    "token_soft": [*TOKEN, LOSS + "mode", "soft", LOSS + "tau", "1.0", LOSS + "alpha", "0.5"],
    "cls_soft": [*NO_TOKEN, LOSS + "mode", "soft", LOSS + "tau", "1.0", LOSS + "alpha", "0.5"],
    "fm": [*NO_TOKEN, LOSS + "mode", "soft", LOSS + "tau", "1.0", LOSS + "alpha", "1.0", *MIXED, NO_CACHE],
    "none_mix": [*NO_TOKEN, LOSS + "mode", "none", *MIXED],
}
GUIDED = {"lg", "lg_dkd"}  # these add RECIPE/guidance.yaml (--config) to their overrides
DEIT_VARIANTS = ["none", "soft", "hard", "token"]
# What each one is, for `distill study --help` (the overrides themselves are listed next to it)
DESCRIPTIONS = {
    "none": "no distillation: a plain ViT, class token only",
    "soft": "usual (Hinton) distillation, no token: KL at tau 3, alpha 0.1, reduced as DeiT's code does",
    "hard": "hard distillation, no token: the class token learns from the teacher's labels too",
    "token": "DeiT: distillation token, hard distillation (alpha 0.5); reported per head and fused",
    "dkd": "token, DKD on the distillation head (Zhao et al. 2022; tau 4, TCKD 1, NCKD 8)",
    "dist": "token, DIST on the distillation head (Huang et al. 2022; tau 4)",
    "ls": "token, KL on standardised logits (Sun et al. 2024; tau 2, alpha 0.9)",
    "lg": "token (hard) plus feature guidance from the CNN (Li et al. 2022): RECIPE/guidance.yaml pairs the "
          "student blocks and teacher layers",
    "lg_dkd": "lg with DKD instead of hard distillation on the distillation head",
    "token_soft": "DeiT's token with the soft term (KL at tau 1, alpha 0.5), per head",
    "cls_soft": "token_soft's soft term (KL at tau 1, alpha 0.5) on the class token, no distillation token",
    "fm": "function matching (Beyer et al. 2022): no token, KL at tau 1 to the live teacher on the very mixed "
          "image the student sees, no ground-truth term (alpha 1); for long schedules",
    "none_mix": "no distillation with fm's mixup/cutmix (fm's fair baseline)",
}
# What goes in the table: (row label, variant, metric)
ROWS = [
    ("no distillation", "none", "val/acc"),
    ("soft distillation (tau 3, alpha 0.1), no token", "soft", "val/acc"),
    ("hard distillation, no token", "hard", "val/acc"),
    ("distillation token: class head", "token", "val/acc_cls"),
    ("distillation token: distillation head", "token", "val/acc_dist"),
    ("distillation token: both heads fused", "token", "val/acc"),
    ("token + DKD, fused", "dkd", "val/acc"),
    ("token + DIST, fused", "dist", "val/acc"),
    ("token + KL on standardised logits, fused", "ls", "val/acc"),
    ("token + feature guidance (hard), fused", "lg", "val/acc"),
    ("token + feature guidance + DKD, fused", "lg_dkd", "val/acc"),
    ("soft distillation (tau 1, alpha 0.5), no token", "cls_soft", "val/acc"),
    ("distillation token, soft (tau 1): class head", "token_soft", "val/acc_cls"),
    ("distillation token, soft (tau 1): distillation head", "token_soft", "val/acc_dist"),
    ("distillation token, soft (tau 1): both heads fused", "token_soft", "val/acc"),
    ("no distillation, mixup/cutmix", "none_mix", "val/acc"),
    ("function matching (KL at tau 1 only, mixup/cutmix, live teacher), no token", "fm", "val/acc"),
]
SHORT = {"cls_soft": "soft (tau 1)\nno token", "none_mix": "none\n+mixup", "fm": "function\nmatching", "none": "no\ndistillation", "soft": "soft (tau 3)\nno token",
         "hard": "hard\nno token", "dkd": "token\n+DKD", "dist": "token\n+DIST", "ls": "token\n+LS", "lg": "token\n+guidance",
         "lg_dkd": "token+guid.\n+DKD"}
PALETTE = {"none": "#999999", "soft": "#6baed6", "hard": "#3182bd", "token": "#fd8d3c", "dkd": "#74c476",
           "dist": "#31a354", "ls": "#9e9ac8", "lg": "#e6550d", "lg_dkd": "#a63603", "token_soft": "#fdae6b",
           "cls_soft": "#9ecae1", "fm": "#756bb1", "none_mix": "#636363"}
OWN_COLORS = ["#e377c2", "#17becf", "#bcbd22", "#8c564b", "#d62728", "#1f77b4"]  # a user's own variants, in turn
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


def variants_help() -> str:
    """Each built-in variant: what it is, and the overrides it adds to student.yaml."""
    import textwrap

    lines = []
    for name, args in VARIANTS.items():
        changes = " ".join(a.replace("--model.init_args.", "").replace("--", "") for a in args)
        if name in GUIDED:
            changes += " + RECIPE/guidance.yaml"
        indent = " " * 14
        lines += textwrap.wrap(DESCRIPTIONS[name], 100, initial_indent=f"  {name:<10}  ", subsequent_indent=indent)
        lines += textwrap.wrap(f"changes: {changes}", 100, initial_indent=indent, subsequent_indent=indent + "  ")
    return "\n".join(lines)


def parse_own_variants(specs: list[str] | None) -> dict[str, str]:
    """`--variant NAME=OVERRIDES` (repeatable) -> {NAME: OVERRIDES}, checked: a new name, overrides of the
    student step written as on the command line. One line per mistake."""
    own: dict[str, str] = {}
    for spec in specs or []:
        name, eq, overrides = spec.partition("=")
        name = name.strip()
        if not eq or not NAME.match(name):
            raise ValueError(f"cannot read --variant {spec!r}: write NAME=\"--section.key VALUE ...\" with a NAME of "
                             f"letters, digits and _ (e.g. --variant mine=\"--model.init_args.loss.alpha 0.3\")")
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} of --variant is a built-in one (distill study --help lists them); "
                             f"give yours another name")
        if name in own:
            raise ValueError(f"variant {name!r} is defined twice with --variant; give each variant its own name")
        own_args(name, overrides)  # refuses overrides that are not --key VALUE pairs
        own[name] = overrides.strip()
    return own


def own_args(name: str, overrides: str) -> list[str]:
    """The student-step arguments of a variant defined as `--variant NAME=OVERRIDES`: `--student.KEY` is
    the same as `--KEY`; a `--teacher.KEY` is refused, since a variant changes the student only."""
    try:
        tokens = shlex.split(overrides)
    except ValueError as e:
        raise ValueError(f"variant {name!r}: cannot read its overrides ({e}); quote them as one argument") from None
    if not tokens:
        raise ValueError(f"variant {name!r} has no overrides; write --variant {name}=\"--section.key VALUE ...\"")
    args, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        key, eq, value = token.partition("=")
        if not key.startswith("--") or len(key) < 3:
            raise ValueError(f"variant {name!r}: {token!r} is not an override; write --section.key VALUE")
        if key.startswith("--teacher."):
            raise ValueError(f"variant {name!r}: {key} changes the teacher; a variant changes the student only "
                             f"(give --teacher.KEY VALUE to the whole study instead)")
        key = "--" + key[len("--student."):] if key.startswith("--student.") else key
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"variant {name!r}: {key} has no value; write {key} VALUE")
            value, i = tokens[i + 1], i + 1
        args += [key, value]
        i += 1
    return args


def rows_of(own: dict[str, str]) -> list[tuple[str, str, str]]:
    """The table's rows: the built-in ones, then one per own variant (its fused val/acc)."""
    return [*ROWS, *((f"{name} ({overrides})", name, "val/acc") for name, overrides in own.items())]


def color_of(variant: str, own: dict[str, str]) -> str:
    if variant in PALETTE:
        return PALETTE[variant]
    names = list(own)
    return OWN_COLORS[names.index(variant) % len(OWN_COLORS)] if variant in names else "#444444"
