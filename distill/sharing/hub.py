"""`distill push DIR --repo ORG/NAME [--private]`: uploads a folder written by `distill export
--format hf` to the Hugging Face Hub with huggingface_hub (`create_repo`, then `upload_folder`), after
which anyone loads it with `timm.create_model("hf-hub:ORG/NAME", pretrained=True)`.

Everything that can be checked is checked before anything is sent: the folder (config.json naming an
architecture, model.safetensors, README.md), the repository id, a token (HF_TOKEN or `hf auth
login`), HF_HUB_OFFLINE, and that the Hub answers a connection. Each failure is one line and exit
code 2. The upload is a single commit, so its files land together or not at all. The card's load
line names the repository (`hf-hub:ORG/NAME` is replaced by the real id, in the folder's README.md).

Only the files an export writes (`distill.sharing.hf_export.EXPORT_FILES`) are uploaded: a folder
may also hold a .git, notes or checkpoints that are not meant for the Hub. The others are named in
one line (`Pushed.left_out`), not sent.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

# Nothing heavy at import: `distill push --help` loads neither torch nor huggingface_hub.

REQUIRED = ("config.json", "model.safetensors", "README.md")


@dataclass
class Pushed:
    """What `push` did: the repository's URL, the files uploaded, the folder's other entries left out."""

    url: str
    uploaded: list[str]
    left_out: list[str]

    def left_out_line(self) -> str | None:
        if not self.left_out:
            return None
        return (f"push: left out {', '.join(self.left_out)} (not written by `distill export`; only its files are "
                f"uploaded)")


def upload_plan(folder: Path) -> tuple[list[str], list[str]]:
    """(the export's files in `folder`, to upload; every other entry, a folder marked with a trailing /)."""
    from .hf_export import EXPORT_FILES

    names = sorted(p.name for p in folder.iterdir())
    uploaded = [n for n in names if n in EXPORT_FILES and (folder / n).is_file()]
    left_out = [f"{n}/" if (folder / n).is_dir() else n for n in names if n not in uploaded]
    return uploaded, left_out


def check_folder(folder: str | os.PathLike) -> Path:
    """The folder, if it is a complete export (config.json with an architecture, weights, card)."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"push: {str(path)!r} is not a folder; give the folder `distill export --format hf` wrote")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"push: {str(path)!r} has no {', '.join(missing)}; write it with "
                                f"`distill export CKPT --format hf --out {path}`")
    try:
        arch = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architecture")
    except ValueError as e:
        raise ValueError(f"push: {path / 'config.json'} is not valid JSON ({e})") from None
    if not arch:
        raise ValueError(f"push: {path / 'config.json'} names no architecture; re-export the folder")
    return path


def _name_repo_in_card(folder: Path, repo_id: str) -> None:
    """The card's `hf-hub:ORG/NAME` placeholder becomes `hf-hub:<repo_id>` (written atomically)."""
    from .model_card import HUB_PLACEHOLDER

    card = folder / "README.md"
    text = card.read_text(encoding="utf-8")
    named = text.replace(f"hf-hub:{HUB_PLACEHOLDER}", f"hf-hub:{repo_id}")
    if named != text:
        tmp = card.with_name(card.name + ".tmp")
        tmp.write_text(named, encoding="utf-8")
        tmp.replace(card)


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str = "Add model (distill export --format hf)") -> Pushed:
    """Uploads the export files of `folder` to the Hub model repository `repo_id` (created if needed)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..models.sources import _hub_offline, hub_reachable

    path = check_folder(folder)
    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it needs an owner")
    except HFValidationError as e:
        raise ValueError(f"push: --repo {repo_id!r} is not a Hub repository id ({str(e).splitlines()[0]}); "
                         f"use ORG/NAME (your user or organisation, then the model's name)") from None
    token = token or get_token()
    if not token:
        raise PermissionError("push: no Hugging Face token; set HF_TOKEN or run `hf auth login` (a token with write "
                              "access), then push again")
    if _hub_offline():
        raise ConnectionError("push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it where there is "
                              "network and push again")
    ok, reason = hub_reachable()
    if not ok:
        raise ConnectionError(f"push: the Hugging Face Hub cannot be reached ({reason}); nothing was uploaded, push "
                              f"again where there is network")
    api = HfApi(token=token, library_name="distill")
    _name_repo_in_card(path, repo_id)
    uploaded, left_out = upload_plan(path)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # exact names: huggingface_hub matches patterns against paths relative to the folder, so nothing
        # in a subfolder and no other top-level file matches
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(path), repo_type="model", commit_message=commit_message,
                          allow_patterns=uploaded)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if status in (401, 403):
            raise PermissionError(f"push: the Hub refused the token for {repo_id} ({detail}); use a token with "
                                  f"write access to that namespace") from None
        raise ValueError(f"push: the Hub refused the upload to {repo_id} ({detail})") from None
    except OSError as e:  # connection dropped, DNS, timeouts (httpx's errors are OSErrors or wrap them)
        raise ConnectionError(f"push: the upload to {repo_id} failed ({type(e).__name__}: {e}); a Hub commit is "
                              f"all or nothing, push again") from None
    except Exception as e:  # noqa: BLE001 - httpx transport errors that are not OSErrors
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise ConnectionError(f"push: the upload to {repo_id} failed ({type(e).__name__}: {e}); a Hub commit is "
                                  f"all or nothing, push again") from None
        raise
    return Pushed(str(repo), uploaded, left_out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distill push", description=(
        "Upload a folder written by `distill export --format hf` to the Hugging Face Hub "
        "(needs a token: HF_TOKEN or `hf auth login`)."))
    parser.add_argument("folder", help="the export folder (config.json, model.safetensors, README.md)")
    parser.add_argument("--repo", required=True, help="Hub repository id, ORG/NAME (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    args = parser.parse_args(argv)
    pushed = push(args.folder, args.repo, private=args.private)
    print(f"pushed {', '.join(pushed.uploaded)} of {args.folder} to {pushed.url}")
    if pushed.left_out_line():
        print(pushed.left_out_line())
    print(f'load: timm.create_model("hf-hub:{args.repo}", pretrained=True)')
    return 0
