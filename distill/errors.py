"""Bad input ends a command with one line that names the problem and the fix, not a traceback.

Set DISTILL_DEBUG=1 to see the full traceback instead.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

# Errors that come from what the user gave (a recipe field, a path, a file), not from a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, KeyError, NotADirectoryError, PermissionError)


def run_guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except USER_ERRORS as e:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"distill: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
