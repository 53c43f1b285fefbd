"""`distill study`, under the name studies were started with before it was part of the package:
`python tools/reproduce.py ARGS` is `distill study ARGS` (same arguments, same study folders, same
exit codes). See `distill study --help`.

    python tools/reproduce.py recipes/digits --seeds 3 --out results/digits
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from distill.commands.main import main as distill

    return distill(["study", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
