"""Run directories, resumable stages and the shared command line of stage scripts.

Layout: ``<run>/config.yaml`` (resolved once, checked on resume) and ``<run>/seed_<s>/cycle_<k>/``
with that cycle's artifacts. A stage writes its outputs atomically and then a ``<stage>.done``
marker listing them with their sizes and the tokens of the stages it was built from; a stage whose
marker and outputs are intact, and whose inputs' stages have not finished again since, is skipped,
so rerunning an interrupted command resumes after the last finished stage, and rerunning an
earlier stage makes everything built on it run again.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from .config import Config, freeze_run_config, load_config, load_run_config, parse_overrides
from .errors import UserError, cli_main, require
from .io import read_json, remove_interrupted_writes, write_json


def cycle_dir(run_dir: str | os.PathLike, seed: int, cycle: int) -> Path:
    return Path(run_dir) / f"seed_{seed}" / f"cycle_{cycle}"


class Stage:
    """``stage = Stage(dir, "train", after=[...]); if stage.done(): return; ...; stage.finish([outputs])``.

    ``after``: the stages whose outputs this one is built from. Each finished stage gets a fresh
    token; a marker records the tokens of its ``after`` stages, so once one of them has finished
    again (rerun on other inputs) this stage, and everything built on it, counts as not done.
    """

    def __init__(self, directory: str | os.PathLike, name: str, after: Sequence["Stage"] = ()):
        self.directory = Path(directory)
        self.name = name
        self.after = list(after)
        self.marker = self.directory / f"{name}.done"
        self.started = time.time()

    def _record(self) -> dict | None:
        if not self.marker.is_file():
            return None
        try:
            record = read_json(self.marker)
        except UserError:
            return None
        return record if isinstance(record, dict) and isinstance(record.get("outputs"), dict) else None

    @classmethod
    def from_marker(cls, marker: str | os.PathLike, _made: dict | None = None) -> "Stage":
        """The stage a ``<name>.done`` file stands for, with the stages its marker recorded as its
        inputs (for code that knows only the path, e.g. a lane waiting for another lane's stage)."""
        made = {} if _made is None else _made
        marker = Path(os.path.normpath(marker))
        if marker not in made:
            stage = made[marker] = cls(marker.parent, marker.name[:-len(".done")])
            recorded = (stage._record() or {}).get("after")
            stage.after = [cls.from_marker(marker.parent / rel, made) for rel in recorded] \
                if isinstance(recorded, dict) else []
        return made[marker]

    def token(self) -> str | None:
        record = self._record()
        return None if record is None else record.get("token")

    def _key(self, other: "Stage") -> str:
        return os.path.relpath(other.marker, self.directory)

    def done(self, _seen: dict | None = None) -> bool:
        seen = {} if _seen is None else _seen      # shared stages of the dependency graph are checked once
        if self.marker not in seen:
            seen[self.marker] = self._done(seen)
        return seen[self.marker]

    def _done(self, seen: dict) -> bool:
        record = self._record()
        if record is None:
            return False
        try:
            intact = all((self.directory / rel).is_file() and (self.directory / rel).stat().st_size == size
                         for rel, size in record["outputs"].items())
        except (TypeError, AttributeError):
            return False
        recorded = record.get("after")
        if not intact or recorded is None:   # markers written before stages recorded their inputs: trusted
            return intact
        return all(isinstance(recorded, dict) and recorded.get(self._key(stage)) == stage.token()
                   and stage.done(seen) for stage in self.after)

    def finish(self, outputs: list[str | os.PathLike], **info) -> None:
        sizes = {}
        for out in outputs:
            out = Path(out)
            rel = out.relative_to(self.directory) if out.is_absolute() else out
            sizes[str(rel)] = (self.directory / rel).stat().st_size
        write_json(self.marker, {"outputs": sizes, "seconds": round(time.time() - self.started, 3),
                                 "token": uuid.uuid4().hex,
                                 "after": {self._key(stage): stage.token() for stage in self.after}, **info})

    def require_done(self, what_to_run: str) -> None:
        require(self.done(), f"{self.directory} has no finished '{self.name}' stage (or its outputs, or the stages "
                             f"it was built from, changed since); {what_to_run}")


class StageGraph:
    """Which stage is built from which, for every experiment: ``{stage: [(cycle offset, stage), ...]}``.

    Offset 0 is a stage of the same cycle directory, -1 one of the previous cycle (``cycle_<k-1>``
    beside it). Cycle 0 has no previous cycle, and a directory that is not a cycle (MNIST's
    ``random_targets``) has only same-directory inputs. :meth:`stage` returns the :class:`Stage`
    with its inputs attached (recursively: a rerun of any of them makes it stale); :meth:`missing`
    names the first input that has not finished.
    """

    def __init__(self, requires: dict[str, Sequence[tuple[int, str]]]):
        unknown = sorted({name for needs in requires.values() for _, name in needs} - set(requires))
        require(not unknown, f"stage graph names stages it does not define: {', '.join(unknown)}")
        self.requires = {name: list(needs) for name, needs in requires.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.requires)

    def stage(self, directory: str | os.PathLike, name: str, _memo: dict | None = None) -> Stage:
        """Stage ``name`` of ``directory`` (``.../cycle_<k>`` or any other folder) with its inputs;
        stages where the graph joins are shared objects."""
        require(name in self.requires, f"unknown stage '{name}'; choose from {', '.join(self.requires)}")
        memo = {} if _memo is None else _memo
        directory = Path(directory)
        if (directory, name) not in memo:
            cycle = cycle_of(directory)
            after = []
            for offset, needed in self.requires[name]:
                if offset == 0:
                    after.append(self.stage(directory, needed, memo))
                elif cycle is not None and cycle + offset >= 0:
                    after.append(self.stage(directory.with_name(f"cycle_{cycle + offset}"), needed, memo))
            memo[(directory, name)] = Stage(directory, name, after)
        return memo[(directory, name)]

    @staticmethod
    def missing(stage: Stage) -> Stage | None:
        """The first stage ``stage`` is built from that has not finished (or is stale), else None."""
        return next((needed for needed in stage.after if not needed.done()), None)


def cycle_of(directory: str | os.PathLike) -> int | None:
    """k of a ``cycle_<k>`` directory; None for any other folder."""
    name = Path(directory).name
    number = name[len("cycle_"):]
    return int(number) if name.startswith("cycle_") and number.isdigit() else None


def stage_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every stage script takes; anything else is a config override."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run-dir", required=True, help="run directory (holds config.yaml)")
    parser.add_argument("--seed", type=int, default=42, help="random seed of this replicate")
    parser.add_argument("--cycle", type=int, default=0, help="SAE-ception cycle k (0 = baseline)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--data-root", default=default_data_root(), help="dataset root (default $SAE_CEPTION_DATA or ./data)")
    return parser


