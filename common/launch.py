"""The command line of every experiment's ``run.sh``, parsed once (here), and the plan it runs.

    python -m common.launch EXPERIMENT [--preset faithful|corrected] [--seeds N] [--data-root DIR]
        [--out DIR] [--device auto|cpu|cuda] [--nproc-per-node N] [--nnodes N --node-rank R
        --rdzv-endpoint HOST:PORT] [--jobs 1|2] [--smoke] [--preflight [--preflight-steps N]] [--dry-run]
        [--key value ...]

``EXPERIMENT/run.sh`` is this command (``run.sh --help`` prints its header), with the experiment's
stage table first (``--stage-table TABLE``, run.sh's own: see :func:`parse_stage_table`). Every
other ``--key value`` (or ``--key=value``) is a config override, read by
:func:`common.config.parse_overrides`. ``--dry-run`` prints the plan (one shell command or wait per
line) and runs nothing.

Decoupled experiments (CIFAR-10, ImageNet1K), per seed and cycle: ``EXPERIMENT/cycle.py`` in one
process, or, with more than one process (``--nproc-per-node N`` and/or ``--nnodes N``), adapt and
extract under torchrun (every rank first checks that it sees the run directory rank 0 writes) and
then the single-process stages on node 0 while the other nodes wait for their markers in the shared
run directory. DIGIT-MNIST: two lanes of stages (:mod:`common.lane`). ``--preflight`` runs a few steps
of every stage of cycles 0 and 1 instead and prints what the study will cost (:mod:`common.preflight`).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

# A torchrun agent logs a C++ warning with a stack dump when a peer's rendezvous store closes first,
# as it does whenever a multi-node start fails; c10 reads its log level once, when torch loads, so it
# is set here to keep such a failure to its one error line (TORCH_CPP_LOG_LEVEL=WARNING shows them).
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from .config import load_config, parse_overrides  # noqa: E402
from .errors import UserError, cli_main, require  # noqa: E402
from .runs import Stage, experiment_validator, init_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the stage table
@dataclass(frozen=True)
class StageRow:
    """One line of an experiment's stage table (its run.sh lists them in the order they run)."""
    lane: str                          # decoupled: "cycle"; concurrent: "chain" or "side"
    stage: tuple[str, ...]             # decoupled: the stage's name; concurrent: script and its own arguments
    cycles: str | None = None          # "0..C", "0..C-1", "C"; None: once per seed
    after: str | None = None           # side lane: waits for this stage of the same cycle (its .done marker)
    torchrun: bool = False             # decoupled: runs under torchrun when there is more than one process
    alone: tuple[str, ...] = ()        # extra arguments when it has both cores to itself (end of a chain)

    def in_cycle(self, k: int, last: int) -> bool:
        return {"0..C": k <= last, "0..C-1": k < last, "C": k == last}[self.cycles]


CYCLE_RANGES = ("0..C", "0..C-1", "C")


def parse_stage_table(text: str, decoupled: bool) -> list[StageRow]:
    """The rows of a stage table, one stage per line (``#`` starts a comment)::

        LANE STAGE [ARG ...] [CYCLES] [after STAGE] [torchrun] [alone: ARG ...]

    ``CYCLES`` is ``0..C`` (every cycle), ``0..C-1`` (every cycle but the last) or ``C`` (the last),
    with C the config's ``cycles``; without it the stage runs once per seed. Per seed and cycle k the
    rows of k run in the table's order. Decoupled experiments: LANE ``cycle``, STAGE a stage of
    ``cycle.py``; ``torchrun`` marks those that run under torchrun when the run has more than one
    process (``--nproc-per-node`` or ``--nnodes`` > 1).
    Concurrent training (DIGIT-MNIST): LANE ``chain`` (one after another; once-per-seed rows first)
    or ``side`` (a second lane beside it with ``--jobs 2``: once-per-seed rows first, then per cycle,
    each waiting for the chain's ``after`` stage of that cycle), STAGE a script and its own arguments
    (run.sh adds --run-dir, --data-root, --seed and --cycle); ``alone:`` arguments go to a chain's last
    stage when a side lane ran beside it, whose work is done by then."""
    lanes = ("cycle",) if decoupled else ("chain", "side")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        where = f"stage table line {number} ({line.strip()!r})"
        words, alone = (words[:words.index("alone:")], tuple(words[words.index("alone:") + 1:])) \
            if "alone:" in words else (words, ())
        require(bool(words) and words[0] in lanes, f"{where}: the lane must be one of {', '.join(lanes)}")
        lane, rest = words[0], words[1:]
        torchrun = "torchrun" in rest
        rest = [w for w in rest if w != "torchrun"]
        after = None
        if "after" in rest:
            i = rest.index("after")
            require(i + 2 == len(rest), f"{where}: 'after' takes one stage name, at the end")
            after, rest = rest[i + 1], rest[:i]
        cycles = None
        if rest and rest[-1] in CYCLE_RANGES:
            cycles, rest = rest[-1], rest[:-1]
        require(bool(rest), f"{where}: no stage")
        require(not (torchrun and not decoupled), f"{where}: 'torchrun' is for decoupled experiments")
        require(after is None or (lane == "side" and cycles is not None),
                f"{where}: 'after' is for side-lane stages of a cycle")
        require(not alone or lane == "chain", f"{where}: 'alone:' is for chain stages")
        require(not decoupled or (len(rest) == 1 and cycles is not None),
                f"{where}: a decoupled row is one stage name and its cycles")
        rows.append(StageRow(lane, tuple(rest), cycles, after, torchrun, alone))
    require(bool(rows), "the stage table is empty")
    if decoupled:  # cycle.py runs what it is given in pipeline order: the table must say that order
        from .decoupled import STAGES

        names = [row.stage[0] for row in rows]
        require(all(name in STAGES for name in names) and names == sorted(names, key=STAGES.index)
                and len(set(names)) == len(names),
                f"the stage table lists {', '.join(names)}; a decoupled cycle's stages are {', '.join(STAGES)}, "
                f"each at most once and in that order")
    return rows



