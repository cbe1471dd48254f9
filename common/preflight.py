"""``run.sh --preflight``: a few steps of every stage of cycles 0 and 1, measured, and the cost of the
whole study projected from them, before hours are spent.

Two halves:

* **The step budget** (what the building blocks call). A stage process started with
  ``SAE_CEPTION_PREFLIGHT=FILE`` (and ``SAE_CEPTION_PREFLIGHT_STEPS=N``, default 3) runs only the first
  N steps of every loop that is wrapped in :func:`steps` (and only the first epoch of every epoch loop
  wrapped in :func:`epochs`), and appends one JSON line per loop to FILE: the steps it ran, their
  seconds, the items (images or rows) they held and the steps the full loop has (``len(loader)`` x the
  epochs around it). Without the variable every call returns its argument unchanged. Because a later
  stage checks that a cache or target table covers its whole split, :func:`fill_cache` and
  :func:`fill_targets` complete what a budgeted loop left unwritten by repeating the rows it did
  compute (their time is recorded as preflight-only and left out of the projection).
* **The orchestrator** (:func:`run_preflight`, called by :mod:`common.launch`): runs each stage of
  seed 42, cycles 0 and 1, as its own process through the command run.sh runs
  (``EXPERIMENT/cycle.py ... --stages STAGE``, under torchrun with ``--nproc-per-node``) in the
  scratch run directory ``<out>/preflight/`` (removed afterwards), measures each stage's wall time
  and peak memory, projects every stage and the whole study, measures the disk the stages wrote,
  prints one table and stops with one ``error:`` line when the study will not fit.

Projection of a stage: its measured wall time, minus the measured time of its budgeted loops, plus
what those loops would take in full (first step as measured + the other steps at the mean time of
the later, warmed-up steps). Work outside budgeted loops (start-up, model loading, saving, the class
means, the metrics on the full test cache) runs at full size and counts as measured.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

LOG_ENV = "SAE_CEPTION_PREFLIGHT"            # JSON lines file a stage appends its loop records to
STEPS_ENV = "SAE_CEPTION_PREFLIGHT_STEPS"    # steps per budgeted loop (default 3)
FREE_DISK_ENV = "SAE_CEPTION_FREE_DISK"      # pretend --out's filesystem has this many bytes free (tests)
DEFAULT_STEPS = 3

_frames: list[dict] = []   # the epoch loops open around the current point (innermost last)


def budget() -> int | None:
    """Steps per loop when this process is a preflight stage, else None."""
    if not os.environ.get(LOG_ENV):
        return None
    return max(1, int(os.environ.get(STEPS_ENV) or DEFAULT_STEPS))


def limit(n_steps: int) -> int:
    """``n_steps``, or the budget when a preflight runs and it is smaller (for loops that count their steps)."""
    steps = budget()
    return n_steps if steps is None else min(n_steps, steps)


def steps(iterable: Iterable, name: str, total: int | None = None, group: int = 1,
          output: str | os.PathLike | None = None) -> Iterable:
    """``iterable`` itself, or, in a preflight, its first ``budget()`` x ``group`` items, timed and
    recorded. ``total`` is the number of items the full loop has (per epoch; the open :func:`epochs`
    multiply it); ``group`` batches make one step (gradient accumulation: each measured step ends
    with an optimizer step); ``output`` is the folder the loop writes (per run or per seed)."""
    n_steps = budget()
    if n_steps is None:
        return iterable
    return _measured(iterable, name, total, group, n_steps, output)


def epochs(iterable: Iterable) -> Iterable:
    """``iterable`` itself, or, in a preflight, only its first epoch: the loops inside it are projected
    to every epoch, and so is the rest of the epoch's time (validation set-up, end-of-epoch saves)."""
    if budget() is None:
        return iterable
    return _first_epoch(list(iterable))


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _items(batch) -> int:
    if batch is None:
        return 0
    x = getattr(batch, "x", None)
    if x is None and isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    try:
        return int(len(x if x is not None else batch))
    except TypeError:
        return 1