def default_data_root() -> str:
    return os.environ.get("SAE_CEPTION_DATA", "./data")


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    args, rest = parser.parse_known_args(argv)
    require(not rest, f"unexpected arguments {' '.join(rest)}; stage scripts read settings from "
                      f"{args.run_dir}/config.yaml (pass overrides to run.sh / init)")
    require(args.cycle >= 0, f"cycle must be >= 0, got {args.cycle}")
    cfg = load_run_config(args.run_dir)
    return args, cfg


def init_run(argv: list[str] | None = None) -> None:
    """``python -m common.runs --config X/config.yaml --preset P --out DIR [--key value ...]``."""
    parser = argparse.ArgumentParser(description="Resolve an experiment config into a run directory.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--preset", default="faithful")
    parser.add_argument("--out", required=True)
    args, rest = parser.parse_known_args(argv)
    out = Path(args.out)
    require(not out.exists() or out.is_dir(), f"--out {out} is a file, not a run directory; choose another --out")
    cfg = load_config(args.config, args.preset, parse_overrides(rest))
    validate = experiment_validator(Path(args.config))
    if validate is not None:
        validate(cfg)
    if out.is_dir():  # a resumed run: what a killed stage was writing is not an output (its stage reruns)
        removed = remove_interrupted_writes(out)
        if removed:
            print(f"removed {removed} temporary file(s) of writes an interruption cut short")
    freeze_run_config(args.out, cfg)
    print(f"run directory {args.out} ({args.preset})")


def experiment_validator(config_path: Path):
    """An experiment may ship ``validate.py`` with ``validate(cfg)`` next to its config; it gets the
    resolved config as a read-only :class:`~common.config.Config`, as the stages read it."""
    module_path = config_path.parent / "validate.py"
    if not module_path.is_file():
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"validate_{config_path.parent.name}", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    validate = getattr(module, "validate", None)
    return None if validate is None else (lambda cfg: validate(Config(cfg)))


if __name__ == "__main__":
    cli_main(init_run, sys.argv[1:])