def experiments() -> tuple[str, ...]:
    """The experiment folders: every folder of the repository with a ``config.yaml`` and a ``run.sh``.
    One with a ``cycle.py`` runs decoupled cycles (:func:`plan`); one without runs concurrent training
    in two lanes (:func:`lanes_plan`). Either way, its run.sh lists the stages (:func:`parse_stage_table`)."""
    return tuple(sorted(p.name for p in REPO.iterdir() if (p / "config.yaml").is_file() and (p / "run.sh").is_file()))


def is_decoupled(experiment: str) -> bool:
    return (REPO / experiment / "cycle.py").is_file()


def smoke_overrides(experiment: str) -> list[str]:
    """``--smoke``'s config overrides, from ``EXPERIMENT/smoke.args`` (a small model of the same class,
    generated data, CPU-sized settings)."""
    path = REPO / experiment / "smoke.args"
    require(path.is_file(), f"{experiment} has no smoke settings ({path.relative_to(REPO)}): --smoke is not available")
    return shlex.split(path.read_text(), comments=True)


VALUE_OPTIONS = {"--preset": "preset", "--seeds": "seeds", "--data-root": "data_root", "--out": "out",
                 "--device": "device", "--nproc-per-node": "nproc", "--jobs": "jobs", "--nnodes": "nnodes",
                 "--node-rank": "node_rank", "--rdzv-endpoint": "rdzv_endpoint", "--preflight-steps": "preflight_steps"}


@dataclass
class RunArgs:
    experiment: str
    preset: str = "faithful"
    seeds: str = "1"
    data_root: str = ""
    out: str = ""
    device: str = "auto"
    nproc: str = "1"
    jobs: str = "2"
    nnodes: str = "1"
    node_rank: str = "0"
    rdzv_endpoint: str = ""
    smoke: bool = False
    dry_run: bool = False
    preflight: bool = False
    preflight_steps: str = ""
    overrides: list[str] = field(default_factory=list)   # config override words, as given
    stages: list[StageRow] = field(default_factory=list)  # run.sh's stage table

    @property
    def distributed(self) -> bool:
        return int(self.nproc) > 1 or int(self.nnodes) > 1


def help_text(experiment: str) -> str:
    """The header comment of EXPERIMENT/run.sh (line 2 up to ``set -``), as ``run.sh --help`` prints it."""
    lines = (REPO / experiment / "run.sh").read_text().splitlines()[1:]
    shown = []
    for line in lines:
        if line.startswith("set -"):
            break
        shown.append(re.sub(r"^# ?", "", line))
    return "\n".join(shown)


def _positive(value: str, option: str) -> None:
    require(re.fullmatch(r"[1-9][0-9]*", value) is not None, f"{option} must be a positive integer, got '{value}'")


