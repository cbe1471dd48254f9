"""Model weights as safetensors plus a JSON sidecar with metadata.

The sidecar is written last and records the weight file's size, so it doubles as the "this
checkpoint is complete" marker; a truncated, corrupt or mismatched checkpoint is reported in one
line instead of a deep traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError, require
from .io import atomic_path, read_json, write_json


def sidecar(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(sidecar(path), {**meta, "file_bytes": path.stat().st_size})


def save_module(path: str | os.PathLike, module: nn.Module, meta: dict[str, Any] | None = None) -> None:
    save_state(path, module.state_dict(), meta or {})


def checkpoint_exists(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and sidecar(path).is_file()


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    require(path.is_file(), f"checkpoint {path} not found")
    require(sidecar(path).is_file(), f"checkpoint {path} has no metadata file {sidecar(path).name}; it was not "
                                     f"finished, delete it and rerun the stage that writes it")
    meta = read_json(sidecar(path))
    require(meta.get("file_bytes") == path.stat().st_size,
            f"checkpoint {path} is corrupt (size differs from its metadata); delete it and rerun")
    return meta


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    meta = load_meta(path)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is corrupt ({err}); delete it and rerun") from None
    return state, meta


def load_module(path: str | os.PathLike, module: nn.Module, device: str | torch.device = "cpu") -> dict:
    """Load weights into ``module`` (strict); returns the metadata."""
    state, meta = load_state(path, device)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape differs for {', '.join(wrong[:3])}" if wrong else "") if part)
        raise UserError(f"checkpoint {path} does not match the {type(module).__name__} being built ({detail})")
    module.load_state_dict(state)
    return meta
