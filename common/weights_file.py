"""Pretrained weights from a file (offline clusters): a state dict read with one-line errors.

Both large experiments take ``--model.weights PATH``: CIFAR-10 a ViT state dict, ImageNet timm
weights. Whatever the file holds, a wrong one stops with one ``error:`` line that says what it is,
and an architecture mismatch names the keys that differ.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError, require


def read_state_dict(path: Path, unwrap: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (``.safetensors``, or a ``torch.save`` file read with
    ``weights_only``); a checkpoint that keeps it under one of ``unwrap`` (the first present wins,
    e.g. ``{"model": state_dict}``) is unwrapped. A missing file, a file that is not a tensor file,
    or one that holds something other than a mapping of names to tensors is one error line."""
    path = Path(path)
    require(path.is_file(), f"model.weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a tensor file: pickle, zip and safetensors each raise their own kind
        raise UserError(f"model.weights {path} is not a state-dict file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else 'unreadable'})") from None
    if isinstance(state, dict):
        key = next((k for k in unwrap if isinstance(state.get(k), dict)), None)
        state = state[key] if key is not None else state
    require(isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()),
            f"model.weights {path} is not a state dict (a mapping of parameter names to tensors, as "
            f"model.state_dict() saves it) but a {type(state).__name__}")
    return state


def mismatch(err: Exception, limit: int = 300) -> str:
    """The lines of ``load_state_dict``'s error that name the keys (missing, unexpected, size mismatch)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    problems = lines[1:] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines
    return "; ".join(problems)[:limit] or type(err).__name__
