"""YAML configs with presets and ``--key value`` overrides.

An experiment's ``config.yaml`` has a ``base`` mapping and a ``presets`` mapping whose entries
(``faithful``, ``corrected``) overlay ``base``. Command-line overrides use dotted keys
(``--sae.l1_coeff 0.5``); values are parsed as YAML so numbers, lists and booleans just work.
Only keys that already exist can be overridden: a typo is an error, never a silent no-op.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import yaml

from .errors import UserError, require
from .io import write_yaml

PRESETS = ("faithful", "corrected")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--a.b", "1", "--c=x"]`` -> ``{"a.b": 1, "c": "x"}``; dashes in names become underscores."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        require(arg.startswith("--") and len(arg) > 2, f"unexpected argument '{arg}'; overrides look like --key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            require(i + 1 < len(args), f"override '{arg}' has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        overrides[key.replace("-", "_")] = parse_value(raw)
    return overrides


def parse_value(raw: str) -> Any:
    """YAML scalars, plus what PyYAML's YAML 1.1 leaves as a string: ``1e-3`` is a float."""
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(sorted(_flat_keys(cfg)))
            raise UserError(f"unknown config key '{key}'; known keys: {known}")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def get_dotted(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def load_config(path: str | os.PathLike, preset: str = "faithful", overrides: dict[str, Any] | None = None) -> dict:
    """Resolve ``base`` + preset + overrides from an experiment config file."""
    require(preset in PRESETS, f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    path = Path(path)
    require(path.is_file(), f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    require(isinstance(raw, dict) and "base" in raw, f"config file {path} needs a 'base' mapping")
    cfg = deep_merge(raw["base"], (raw.get("presets") or {}).get(preset) or {})
    cfg["preset"] = preset
    for key, value in (overrides or {}).items():
        set_dotted(cfg, key, value)
    return cfg


def freeze_run_config(run_dir: str | os.PathLike, cfg: dict) -> dict:
    """Save the resolved config with the run, or check it against the one already there.

    Resuming a run with different settings would silently mix two experiments in one folder, so a
    difference is an error that names the keys.
    """
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        saved = yaml.safe_load(path.read_text()) or {}
        saved_flat, new_flat = flatten(saved), flatten(cfg)
        diff = sorted(k for k in set(saved_flat) | set(new_flat) if saved_flat.get(k) != new_flat.get(k))
        require(not diff, f"{path} was made with other settings ({', '.join(diff)}); "
                          f"use a new --out or the same settings to resume")
        return saved
    write_yaml(path, cfg)
    return cfg


class Config(Mapping):
    """A resolved, checked config, read-only, read by attribute: ``cfg.train.lr``, ``cfg.sae.d_sae``.

    Sections are Configs themselves; a name the config does not have is an error naming the
    dotted key (a typo in a recipe fails on its first read instead of reading a default). It is
    also a read-only mapping (``cfg["train"]["lr"]``, ``"hook" in cfg``, ``cfg.get(...)``) for
    blocks that take any mapping; :meth:`to_dict` gives plain dicts back (to write or to edit)."""

    __slots__ = ("_values", "_where")

    def __init__(self, values: Mapping, where: str = ""):
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_values", {key: Config(value, f"{where}{key}.") if isinstance(value, Mapping) else value
                                             for key, value in values.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the config has no key '{self._where}{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the config is read-only (tried to set '{self._where}{name}'); change config.yaml or "
                             f"pass --{self._where}{name} VALUE to run.sh")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def __reduce__(self):                     # pickling (worker processes) and copy.deepcopy
        return Config, (self.to_dict(), self._where)

    def to_dict(self) -> dict:
        return {key: value.to_dict() if isinstance(value, Config) else copy.deepcopy(value)
                for key, value in self._values.items()}


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The run's resolved ``config.yaml`` (written and checked by ``python -m common.runs``)."""
    path = Path(run_dir) / "config.yaml"
    require(path.is_file(), f"no config.yaml in {run_dir}; start the run with run.sh (or the stage's --init) first")
    raw = yaml.safe_load(path.read_text())
    require(isinstance(raw, dict), f"{path} is not a resolved run config (not a mapping)")
    return Config(raw)


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: every leaf of a nested config under its dotted key."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