def _measured(iterable, name, total, group, n_steps, output) -> Iterator:
    times, items = [], 0
    iterator = iter(iterable)
    exhausted = False
    try:
        for _ in range(n_steps * group):
            _sync()
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                exhausted = True
                break
            yield batch
            _sync()
            times.append(time.perf_counter() - started)
            items += _items(batch)
    finally:
        _record_loop(name, times, items, total, group, exhausted, output)


def _record_loop(name, times, items, total, group, exhausted, output) -> None:
    repeat = math.prod(frame["repeat"] for frame in _frames)
    measured = sum(times)
    full = len(times) if total is None or exhausted else max(int(total), len(times))
    warm = times[group:] or times   # the first step (group of batches) is the warm-up
    per_step = sum(warm) / len(warm) if warm else 0.0
    if full == len(times):
        projected = measured
    elif len(times) > group:
        projected = sum(times[:group]) + (full - group) * per_step
    else:
        projected = full * per_step
    _emit({"kind": "loop", "loop": name, "steps": len(times), "full_steps": full, "full_steps_all": full * repeat,
           "seconds": measured, "per_step": per_step, "items": items,
           "items_per_s": items / measured if measured > 0 else 0.0, "projected": projected,
           "output": None if output is None else str(Path(output).resolve())})


def _first_epoch(all_epochs: list) -> Iterator:
    if not all_epochs:
        return
    frame = {"repeat": len(all_epochs), "measured": 0.0, "projected": 0.0}
    _frames.append(frame)
    _sync()
    started = time.perf_counter()
    try:
        yield all_epochs[0]
    finally:
        _sync()
        body = time.perf_counter() - started
        _frames.remove(frame)
        per_epoch = body - frame["measured"] + frame["projected"]
        _emit({"kind": "epochs", "loop": "epochs", "repeat": frame["repeat"], "seconds": body,
               "projected": per_epoch * frame["repeat"]})


def preflight_only(name: str, seconds: float) -> None:
    """Record time spent on work a real run does not do (filling caches), to leave it out of the projection."""
    _emit({"kind": "preflight_only", "loop": name, "seconds": seconds, "projected": 0.0})


