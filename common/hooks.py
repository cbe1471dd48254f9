"""Activation capture: a forward hook on a named module plus a selector.

The same hook serves two purposes: extraction (``detach=True``: a detached copy per batch) and
fine-tuning (``detach=False``: the live tensor, so the auxiliary loss back-propagates into the
model). Selectors pick the part of the module output that is the hooked representation, e.g.
token 0 of a ViT encoder output, or the whole output of a flatten layer.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import UserError

Selector = Callable[[torch.Tensor], torch.Tensor]

SELECTORS: dict[str, Selector] = {
    "identity": lambda out: out,
    "cls_token": lambda out: out[:, 0],  # (B, tokens, width) -> (B, width)
    "flatten": lambda out: out.flatten(1),
}


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UserError(f"model {type(model).__name__} has no module '{name}' to hook") from None


class ActivationCapture:
    """Context manager: ``with ActivationCapture(model, "encoder", "cls_token") as cap: model(x); cap.value``."""

    def __init__(self, model: nn.Module, module_name: str, selector: str | Selector = "identity",
                 detach: bool = True):
        self.module = get_module(model, module_name)
        if isinstance(selector, str):
            if selector not in SELECTORS:
                raise UserError(f"unknown selector '{selector}'; choose one of {', '.join(SELECTORS)}")
            selector = SELECTORS[selector]
        self.selector = selector
        self.detach = detach
        self.value: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, inputs, output) -> None:
        selected = self.selector(output)
        self.value = selected.detach() if self.detach else selected

    def __enter__(self) -> "ActivationCapture":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pop(self) -> torch.Tensor:
        """The activation of the last forward pass (and forget it, so a stale value is never reused)."""
        if self.value is None:
            raise RuntimeError("no forward pass went through the hooked module")
        value, self.value = self.value, None
        return value