def parse_run_args(experiment: str, argv: list[str]) -> RunArgs | None:
    """run.sh's command line, after its ``--stage-table TABLE``; ``None`` after printing ``--help``.
    Every other ``--key value`` word pair (or ``--key=value``) is kept, in order, as a config override."""
    require(experiment in experiments(), f"unknown experiment '{experiment}'; choose one of {', '.join(experiments())}")
    require(len(argv) >= 2 and argv[0] == "--stage-table",
            f"the stage table comes first (--stage-table TABLE): run {experiment}/run.sh, which lists its stages")
    table = argv[1]
    args = RunArgs(experiment, stages=parse_stage_table(table, is_decoupled(experiment)))
    argv = argv[2:]
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in VALUE_OPTIONS:
            require(i + 1 < len(argv), f"{word} needs a value")
            setattr(args, VALUE_OPTIONS[word], argv[i + 1])
            i += 2
        elif word in ("--smoke", "--dry-run", "--preflight"):
            setattr(args, word[2:].replace("-", "_"), True)
            i += 1
        elif word in ("-h", "--help"):
            try:
                print(help_text(experiment) + "\n\nIts stages, as run.sh lists them:\n"
                      + textwrap.dedent(table).strip("\n"), flush=True)
            except BrokenPipeError:  # `run.sh --help | head`
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return None
        elif word == "--stage-table":
            raise UserError("--stage-table is run.sh's own (its list of stages); edit run.sh to change the stages")
        elif word.startswith("--") and "=" in word:
            args.overrides.append(word)
            i += 1
        elif word.startswith("--"):
            require(i + 1 < len(argv), f"override {word} has no value")
            args.overrides += argv[i:i + 2]
            i += 2
        else:
            raise UserError(f"unexpected argument '{word}' (overrides look like --key value; see --help)")
    _positive(args.seeds, "--seeds")
    _positive(args.nproc, "--nproc-per-node")
    require(args.jobs in ("1", "2"), f"--jobs must be 1 or 2, got '{args.jobs}'")
    _positive(args.nnodes, "--nnodes")
    require(re.fullmatch(r"[0-9]+", args.node_rank) is not None and int(args.node_rank) < int(args.nnodes),
            f"--node-rank must be 0..{int(args.nnodes) - 1} (one per node of --nnodes {args.nnodes}), "
            f"got '{args.node_rank}'")
    if args.rdzv_endpoint:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        require(bool(host) and port.isdigit() and 0 < int(port) < 65536,
                f"--rdzv-endpoint must be HOST:PORT (the first node and a free port), got '{args.rdzv_endpoint}'")
    require(int(args.nnodes) == 1 or args.rdzv_endpoint,
            f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the first node's address and a free port)")
    if args.preflight_steps:
        _positive(args.preflight_steps, "--preflight-steps")
        require(args.preflight, "--preflight-steps goes with --preflight")
    if args.out:
        args.out = os.path.realpath(args.out)
    if args.data_root:
        args.data_root = os.path.realpath(args.data_root)
    if not is_decoupled(experiment):
        require(not args.smoke and args.nproc == "1" and args.nnodes == "1" and args.device == "auto"
                and not args.preflight,
                f"{experiment} runs on its real data on the CPU: no --smoke, --nproc-per-node, --nnodes, --device or "
                f"--preflight")
    return args


# ----------------------------------------------------------------------------- the plan
@dataclass
class Command:
    argv: list[str]
    torchrun: bool = False            # argv are torchrun's arguments, run in this process

    def __str__(self) -> str:
        return shlex.join(([sys.executable, "-m", "torch.distributed.run"] if self.torchrun else []) + self.argv)


@dataclass
class Init:
    argv: list[str]                   # common.runs.init_run's: resolve the config into the run directory

    def __str__(self) -> str:
        return shlex.join([sys.executable, "-m", "common.runs", *self.argv])


@dataclass
class Wait:
    marker: Path                      # a stage marker another node writes in the shared run directory

    def __str__(self) -> str:
        return f"# wait for node 0: {self.marker}"


@dataclass
class Lanes:
    """Two :mod:`common.lane` processes (lists of lane items): the chain and a side lane that watches
    it (or two seeds, one whole seed per lane); side by side (``--jobs 2``, one thread each) or one
    after the other."""
    chain: list[str]
    side: list[str]
    side_by_side: bool

    def argv(self, items: list[str], watch: str | None = None) -> list[str]:
        return [sys.executable, "-m", "common.lane", *(["--watch", watch] if watch else []), "--", *items]

    def __str__(self) -> str:
        chain = shlex.join(self.argv(self.chain))
        side = shlex.join(self.argv(self.side, "PID")).replace("--watch PID", "--watch $!" if self.side_by_side
                                                                else "--watch $$")
        if self.side_by_side:
            return f"export OMP_NUM_THREADS=1\n{chain} &\n{side} &\nwait"
        return f"{chain}\n{side}"


def resolve(args: RunArgs) -> tuple[list[str], dict]:
    """Fill in the defaults (as run.sh always did) and resolve the config: (override words, config)."""
    exp = args.experiment
    words = list(args.overrides)
    if args.smoke:
        args.out = args.out or str(REPO / exp / "runs" / f"smoke-{args.preset}")
        words = smoke_overrides(exp) + words
        args.data_root = args.data_root or str(Path(args.out) / "data")
    args.out = args.out or str(REPO / exp / "runs" / args.preset)
    args.data_root = args.data_root or os.environ.get("SAE_CEPTION_DATA", "./data")
    cfg = load_config(REPO / exp / "config.yaml", args.preset, parse_overrides(words))
    return words, cfg


def plan(args: RunArgs, cfg: dict, words: list[str]) -> list:
    py, exp, out = sys.executable, args.experiment, args.out
    steps: list = []
    main_node = args.node_rank == "0"
    if args.smoke and main_node:  # it leaves data that is already there alone
        steps.append(Command([py, f"{exp}/make_smoke_data.py", "--root", args.data_root]))
    if main_node:  # the only node that writes before the ranks have met (and checked the run directory)
        steps.append(Init(["--config", f"{exp}/config.yaml", "--preset", args.preset, "--out", out, *words]))
    else:          # the others check the same settings, writing nothing
        validate = experiment_validator(REPO / exp / "config.yaml")
        if validate is not None:
            validate(cfg)
    cycles = int(cfg["cycles"])
    if not is_decoupled(exp):
        init = next(step for step in steps if isinstance(step, Init))
        steps.remove(init)   # run in the first lane, whose interpreter it then shares (see lanes_plan)
        return steps + lanes_plan(args, cycles, init)
    for i in range(int(args.seeds)):
        seed = 42 + i
        for k in range(cycles + 1):
            steps.append(f"== {exp} {args.preset}: seed {seed}, cycle {k} of {cycles}")
            stage = stage_argv(args, out, seed, k)
            rows = [row for row in args.stages if row.in_cycle(k, cycles)]
            if not args.distributed:
                steps.append(Command([py, *stage, "--stages", _names(rows)]))
                continue
            steps.append(Command([*torchrun_args(args, f"{exp}-seed{seed}-cycle{k}"), "-m", "common.distributed",
                                  *stage, "--stages", _names([r for r in rows if r.torchrun])], torchrun=True))
            if main_node:
                steps.append(Command([py, *stage, "--stages", _names([r for r in rows if not r.torchrun])]))
            elif k < cycles:  # the next cycle's adaptation needs this one's targets: its last marker
                last = rows[-1].stage[0]
                steps.append(Wait(Path(out) / f"seed_{seed}" / f"cycle_{k}" / f"{last}.done"))
    if main_node:
        steps.append(Command([py, "-m", "common.results", out]))
    return steps


def _names(rows: list[StageRow]) -> str:
    return ",".join(row.stage[0] for row in rows)


def stage_argv(args: RunArgs, run_dir: str, seed: int, cycle: int) -> list[str]:
    """The stages of one cycle of a decoupled experiment (``--stages`` may follow), run from the repository."""
    return [f"{args.experiment}/cycle.py", "--run-dir", run_dir, "--seed", str(seed), "--cycle", str(cycle),
            "--device", args.device, "--data-root", args.data_root]


def preflight_stages(args: RunArgs, cfg: dict, run_dir: str) -> list[tuple[int, str, list[str]]]:
    """The preflight's stage processes (:mod:`common.preflight`): each stage of seed 42, cycles 0 and 1,
    on its own, with the command run.sh runs (sharpen not after the last cycle)."""
    cycles = int(cfg["cycles"])
    runs = []
    for k in range(min(cycles, 1) + 1):
        for row in (row for row in args.stages if row.in_cycle(k, cycles)):
            stage = row.stage[0]
            argv = [*stage_argv(args, run_dir, 42, k), "--stages", stage]
            if args.distributed and row.torchrun:
                argv = ["-m", "torch.distributed.run", *torchrun_args(args, f"preflight-{k}-{stage}"),
                        "-m", "common.distributed", *argv]
            runs.append((k, stage, [sys.executable, *argv]))
    return runs


def torchrun_args(args: RunArgs, run_id: str) -> list[str]:
    """One machine: ``--standalone``; several: c10d rendezvous at the first node (ranks are numbered in
    the order the nodes join; rank 0 may be on any node, which is why the run directory is shared)."""
    if not args.rdzv_endpoint:
        return ["--standalone", "--nproc-per-node", args.nproc]
    return ["--nnodes", args.nnodes, "--node-rank", args.node_rank, "--nproc-per-node", args.nproc,
            "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", run_id]


def lanes_plan(args: RunArgs, cycles: int, init: "Init") -> list:
    """Per seed, from the stage table: the chain (once-per-seed rows, then cycle by cycle; each cycle
    needs the previous targets) and, beside it, the side lane (the ablation, then the metrics of each
    cycle as soon as its training is done). With ``--jobs 2`` and two or more seeds to run, two
    seeds run side by side instead, each its whole list in one lane: a seed's side lane has less
    work than its chain and would wait for it, a pair keeps both cores busy. A chain beside a side
    lane ends with a stage that by then (usually) runs alone: it gets its ``alone:`` arguments.

    ``init`` (resolving and checking the config into the run directory) is the first lane's first
    item: its torch import is then the one the stages use, instead of one more in this process
    before the lanes start theirs (~2 s); the other lane imports torch meanwhile and waits for it (a file
    named after this process, removed at the end; if init fails, that lane ends with it)."""
    py, here, out = sys.executable, REPO / args.experiment, args.out

    def stage(row: StageRow, seed: str, k: int | None, *more: str) -> str:
        script, *own = row.stage
        cycle = [] if k is None else ["--cycle", str(k)]
        return shlex.join([str(here / script), "--run-dir", out, "--data-root", args.data_root, "--seed", seed,
                           *cycle, *own, *more])

    def order(name: str) -> list[tuple[StageRow, int | None]]:
        rows = [row for row in args.stages if row.lane == name]
        once = [(row, None) for row in rows if row.cycles is None]
        return once + [(row, k) for k in range(cycles + 1) for row in rows
                       if row.cycles is not None and row.in_cycle(k, cycles)]

    def items(seed: str, runs: list[tuple[StageRow, int | None]]) -> list[str]:
        lane = []
        for row, k in runs:
            if row.after:
                lane.append(shlex.join(["@after", f"{out}/seed_{seed}/cycle_{k}/{row.after}.done"]))
            lane.append(stage(row, seed, k))
        return lane

    lanes = []
    for i in range(int(args.seeds)):
        seed = str(42 + i)
        chain, side = order("chain"), order("side")
        require(bool(chain), "the stage table has no chain stages")
        (last, k) = chain[-1]
        lanes.append((items(seed, chain), items(seed, side), stage(last, seed, k, *last.alone)))
    steps: list = []
    side_by_side = args.jobs == "2"
    while lanes:
        if side_by_side and len(lanes) >= 2:
            (chain_a, side_a, _), (chain_b, side_b, _) = lanes.pop(0), lanes.pop(0)
            steps.append(Lanes(_one_lane(chain_a, side_a), _one_lane(chain_b, side_b), side_by_side=True))
        else:
            chain, side, last_alone = lanes.pop(0)
            if side_by_side and side:
                chain[-1] = last_alone
            steps.append(Lanes(chain, side, side_by_side=side_by_side))
    first = steps[0]
    first.chain[:0] = [shlex.join(["@init", *init.argv]), shlex.join(["@touch", str(INITIALISED)])]
    first.side[:0] = ["@import torch", shlex.join(["@after", str(INITIALISED)])]   # its start-up while it waits
    steps.append(Command([py, "-m", "common.results", out]))
    return steps


#: the file the first lane creates once init has written the run directory (this launcher's own)
INITIALISED = Path(tempfile.gettempdir()) / f"sae-ception-init-{os.getpid()}"


def _one_lane(chain: list[str], side: list[str]) -> list[str]:
    """A seed's chain and side items in one lane, in that order (its '@after' waits are then met)."""
    return chain + [item for item in side if not item.startswith("@after")]


# ----------------------------------------------------------------------------- running it
class Runner:
    """Runs the plan's commands in the repository root; SIGTERM is passed on to them; a failing
    command ends the run with its exit status (it has said why)."""

    def __init__(self):
        self.children: list[subprocess.Popen] = []
        signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        sys.exit(128 + signum)

    def start(self, argv: list[str]) -> subprocess.Popen:
        child = subprocess.Popen(argv, cwd=REPO)
        self.children.append(child)
        return child

    def wait(self, *children: subprocess.Popen) -> int:
        """Exit status of the first of them that failed (0 if none); SIGINT reaches them from the terminal."""
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            codes = [child.wait() for child in children]
        finally:
            signal.signal(signal.SIGINT, old)
        for child in children:
            self.children.remove(child)
        return next((c if c > 0 else 128 - c for c in codes if c != 0), 0)

    def run(self, step) -> None:
        if isinstance(step, str):
            print(step, flush=True)
        elif isinstance(step, Init):
            init_run(step.argv)
        elif isinstance(step, Wait):
            wait_for_marker(step.marker)
        elif isinstance(step, Lanes):
            # --watch: the side lane stops when the chain has ended without writing what it waits for
            if step.side_by_side:
                os.environ["OMP_NUM_THREADS"] = "1"   # two lanes share the two cores (and so does the summary)
                chain = self.start(step.argv(step.chain))
                side = self.start(step.argv(step.side, str(chain.pid)))
                self.exit_on_failure(self.wait(chain, side))
            else:
                self.exit_on_failure(self.wait(self.start(step.argv(step.chain))))
                self.exit_on_failure(self.wait(self.start(step.argv(step.side, str(os.getpid())))))
        elif step.torchrun:
            self.exit_on_failure(run_torchrun(step.argv))
        else:
            self.exit_on_failure(self.wait(self.start(step.argv)))

    @staticmethod
    def exit_on_failure(code: int) -> None:
        if code:
            sys.exit(code)


def wait_for_marker(marker: Path, poll: float = 5.0) -> None:
    """Until node 0 has finished the stage whose marker this is (current: not one left by an earlier run)."""
    print(f"waiting for node 0 to finish {marker}", flush=True)
    while not Stage.from_marker(marker).done():
        time.sleep(poll)


def run_torchrun(argv: list[str]) -> int:
    """torchrun in this process, so that its failures end as one line instead of its report: a rank
    that failed with a UserError has printed its ``error:`` line (exit status 2); a rendezvous that
    does not complete names the endpoint. What torchrun changes in this process (OMP_NUM_THREADS,
    signal handlers) is undone afterwards: the single-process stages run as they would alone."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.run", "torch.distributed.elastic"):  # its report repeats the ranks' output
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = parse_args(argv)
    saved_env = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(config)
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        if all(code == 2 for code in codes):
            return 2
        failure = err.failures[min(err.failures)]
        print(f"error: torchrun: rank {failure.rank} on {failure.hostname} ended with exit status "
              f"{failure.exitcode} (its output above says why)", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as err:
        return 128 + int(err.sigval)
    except RendezvousError as err:
        endpoint = config.rdzv_endpoint or "localhost"
        raise UserError(f"the nodes did not meet at {endpoint} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160] if str(err) else 'rendezvous failed'}); start one run.sh "
                        f"per node with the same --nnodes and --rdzv-endpoint (the first node's address and a "
                        f"free port)") from None
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    require(bool(argv), f"usage: python -m common.launch EXPERIMENT [run.sh options]; EXPERIMENT is one of "
                        f"{', '.join(experiments())}")
    args = parse_run_args(argv[0], argv[1:])
    if args is None:
        return
    words, cfg = resolve(args)
    if args.preflight:
        from .preflight import run_preflight

        require(args.nnodes == "1", "--preflight measures one machine: run it without --nnodes (with "
                                    "--nproc-per-node for this machine's GPUs); the projection is for one machine")
        os.chdir(REPO)
        scratch = str(Path(args.out) / "preflight")
        setup = [step.argv for step in plan(args, cfg, words)[:1] if isinstance(step, Command)]  # the smoke data
        init = ["--config", f"{args.experiment}/config.yaml", "--preset", args.preset, "--out", scratch, *words]
        run_preflight(args, cfg, preflight_stages(args, cfg, scratch), setup, init, REPO)
        return
    steps = plan(args, cfg, words)
    if args.dry_run:
        for step in steps:
            print(step if not isinstance(step, str) else f"echo {shlex.quote(step)}")
        return
    os.chdir(REPO)  # the paths of the plan are relative to the repository (data root ./data included)
    runner = Runner()
    # a file left by a killed launcher that had this process id must not stand for this run's init
    INITIALISED.unlink(missing_ok=True)
    try:
        for step in steps:
            runner.run(step)
    finally:
        INITIALISED.unlink(missing_ok=True)


if __name__ == "__main__":
    cli_main(main)
