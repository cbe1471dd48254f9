"""``run.sh --preflight`` (common/preflight.py): the step budget the building blocks honour, the
projection, and the table of both large experiments' smoke pipelines; a study that does not fit
the disk (``SAE_CEPTION_FREE_DISK`` pretends how much is free) stops with one line."""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.data import Dataset

from common import preflight
from common.activation_cache import ActivationCache
from common.targets import TargetTable, write_targets
from conftest import REPO, assert_one_line_error, run


def run_sh(experiment: str, *args, **kwargs):
    return run(["bash", REPO / experiment / "run.sh", *args], env={"PYTHON": sys.executable, **kwargs.pop("env", {})},
               **kwargs)


@pytest.fixture
def budget(tmp_path, monkeypatch):
    """This process as a preflight stage with a budget of 2 steps; returns the records written so far."""
    log = tmp_path / "records.jsonl"
    monkeypatch.setenv(preflight.LOG_ENV, str(log))
    monkeypatch.setenv(preflight.STEPS_ENV, "2")
    return lambda: preflight.read_records(log)


def test_without_a_preflight_every_loop_is_untouched(monkeypatch):
    monkeypatch.delenv(preflight.LOG_ENV, raising=False)
    data = [1, 2, 3]
    assert preflight.steps(data, "x", total=3) is data and preflight.epochs(data) is data
    assert preflight.limit(7) == 7 and preflight.budget() is None


def test_a_budgeted_loop_stops_and_is_projected_to_every_epoch(budget):
    seen = []
    for epoch in preflight.epochs(range(5)):
        seen += [("epoch", epoch)]
        seen += list(preflight.steps([torch.zeros(4, 1)] * 10, "train", total=10, group=3))  # 2 steps of 3 batches
        seen += list(preflight.steps([torch.zeros(2, 1)] * 3, "val", total=3))
    assert [s for s in seen if isinstance(s, tuple)] == [("epoch", 0)] and len(seen) == 1 + 6 + 2
    train, val, epochs = budget()
    assert (train["steps"], train["full_steps"], train["full_steps_all"], train["items"]) == (6, 10, 50, 24)
    assert not train["top"] and not val["top"] and epochs["top"] and epochs["repeat"] == 5
    warm = train["per_step"]   # batches 4-6, after the first optimizer step's group
    assert train["projected"] == pytest.approx(train["seconds"] - 3 * warm + (10 - 3) * warm)
    body_rest = epochs["seconds"] - train["seconds"] - val["seconds"]
    assert epochs["projected"] == pytest.approx(5 * (body_rest + train["projected"] + val["projected"]))
    # a stage: its wall time with the top-level loops replaced by their projections
    assert preflight.project_stage(10.0, budget()) == pytest.approx(10.0 - epochs["seconds"] + epochs["projected"])


def test_a_loop_shorter_than_the_budget_is_measured_as_it_ran(budget):
    assert list(preflight.steps(["a"], "short", total=1)) == ["a"]
    (record,) = budget()
    assert record["steps"] == record["full_steps"] == 1 and record["projected"] == record["seconds"]


class Images(Dataset):
    """(image, label, index) items with a ``labels`` tensor, as the experiments' datasets."""

    def __init__(self, n: int):
        self.x, self.labels = torch.randn(n, 3), torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i]), i


def test_a_budgeted_extraction_and_target_table_still_cover_the_split(budget, tmp_path):
    """Later stages check that caches and targets cover the whole split: what the budget left out is
    filled with the computed rows repeated, and that time is recorded as preflight-only."""
    from common.extraction import extract
    from common.activations import ArraySource

    data = Images(23)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    cache = extract(model, data, "0", "identity", tmp_path / "acts", batch_size=4, chunk_rows=8, dtype="float32")
    assert len(cache) == 23 and torch.equal(cache.labels, data.labels) and torch.equal(cache.indices, torch.arange(23))
    cache.require_dataset(data.labels)
    x = cache.read_all()
    torch.testing.assert_close(x[:8], model(data.x[:8]).detach())          # two real batches of 4
    torch.testing.assert_close(x[8:12], x[4:8])                              # then the last one repeated
    write_targets(tmp_path / "targets.npy", ArraySource(x, data.labels).iter_batches(5), data.labels, 4, "random",
                  total=5)
    assert len(TargetTable(tmp_path / "targets.npy", data.labels)) == 23
    kinds = [(r["kind"], r["loop"]) for r in budget()]
    assert kinds == [("loop", "extract"), ("preflight_only", "fill cache"), ("loop", "targets"),
                     ("preflight_only", "fill targets")]
    assert ActivationCache(tmp_path / "acts").dim == 4