def _emit(record: dict) -> None:
    """Add a record to the innermost open epoch loop, or write it (top level) to the log."""
    if _frames:
        _frames[-1]["measured"] += record["seconds"]
        _frames[-1]["projected"] += record["projected"]
    from . import distributed as D

    if not D.is_main():
        return
    record["top"] = not _frames
    record.update(_gpu_memory())
    with open(os.environ[LOG_ENV], "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _gpu_memory() -> dict:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    device = torch.cuda.current_device()
    return {"gpu": torch.cuda.get_device_name(device), "gpu_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
            "gpu_total_bytes": int(torch.cuda.get_device_properties(device).total_memory)}


# ----------------------------------------------------------------------------- completing what a budget left out
def fill_cache(writer, last_x, data) -> None:
    """A preflight extraction stopped early: write the rest of an ordered dataset's rows (its labels,
    dataset index = position) with the activations of the last batch repeated, so that the cache
    covers the split as the later stages check. Nothing happens outside a preflight."""
    n = len(data) if hasattr(data, "__len__") else None
    if budget() is None or last_x is None or n is None or writer.count >= n:
        return
    import numpy as np
    import torch

    started = time.perf_counter()
    labels = getattr(data, "labels", None)
    labels = torch.as_tensor(labels).long() if labels is not None else torch.tensor([int(data[i][1]) for i in range(n)])
    sample = last_x.detach().float().cpu()
    if len(sample) == 0:
        return
    block = max(len(sample), writer.chunk_rows)
    for start in range(writer.count, n, block):
        rows = np.arange(start, min(start + block, n))
        writer.append(sample[torch.from_numpy(rows % len(sample))], labels[rows], rows)
    preflight_only("fill cache", time.perf_counter() - started)


def fill_targets(writer, last_rows) -> None:
    """A preflight wrote only some target rows: the others get the last batch's rows, repeated."""
    if budget() is None or last_rows is None:
        return
    import torch

    started = time.perf_counter()
    missing = writer.unwritten()
    sample = last_rows.detach().float().cpu()
    for start in range(0, len(missing), 65536):
        idx = missing[start:start + 65536]
        writer.write(idx, sample[torch.arange(len(idx)) % len(sample)])
    preflight_only("fill targets", time.perf_counter() - started)


# ----------------------------------------------------------------------------- the orchestrator
def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def project_stage(wall: float, records: list[dict]) -> float:
    """The stage's full wall time: measured, with every top-level budgeted loop replaced by its projection."""
    top = [r for r in records if r.get("top", True)]
    return wall - sum(r["seconds"] for r in top) + sum(r["projected"] for r in top)


def main_loop(records: list[dict]) -> dict | None:
    """The loop that costs the stage most in full (what its row shows)."""
    loops = [r for r in records if r["kind"] == "loop"]
    return max(loops, key=lambda r: r["per_step"] * r["full_steps_all"], default=None)


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"


def size(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


DISK_KINDS = ("activations", "checkpoints", "targets", "other")


def disk_kind(relative: Path) -> str:
    parts, name = relative.parts, relative.name
    if "activations" in parts or "backbone" in parts:
        return "activations"
    if name.startswith("targets"):
        return "targets"
    if name.endswith((".safetensors", ".pt", ".pth")) or "sweep" in parts:
        return "checkpoints"
    return "other"


def disk_use(directory: Path) -> dict[str, int]:
    use = dict.fromkeys(DISK_KINDS, 0)
    if directory.is_dir():
        for path in directory.rglob("*"):
            if path.is_file() and not path.name.endswith(".jsonl"):
                use[disk_kind(path.relative_to(directory))] += path.stat().st_size
    return use


def free_disk(path: Path) -> int:
    fake = os.environ.get(FREE_DISK_ENV)
    if fake:
        return int(fake)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _wait(proc) -> tuple[int, int]:
    """Exit status and peak resident memory (bytes, the largest process of its tree) of a child."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024


def run_stage(argv: list[str], log: Path, records: Path, cwd: Path) -> tuple[float, int]:
    """Run one stage process with the step budget; (wall seconds, peak RSS bytes), or one error line."""
    import subprocess

    from .errors import UserError

    env = {**os.environ, LOG_ENV: str(records)}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        code, rss = _wait(proc)
    wall = time.perf_counter() - started
    if code != 0:
        text = log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        if "out of memory" in text.lower() and ("cuda" in text.lower() or "OutOfMemoryError" in text):
            raise UserError(f"preflight: {log.stem} ran out of GPU memory (log: {log}); lower the batch size of "
                            f"that stage or use bf16/fp16 autocast (config keys in docs/cluster.md#preflight)")
        if "No space left on device" in text:
            raise UserError(f"preflight: {log.stem} filled the disk of the run directory (log: {log}); the "
                            f"preflight itself writes cycles 0-1 of one seed at full size")
        if code in (-9, 137):
            raise UserError(f"preflight: {log.stem} was killed (SIGKILL: out of host memory? peak RSS "
                            f"{size(rss)}; log: {log})")
        if errors:
            raise UserError(f"preflight: {log.stem}: {errors[-1].removeprefix('error: ')}")
        raise UserError(f"preflight: {log.stem} failed with exit status {code}; its output is in {log}")
    return wall, rss


@dataclass
class StageRun:
    cycle: int
    stage: str
    argv: list[str]
    wall: float = 0.0
    rss: int = 0
    records: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"cycle{self.cycle}-{self.stage}"

    @property
    def projected(self) -> float:
        return project_stage(self.wall, self.records)

    def per_run_seconds(self, scratch: Path) -> float:
        """Projected seconds of loops that write outside the seed's folder (done once per run, not per seed)."""
        seeds = scratch.resolve() / "seed_"
        return sum(r["projected"] for r in self.records if r.get("top", True) and r.get("output")
                   and not r["output"].startswith(str(seeds)))


def _sae_epochs(cfg: dict, cycle: int) -> float:
    epochs = cfg.get("sae", {}).get("epochs", 1)
    return float(epochs[cycle] if isinstance(epochs, (list, tuple)) else epochs)


def study_seconds(runs: list[StageRun], cfg: dict, seeds: int, scratch: Path) -> tuple[float, float, float]:
    """(cycle 0, one later cycle on average, the whole study) in projected seconds: cycle 1 stands for
    every cycle k >= 1 (its SAE scaled by sae.epochs of k over those of 1; no sharpen after the last
    cycle), times the seeds; loops that write per run (ImageNet's backbone cache) count once."""
    cycles = int(cfg["cycles"])
    first = sum(r.projected for r in runs if r.cycle == 0)
    later_total = 0.0
    for k in range(1, cycles + 1):
        for r in runs:
            if r.cycle != 1 or (r.stage == "sharpen" and k == cycles):
                continue
            seconds = r.projected
            if r.stage == "sae":
                loops = sum(x["projected"] for x in r.records if x.get("top", True))
                seconds += loops * (_sae_epochs(cfg, k) / _sae_epochs(cfg, 1) - 1)
            later_total += seconds
    once = sum(r.per_run_seconds(scratch) for r in runs)
    total = seeds * (first + later_total) - (seeds - 1) * once
    return first, later_total / max(cycles, 1), total


def study_disk(scratch: Path, cfg: dict, seeds: int) -> tuple[dict[str, int], dict[str, int], dict[str, int], int, int]:
    """(cycle 0, cycle 1, per run, per seed outside its cycles, whole study) disk from what the preflight
    wrote at full size."""
    cycles = int(cfg["cycles"])
    seed_dir = scratch / "seed_42"
    cycle0, cycle1 = disk_use(seed_dir / "cycle_0"), disk_use(seed_dir / "cycle_1")
    per_run = dict.fromkeys(DISK_KINDS, 0)
    for path in scratch.iterdir():
        if path.is_dir() and not path.name.startswith("seed_") and path.name != "logs":
            for kind, n in disk_use(path).items():
                per_run[kind] += n
    seed_other = sum(sum(disk_use(p).values()) for p in seed_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("cycle_")) if seed_dir.is_dir() else 0
    per_seed = seed_other + sum(cycle0.values())
    for k in range(1, cycles + 1):
        per_seed += sum(cycle1.values()) - (cycle1["targets"] if k == cycles else 0)
    return cycle0, cycle1, per_run, seed_other, sum(per_run.values()) + seeds * per_seed


def table(runs: list[StageRun], steps_per_loop: int) -> list[str]:
    header = ("cycle", "stage", "main loop", "steps", "s/step", "items/s", "measured", "projected", "peak RSS",
              "peak GPU")
    rows = [header]
    for r in runs:
        loop = main_loop(r.records)
        gpu = [x for x in r.records if "gpu_peak_bytes" in x]
        peak = max(gpu, key=lambda x: x["gpu_peak_bytes"], default=None)
        rows.append((str(r.cycle), r.stage, loop["loop"] if loop else "-",
                     f"{loop['steps']}/{loop['full_steps_all']}" if loop else "-",
                     f"{loop['per_step']:.3g}" if loop else "-", _rate(loop["items_per_s"]) if loop else "-",
                     duration(r.wall), duration(r.projected), size(r.rss),
                     f"{size(peak['gpu_peak_bytes'])}/{size(peak['gpu_total_bytes'])}" if peak else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def _disk_line(use: dict[str, int]) -> str:
    return ", ".join(f"{kind} {size(n)}" for kind, n in use.items() if n) or "0 B"


def run_preflight(args, cfg: dict, stages: list[tuple[int, str, list[str]]], setup: list[list[str]],
                  init_argv: list[str], repo: Path) -> None:
    """``run.sh --preflight`` (see the module doc). ``args``: run.sh's options (:class:`common.launch.RunArgs`);
    ``stages``: (cycle, stage, command) of each stage process, in order; ``setup``: commands to run
    first (the smoke data); ``init_argv``: :func:`common.runs.init_run`'s, for the scratch directory."""
    import contextlib
    import io
    import subprocess

    from .errors import UserError
    from .runs import init_run

    out, exp = Path(args.out), args.experiment
    scratch = out / "preflight"
    n_steps = int(args.preflight_steps or os.environ.get(STEPS_ENV) or DEFAULT_STEPS)
    os.environ[STEPS_ENV] = str(n_steps)
    cycles, seeds = int(cfg["cycles"]), int(args.seeds)
    existed = out.exists()
    runs = [StageRun(k, stage, argv) for k, stage, argv in stages]
    if args.dry_run:
        print(f"# preflight: {n_steps} steps per loop, scratch run directory {scratch} (removed afterwards)")
        for r in runs:
            print(f"{LOG_ENV}={scratch}/logs/{r.name}.jsonl {' '.join(map(str, r.argv))}")
        return
    shutil.rmtree(scratch, ignore_errors=True)
    logs = scratch / "logs"
    logs.mkdir(parents=True)
    for argv in setup:
        subprocess.run(argv, cwd=repo, check=True, stdout=subprocess.DEVNULL)
    with contextlib.redirect_stdout(io.StringIO()):
        init_run(init_argv)
    print(f"preflight of {exp} ({args.preset}): seed 42, cycles 0-{runs[-1].cycle}, {n_steps} steps per loop, "
          f"in {scratch}", flush=True)
    for r in runs:
        r.wall, r.rss = run_stage(r.argv, logs / f"{r.name}.log", logs / f"{r.name}.jsonl", repo)
        r.records = read_records(logs / f"{r.name}.jsonl")
        print(f"  cycle {r.cycle} {r.stage}: {duration(r.wall)}", flush=True)
    first, later, total = study_seconds(runs, cfg, seeds, scratch)
    cycle0, cycle1, per_run, per_seed, need = study_disk(scratch, cfg, seeds)
    gpus = {x["gpu"] for r in runs for x in r.records if "gpu" in x}
    lines = [f"preflight table ({', '.join(sorted(gpus)) or 'no GPU used'}): 'measured' ran here with {n_steps} "
             f"steps per loop; 'projected' is the full stage (steps = loader batches over all epochs; s/step and "
             f"items/s of the warmed-up steps of the stage's main loop; RSS: the largest process)",
             *table(runs, n_steps)]
    sweep = len(cfg["aux"]["sweep"]) if cfg.get("aux", {}).get("select") == "sweep" else 1
    lines.append(f"projected wall time: cycle 0 {duration(first)}, each later cycle {duration(later)} "
                 f"(λ values per cycle: {sweep}); the study ({seeds} seed(s) x cycles 0-{cycles}): {duration(total)}")
    shutil.rmtree(scratch)
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    free = free_disk(out)
    fits = need <= free
    lines.append(f"disk (what the preflight wrote, at full size): cycle 0 {_disk_line(cycle0)}; cycle 1 "
                 f"{_disk_line(cycle1)}; per seed outside its cycles {size(per_seed)}; per run {_disk_line(per_run)}; "
                 f"the study needs {size(need)}, "
                 f"{out} has {size(free)} free: {'fits' if fits else 'DOES NOT FIT'}")
    print("\n".join(lines), flush=True)
    if not fits:
        raise UserError(f"the study needs {size(need)} of disk but {out} has {size(free)} free: free space or "
                        f"choose another --out")
