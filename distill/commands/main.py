"""The `distill` command.

    distill fit|validate|test|predict --config RECIPE.yaml [--dotted.overrides ...]   (LightningCLI)
    distill pipeline RECIPE_DIR [--out DIR] [--teacher_ckpt PATH] [--dotted.overrides ...]
    distill study RECIPE_DIR [--variants NAME...] [--variant NAME="OVERRIDES"] [--seeds N] [--out DIR] [--report]
    distill export CKPT --format safetensors|onnx|hf --head cls|dist|fused --out FILE_OR_DIR
    distill push DIR --repo ORG/NAME [--private]
    distill attention CKPT IMAGE_OR_FOLDER... --out DIR
    distill predict CKPT IMAGE_OR_FOLDER... [--teacher CKPT] [--topk K] [--format table|json|csv]
"""
from __future__ import annotations

import sys

# Nothing heavy is imported here, so `distill --help` and `distill pipeline --help` answer at once:
# Lightning (distill/commands/recipe_cli.py) and each subcommand's module load only when they run.

TOOLS = {
    "pipeline": "distill.commands.pipeline",
    "study": "distill.commands.study",
    "export": "distill.commands.export",
    "push": "distill.sharing.hub",
    "attention": "distill.commands.attention",
}


def _dispatch(argv: list[str]) -> int | None:
    """Runs the toolkit's own subcommands; None when argv is a LightningCLI one."""
    if not argv:
        return None
    cmd = argv[0]
    if cmd == "predict" and not {"-c", "--config"} & {a.split("=")[0] for a in argv[1:]}:
        cmd_module = "distill.commands.predict"  # `distill predict CKPT IMAGES...`; `distill predict --config` is Lightning's
    elif cmd in TOOLS:
        cmd_module = TOOLS[cmd]
    else:
        return None
    import importlib

    return int(importlib.import_module(cmd_module).main(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_guarded

    args = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        if not args or args[0] in ("-h", "--help"):
            from .pipeline import shipped_recipes

            print(__doc__.strip())
            print("\nEach command takes --help. Recipes: recipes/<dataset>/{teacher,student}.yaml; "
                  "`distill fit --help` lists every recipe field.")
            recipes = shipped_recipes()
            if recipes.is_dir():
                names = sorted(p.name for p in recipes.iterdir() if p.is_dir())
                print(f"Shipped recipes (`distill pipeline NAME` takes a name): {', '.join(names)}, in {recipes}")
            return 0 if args else 2
        code = _dispatch(args)
        if code is None:
            from ..training.lineage import finish_wandb
            from .recipe_cli import DistillCLI

            try:
                DistillCLI(args=argv)  # None: LightningCLI reads sys.argv itself
            finally:
                finish_wandb()
            code = 0
        return code

    return run_guarded(run)


def __getattr__(name: str):
    # `from distill.cli import DistillCLI` (its former home) still works; it loads Lightning only then.
    if name in ("DistillCLI", "RecipeConfigCallback", "WandbOptions"):
        from . import recipe_cli

        return getattr(recipe_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())
