"""Bad input ends a command with one line that names the problem and the fix, not a traceback.

Set DISTILL_DEBUG=1 to see the full traceback instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

# Errors that come from what the user gave (a recipe field, a path, a file), not from a bug.
# ConnectionError: no network where a command needs it (`distill push`), not a bug either.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, NotADirectoryError, PermissionError,
               ConnectionError, argparse.ArgumentError)

# jsonargparse explains a failed Union by listing every alternative it tried; only the real complaint
# matters to the user.
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Expected a <class 'NoneType'>|"
    r"Given value type:|Given value:|Problem with given class_path)"
)


def one_line(error: BaseException) -> str:
    """The message of `error` condensed to one line."""
    lines = [line.strip().lstrip("- ").strip() for line in str(error).strip().splitlines()]
    kept, key = [], None
    for line in lines:
        match = re.match(r'^Parser key "([^"]+)":\s*(.*)$', line)
        if match:
            key = key or match.group(1)
            line = match.group(2)
        if line and not _NOISE.match(line):
            kept.append(line)
    message = "; ".join(dict.fromkeys(kept)) or type(error).__name__
    if isinstance(error, argparse.ArgumentError) and "not accepted" in message:
        message += " (run with --help to list the accepted fields)"
    return f"{key}: {message}" if key and not message.startswith(key) else message


def run_guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except USER_ERRORS as e:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        print(f"distill: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
