"""How several processes share one study (`distill study` started once per core): a run is claimed by
a file next to its folder, RUNS/<run>.running, holding the claiming process's pid, start time and boot id
(so a claim outlives neither its process nor a restart of the machine); looking at a claim and writing
one happen under the study's RUNS/claims.lock, and results.json is read and replaced under
OUT/results.json.lock.

The file formats are those tools/reproduce.py has always written: a study started by it is shared and
resumed by `distill study` as it is.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); None when no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""  # alive, start time unknown (no /proc)
    return stat.rsplit(")", 1)[1].split()[19]


def _me() -> dict:
    return {"pid": os.getpid(), "start": _start_time(os.getpid()), "boot": _boot_id()}


def claim_owner(claim: Path) -> str:
    try:
        text = claim.read_text().strip()
        return str(json.loads(text)["pid"]) if text.startswith("{") else text
    except (OSError, ValueError, KeyError):
        return "?"


def claim_alive(claim: Path) -> bool:
    """True while the process that wrote CLAIM runs: same boot, same pid, same start time (a pid reused
    after its process died, or a claim from before a restart, is dead; so is a claim in this process's
    name written by an earlier process with the same pid)."""
    try:
        text = claim.read_text().strip()
    except OSError:
        return False
    try:
        owner = json.loads(text) if text.startswith("{") else {"pid": int(text or 0)}
        pid = int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if "boot" in owner and owner["boot"] != _boot_id():
        return False
    start = _start_time(pid)
    if start is None:
        return False
    if "start" in owner:
        return owner["start"] == start or start == ""
    return pid != os.getpid()  # an old plain-pid claim: alive unless it names this very process


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def claims_lock(folder: Path):
    """One lock for every claim of a study: look, take over and write happen as one step."""
    return _locked(folder / "claims.lock")


def results_lock(study: Path):
    """The lock under which a process reads, merges and replaces OUT/results.json."""
    return _locked(study / "results.json.lock")


def release(claim: Path) -> None:
    with claims_lock(claim.parent):
        if claim_owner(claim) == str(os.getpid()):
            claim.unlink(missing_ok=True)


def claim_run(claim: Path) -> bool:
    """Marks a run as taken by this process (CLAIM holds its pid, start time and boot id), so that two
    processes sharing a study never run, or delete, the same run. A claim whose process has died is taken
    over. Look and write happen under the study's claims lock, so two workers restarted together cannot
    both take over one dead claim."""
    with claims_lock(claim.parent):
        if claim.exists() and claim_alive(claim):
            return False
        tmp = claim.with_name(f".{claim.name}.{os.getpid()}")
        tmp.write_text(json.dumps(_me()))
        os.replace(tmp, claim)
        return True