def test_study_projection_counts_cycles_seeds_and_per_run_loops(tmp_path):
    """Cycle 1 stands for cycles 1..K (no sharpen after the last, the SAE scaled by its epochs);
    seeds multiply; a loop that writes outside the seed folder (a per-run cache) counts once."""
    scratch = tmp_path / "preflight"

    def stage(cycle, name, wall, records=()):
        return preflight.StageRun(cycle, name, [], wall=wall, records=list(records))

    once = {"kind": "loop", "top": True, "seconds": 1.0, "projected": 10.0, "output": str(scratch / "backbone")}
    sae = {"kind": "epochs", "top": True, "seconds": 1.0, "projected": 4.0}
    runs = [stage(0, "adapt", 2.0, [once]), stage(0, "sae", 1.0), stage(0, "sharpen", 1.0),
            stage(1, "adapt", 1.0), stage(1, "sae", 1.0, [sae]), stage(1, "sharpen", 1.0)]
    cfg = {"cycles": 3, "sae": {"epochs": [5, 1, 2, 1]}}
    first, later, total = preflight.study_seconds(runs, cfg, seeds=2, scratch=scratch)
    assert first == 11.0 + 1 + 1
    # cycle 1: adapt 1 + sae 4 (1 s outside loops... the stage is 1 - 1 + 4) + sharpen 1; cycle 2's SAE x2; cycle 3 no sharpen
    assert later * 3 == pytest.approx((1 + 4 + 1) + (1 + 8 + 1) + (1 + 4))
    assert total == pytest.approx(2 * (first + later * 3) - 10.0)


def test_preflight_command_line(tmp_path):
    out = tmp_path / "run"
    lines = run_sh("CIFAR-10", "--smoke", "--preflight", "--out", out, "--dry-run", check=True).stdout.splitlines()
    commands = [line for line in lines if "cycle.py" in line]
    assert len(commands) == 10 and all(f"--run-dir {out}/preflight " in line for line in commands)
    assert commands[0].endswith("--cycle 0 --device auto --data-root " + f"{out}/data --stages adapt")
    assert not out.exists()
    assert_one_line_error(run_sh("CIFAR-10", "--preflight-steps", "2", "--out", out), "goes with --preflight")
    assert_one_line_error(run_sh("CIFAR-10", "--preflight", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500",
                                 "--out", out), "--preflight measures one machine")
    assert_one_line_error(run_sh("DIGIT-MNIST", "--preflight", "--out", out), "--preflight")


def test_cifar_smoke_preflight_prints_the_table(tmp_path):
    out = tmp_path / "run"
    proc = run_sh("CIFAR-10", "--smoke", "--preflight", "--out", out, "--preflight-steps", "2", check=True, timeout=900)
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("cycle  stage"))
    rows = [line.split() for line in lines[header + 1:header + 11]]
    assert [(r[0], r[1]) for r in rows] == [(str(k), s) for k in (0, 1)
                                            for s in ("adapt", "extract", "sae", "sharpen", "metrics")]
    adapt = lines[header + 1]
    assert "baseline train" in adapt and " 2/51 " in adapt   # 2 steps; the smoke baseline: 3 epochs of 17 batches
    assert "projected wall time: cycle 0" in proc.stdout and "1 seed(s) x cycles 0-3" in proc.stdout
    assert ": fits" in proc.stdout and "the study needs" in proc.stdout
    assert not (out / "preflight").exists() and not list(out.glob("seed_*")) and not (out / "config.yaml").exists()


def test_imagenet_smoke_preflight_stops_when_the_disk_is_too_small(tmp_path):
    out = tmp_path / "run"
    proc = run_sh("ImageNet1K", "--smoke", "--preflight", "--out", out, "--seeds", "2", "--preflight-steps", "1",
                  env={preflight.FREE_DISK_ENV: "1000"}, timeout=900)
    assert_one_line_error(proc, "the study needs", "has 1.0 kB free")
    assert proc.returncode == 2 and "DOES NOT FIT" in proc.stdout and "2 seed(s) x cycles 0-3" in proc.stdout
    assert "backbone train" in proc.stdout and "per seed outside its cycles" in proc.stdout
    assert not (out / "preflight").exists()


@pytest.mark.parametrize("script, message", [
    ("import sys; print('error: the data is missing', file=sys.stderr); sys.exit(2)", "cycle0-adapt: the data is missing"),
    ("raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')", "cycle0-adapt ran out of GPU memory"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "was killed (SIGKILL"),
    ("raise SystemExit(3)", "failed with exit status 3"),
])
def test_a_stage_that_fails_is_one_line_naming_it(tmp_path, script, message):
    from common.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        preflight.run_stage([sys.executable, "-c", script], tmp_path / "cycle0-adapt.log", tmp_path / "r.jsonl",
                            tmp_path)
    assert "\n" not in str(err.value)


def test_a_stage_reports_its_wall_time_and_peak_memory(tmp_path):
    wall, rss = preflight.run_stage([sys.executable, "-c", "x = bytearray(200_000_000)"], tmp_path / "s.log",
                                    tmp_path / "r.jsonl", tmp_path)
    assert wall > 0 and rss > 200_000_000
