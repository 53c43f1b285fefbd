"""Checkpoint and weights files as both steps and the pretrained weights read them: the kind of a
checkpoint (teacher or student), reading one without running pickled code, its sha256, and a Lightning
checkpoint split into a state_dict and its hyper-parameters."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

TEACHER_KIND = "teacher"
STUDENT_KIND = "student"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint or state_dict without executing code: safetensors, or torch.load with
    `weights_only=True` (a pickle that would run code is refused by torch and reported here)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupted file
            raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise ValueError(
                f"checkpoint {str(path)!r} holds pickled objects that could run code and was refused "
                f"(weights_only=True): {msg}. Save a plain state_dict or safetensors instead"
            ) from None
        raise ValueError(f"checkpoint {str(path)!r} is corrupted or not a torch checkpoint ({msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    return obj


def split_checkpoint(obj: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict of the submodule under `prefix`, hyper-parameters) from a Lightning checkpoint of this
    toolkit, or (the dict itself, {}) from a plain state_dict."""
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        hparams = dict(obj.get("hyper_parameters") or {})
        sd = obj["state_dict"]
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return sd, hparams
    if "model" in obj and isinstance(obj["model"], dict):  # DeiT/timm training scripts
        return obj["model"], {}
    return obj, {}
