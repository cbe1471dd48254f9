"""Run stage scripts one after another in one Python process, each as ``python SCRIPT ARGS`` would
run it, without paying the interpreter and torch start-up (~2.5 s) again for every stage.

    python -m common.lane [--watch PID] -- 'SCRIPT ARG ...' '@after PATH' 'SCRIPT ARG ...'

Each item is one shell-quoted command line: a script and its arguments; ``@init ARG ...`` (the
run's init, ``python -m common.runs ARG ...``, sharing the lane's start-up); ``@import MODULE``
(imports it now: torch while the lane waits anyway); ``@touch PATH`` (creates PATH: a signal to
another lane); or ``@after PATH``, which waits until PATH exists (a stage
marker that another lane writes) and, for a ``.done`` marker, stands for a finished stage that is
current (its outputs intact and the stages it was built from unchanged: a marker left by an earlier
run that the other lane is about to redo does not count); when the process ``--watch PID`` has
ended and PATH has not appeared, the lane stops with status 1. A stage that fails stops the lane
with its own exit status and message, as it would in its own process. Every stage seeds what it draws, so running after
other stages in the same interpreter gives the same results (tests/test_mnist.py checks a resumed
run against an uninterrupted one).
"""
from __future__ import annotations

import argparse
import importlib
import os
import runpy
import shlex
import sys
import time
from pathlib import Path

from .errors import cli_main, require
from .runs import Stage, init_run


def run_script(script: str, args: list[str]) -> None:
    """``python script args`` in this interpreter: the script's folder first on sys.path, its argv."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ready(path: Path) -> bool:
    return Stage.from_marker(path).done() if path.name.endswith(".done") else path.exists()


def wait_for(path: Path, watch: int | None, poll: float = 0.5) -> None:
    while not _ready(path):
        if watch is not None and not _alive(watch) and not _ready(path):
            sys.exit(1)            # the lane that was to write it has stopped (and said why)
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=int, help="PID of the process whose markers '@after' waits for")
    parser.add_argument("items", nargs="+", help="'SCRIPT ARG ...' or '@after PATH', each one shell-quoted word")
    args = parser.parse_args(argv)
    for item in args.items:
        words = shlex.split(item)
        if not words:
            continue
        if words[0] == "@after":
            require(len(words) == 2, f"lane item {item!r}: '@after' takes one path")
            wait_for(Path(words[1]), args.watch)
        elif words[0] == "@touch":
            require(len(words) == 2, f"lane item {item!r}: '@touch' takes one path")
            Path(words[1]).touch()
        elif words[0] == "@import":
            require(len(words) == 2, f"lane item {item!r}: '@import' takes one module name")
            importlib.import_module(words[1])
        elif words[0] == "@init":
            init_run(words[1:])      # a bad setting is its one error line, and the lane's exit status 2
        else:
            require(Path(words[0]).is_file(), f"lane item {item!r}: no script {words[0]}")
            run_script(words[0], words[1:])


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
