"""run.sh's command line (common/launch.py: one parser, in Python) and many machines: two "nodes" of
one process each on localhost (c10d rendezvous, gloo, CPU) against one node of two processes, and the
check that every rank sees the run directory."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, assert_one_line_error, run


def run_sh(experiment: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run(["bash", REPO / experiment / "run.sh", *args], env={"PYTHON": sys.executable}, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, fragments", [
    (["--seeds"], ["--seeds needs a value"]),
    (["--seeds", "0"], ["--seeds must be a positive integer, got '0'"]),
    (["--nproc-per-node", "two"], ["--nproc-per-node must be a positive integer, got 'two'"]),
    (["--jobs", "3"], ["--jobs must be 1 or 2, got '3'"]),
    (["--cycles"], ["override --cycles has no value"]),
    (["cycles", "1"], ["unexpected argument 'cycles'", "see --help"]),
    (["--nnodes", "2"], ["--nnodes 2 needs --rdzv-endpoint HOST:PORT"]),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29500"], ["--node-rank must be 0..1"]),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1"], ["--rdzv-endpoint must be HOST:PORT"]),
    (["--sae.d_sea", "3"], ["unknown config key 'sae.d_sea'"]),
    (["--preset", "fast"], ["unknown preset 'fast'"]),
])
def test_bad_command_lines_are_one_line_before_anything_runs(tmp_path, args, fragments):
    proc = run_sh("CIFAR-10", "--out", tmp_path / "run", *args)
    assert_one_line_error(proc, *fragments)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()


def test_run_sh_lists_the_stages_and_the_launcher_follows_its_table():
    """The stage table is run.sh's (a user's --stage-table is refused; the launcher alone asks for
    it), and a table it cannot read is one line naming the row."""
    import common.launch as L

    for experiment in ("DIGIT-MNIST", "CIFAR-10", "ImageNet1K"):
        assert "--stage-table \"$stages\"" in (REPO / experiment / "run.sh").read_text()
    result = run_sh("DIGIT-MNIST", "--stage-table", "chain train.py 0..C", "--dry-run")
    assert_one_line_error(result, "--stage-table is run.sh's own")
    result = run([sys.executable, "-m", "common.launch", "DIGIT-MNIST", "--seeds", "1"])
    assert_one_line_error(result, "run DIGIT-MNIST/run.sh, which lists its stages")
    rows = L.parse_stage_table("""
        # a comment line
        chain  train.py            0..C     # trailing comment
        chain  evaluate.py         C        alone: --probe-workers 2
        side   evaluate.py --ablation
        side   evaluate.py         0..C-1   after train
    """, decoupled=False)
    assert [(r.lane, r.stage, r.cycles, r.after, r.alone) for r in rows] == [
        ("chain", ("train.py",), "0..C", None, ()), ("chain", ("evaluate.py",), "C", None, ("--probe-workers", "2")),
        ("side", ("evaluate.py", "--ablation"), None, None, ()), ("side", ("evaluate.py",), "0..C-1", "train", ())]
    assert [r.in_cycle(k, 2) for r in rows[3:] for k in range(3)] == [True, True, False]
    for table, fragment in [("lane train.py 0..C", "the lane must be one of chain, side"),
                            ("chain train.py 0..C after train", "'after' is for side-lane stages"),
                            ("side evaluate.py after train", "'after' is for side-lane stages of a cycle"),
                            ("side evaluate.py C alone: --x", "'alone:' is for chain stages"),
                            ("chain 0..C", "no stage"), ("alone: --x", "the lane must be one of"),
                            ("", "the stage table is empty")]:
        with pytest.raises(L.UserError, match=re.escape(fragment)):
            L.parse_stage_table(table, decoupled=False)
    with pytest.raises(L.UserError, match="each at most once and in that order"):
        L.parse_stage_table("cycle extract 0..C\ncycle adapt 0..C", decoupled=True)
    with pytest.raises(L.UserError, match="one stage name and its cycles"):
        L.parse_stage_table("cycle adapt", decoupled=True)
    decoupled = L.parse_stage_table("cycle adapt 0..C torchrun\ncycle sharpen 0..C-1", decoupled=True)
    assert [(r.stage, r.torchrun) for r in decoupled] == [(("adapt",), True), (("sharpen",), False)]


def test_decoupled_cycles_run_the_stages_of_the_table(tmp_path):
    """Each cycle's process is given its rows of run.sh's table; sharpen is left out of the last."""
    lines = run_sh("CIFAR-10", "--out", tmp_path / "o", "--data-root", tmp_path / "d", "--cycles", "1", "--dry-run",
                   check=True).stdout.splitlines()
    cycles = [line for line in lines if "cycle.py" in line]
    assert cycles[0].endswith("--cycle 0 --device auto --data-root " + str(tmp_path / "d") +
                              " --stages adapt,extract,sae,sharpen,metrics")
    assert cycles[1].endswith("--stages adapt,extract,sae,metrics")
    lines = run_sh("ImageNet1K", "--out", tmp_path / "o", "--data-root", tmp_path / "d", "--cycles", "0",
                   "--nproc-per-node", "2", "--dry-run", check=True).stdout.splitlines()
    assert [line.rsplit(" ", 1)[-1] for line in lines if "cycle.py" in line] == ["adapt,extract", "sae,metrics"]


def test_a_stale_init_file_does_not_let_the_side_lane_start_before_the_init(tmp_path):
    """The side lane waits for a file named after the launcher's process id. One left by a killed
    launcher that had the same id is removed first: a bad setting is still one error line (the
    init's), exit 2, no run directory, and the file is gone afterwards."""
    import tempfile

    wrapper = tmp_path / "python"   # becomes the launcher (exec keeps the process id), after leaving the file
    wrapper.write_text(f'#!/bin/sh\ntouch "{tempfile.gettempdir()}/sae-ception-init-$$"\n'
                       f'echo "$$" > "{tmp_path}/pid"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "run"
    result = run(["bash", REPO / "DIGIT-MNIST" / "run.sh", "--out", out, "--data-root", tmp_path / "data",
                  "--seeds", "1", "--train.lr", "-1"], env={"PYTHON": str(wrapper)})
    assert_one_line_error(result, "train.lr must be a number > 0, got -1")
    assert result.returncode == 2 and not out.exists()
    pid = (tmp_path / "pid").read_text().strip()
    assert not (Path(tempfile.gettempdir()) / f"sae-ception-init-{pid}").exists()


def test_mnist_refuses_what_it_cannot_do(tmp_path):
    for args in (["--smoke"], ["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500"], ["--device", "cuda"]):
        assert_one_line_error(run_sh("DIGIT-MNIST", "--out", tmp_path, *args), "DIGIT-MNIST runs on its real data on the CPU")


def test_help_is_the_header_of_run_sh():
    for experiment in ("CIFAR-10", "ImageNet1K", "DIGIT-MNIST"):
        proc = run_sh(experiment, "--help", check=True)
        header = (REPO / experiment / "run.sh").read_text().splitlines()[1]
        assert proc.stdout.splitlines()[0] == header.removeprefix("# ") and "set -" not in proc.stdout
        assert "Its stages, as run.sh lists them:" in proc.stdout and "lane" in proc.stdout   # the table too
    assert "--rdzv-endpoint HOST:PORT" in run_sh("ImageNet1K", "-h", check=True).stdout


def test_dry_run_prints_the_plan_of_each_node(tmp_path):
    """Node 0 writes the run directory, runs the single-process stages and the summary; node 1 only
    joins torchrun and waits for node 0's markers; one machine with one process runs cycle.py."""
    out, data = tmp_path / "run", tmp_path / "data"
    common = ["--out", out, "--data-root", data, "--cycles", "1", "--dry-run"]
    many = ["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29511"]
    node0 = run_sh("ImageNet1K", *common, *many, "--node-rank", "0", check=True).stdout.splitlines()
    node1 = run_sh("ImageNet1K", *common, *many, "--node-rank", "1", check=True).stdout.splitlines()
    one = run_sh("ImageNet1K", *common, "--seeds", "2", check=True).stdout.splitlines()
    assert not out.exists()
    rdzv = "--nnodes 2 --node-rank {} --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29511"
    for node, lines in ((0, node0), (1, node1)):
        torchruns = [line for line in lines if "torch.distributed.run" in line]
        assert len(torchruns) == 2 and all(rdzv.format(node) in line and "-m common.distributed" in line
                                           and line.endswith("--stages adapt,extract") for line in torchruns)
    assert sum("common.runs --config ImageNet1K/config.yaml" in line for line in node0) == 1
    # sharpen in every cycle but the last (run.sh's table), whose targets nothing uses
    assert [line.rsplit(" ", 1)[-1] for line in node0 if "cycle.py" in line and "torch.distributed" not in line] \
        == ["sae,sharpen,metrics", "sae,metrics"]
    assert node0[-1].endswith(f"-m common.results {out}")
    assert not [line for line in node1 if "common.runs" in line or "common.results" in line or "sae,sharpen" in line]
    assert [line for line in node1 if line.startswith("# wait")] == [
        f"# wait for node 0: {out}/seed_42/cycle_0/metrics.done"]  # the last cycle's targets are not needed
    cycles = [line for line in one if "ImageNet1K/cycle.py" in line]
    assert len(cycles) == 4 and "--seed 43 --cycle 1" in cycles[-1] and "torch.distributed" not in "".join(one)
    mnist = run_sh("DIGIT-MNIST", "--out", out, "--data-root", data, "--cycles", "1", "--dry-run", check=True).stdout
    assert "export OMP_NUM_THREADS=1" in mnist and "common.lane --watch $! --" in mnist and "@after" in mnist


def test_mnist_runs_two_seeds_side_by_side_each_in_its_own_lane(tmp_path):
    """--jobs 2 with several seeds: pairs of seeds, one whole seed per lane (no '@after' waits but the
    one for the init: its own lane trained what it evaluates); an odd last seed gets the chain and
    side lanes."""
    out, data = tmp_path / "out", tmp_path / "data"
    lines = run_sh("DIGIT-MNIST", "--out", out, "--data-root", data, "--cycles", "1", "--seeds", "3", "--dry-run",
                   check=True).stdout.splitlines()
    lanes = [line for line in lines if "common.lane" in line]
    assert len(lanes) == 4 and lines.count("wait") == 2
    first, second, third, fourth = lanes
    # the run's init is the first lane's first item (it shares that interpreter's start-up); the
    # lane beside it waits for the file the first lane touches after it
    assert "'@init --config DIGIT-MNIST/config.yaml --preset faithful --out " in first
    gate = first.split("'@touch ")[1].split("'")[0]
    assert "sae-ception-init-" in gate and f"-- '@import torch' '@after {gate}'" in second
    assert not any("@init" in lane or gate in lane for lane in (third, fourth))
    assert not any(line.startswith(sys.executable + " -m common.runs") for line in lines)
    for lane, seed in ((first, "42"), (second, "43")):
        assert "@after" not in lane.replace(f"'@after {gate}'", "") and f"--seed {seed} --cycle 0" in lane
        assert "--ablation" in lane
        assert {"42", "43"} - {seed} <= {s for s in ("42", "43") if f"--seed {s} " not in lane}
    assert "--seed 44 --cycle 1" in third and "@after" in fourth and "ablation.py" in fourth
    # only a chain beside a side lane ends alone, and gives its last probe both cores
    assert [lane.count("--probe-workers 2") for lane in lanes] == [0, 0, 1, 0]
    assert third.endswith("--seed 44 --cycle 1 --probe-workers 2' &")
    one = run_sh("DIGIT-MNIST", "--out", out, "--data-root", data, "--cycles", "1", "--seeds", "2", "--jobs", "1",
                 "--dry-run", check=True).stdout
    # --jobs 1: seed after seed, as before (a cycle-0 wait per seed, and the wait for the init)
    assert one.count("@after") == 3 and "OMP_NUM_THREADS" not in one
    assert "--probe-workers" not in one


def test_overrides_keep_their_order_after_the_smoke_settings(tmp_path):
    lines = run_sh("CIFAR-10", "--smoke", "--out", tmp_path, "--sae.d_sae=32", "--aux.sweep", "[0.1, 0.2]",
                   "--dry-run", check=True).stdout.splitlines()
    init = next(line for line in lines if "common.runs" in line)
    assert init.index("--sae.d_sae 64") < init.index("--sae.d_sae=32")     # later overrides win
    assert init.endswith("--aux.sweep '[0.1, 0.2]'") and f"--root {tmp_path}/data" in lines[0]


SMALL = ["--smoke", "--cycles", "1", "--baseline.finetune.epochs", "1", "--adapt.finetune.epochs", "1",
         "--sae.epochs", "1"]


def start_nodes(outs: list[Path], port: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHON": sys.executable, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    return [subprocess.Popen(["bash", str(REPO / "CIFAR-10" / "run.sh"), *SMALL, "--out", str(out), "--nnodes", "2",
                              "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, out in enumerate(outs)]


def test_two_nodes_give_the_summary_of_one_node_with_two_processes(tmp_path):
    """Two launchers on localhost (each one node of one process, c10d rendezvous) against one launcher
    of two processes (--standalone): the same world size, so the same summary.csv. (Not one process: a
    world size of two splits the batches and the shuffled order over the ranks, so one process gives other
    numbers, measured in docs/cluster.md#tests.)"""
    shared = tmp_path / "two-nodes"
    nodes = start_nodes([shared, shared], free_port())
    results = [node.communicate(timeout=900) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "waiting for node 0 to finish" in results[1][0] and not list(shared.glob(".shared-check-*"))
    one = run_sh("CIFAR-10", *SMALL, "--out", tmp_path / "one-node", "--nproc-per-node", "2", timeout=900)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(shared / "summary.csv"), pd.read_csv(tmp_path / "one-node" / "summary.csv"))


def test_a_run_directory_that_a_node_cannot_see_is_one_line(tmp_path):
    """Two nodes that do not share the run directory (here: each its own --out) stop at the first
    torchrun, each with one error line, before any stage runs."""
    nodes = start_nodes([tmp_path / "node0", tmp_path / "node1"], free_port())
    for node in nodes:
        stdout, stderr = node.communicate(timeout=600)
        assert_one_line_error(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr),
                              "on a filesystem that every node shares")
        assert node.returncode == 2
    assert not list((tmp_path / "node0").glob("seed_*/cycle_0/*.done"))


@pytest.mark.parametrize("experiment", ["CIFAR-10", "ImageNet1K"])
def test_slurm_example_starts_one_launcher_per_node(tmp_path, experiment):
    """The sbatch script under stand-ins for srun (two tasks, SLURM_NODEID 0 and 1) and scontrol:
    each node's run.sh gets its node rank, the first node as rendezvous and the shared --out."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1; echo node2\n")
    (shims / "srun").write_text('#!/usr/bin/env bash\nshift\nfor r in 0 1; do SLURM_NNODES=2 SLURM_NODEID=$r '
                                'SLURM_GPUS_ON_NODE=1 "$@" > "$SHIM_LOG.$r" 2>&1 & done; wait\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    out, log = tmp_path / "run", tmp_path / "node"
    run(["bash", REPO / experiment / "slurm.sbatch", "--cycles", "1", "--dry-run"], check=True,
        env={"PATH": f"{shims}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
             "PYTHON": sys.executable, "SHIM_LOG": str(log), "SLURM_SUBMIT_DIR": str(REPO),
             "SLURM_JOB_NODELIST": "node[1-2]", "OUT": str(out)})
    node0, node1 = (Path(f"{log}.{r}").read_text() for r in (0, 1))
    for rank, plan in enumerate((node0, node1)):
        assert plan.count(f"--nnodes 2 --node-rank {rank} --nproc-per-node 1 --rdzv-backend c10d "
                          f"--rdzv-endpoint 127.0.0.1:29500") == 2, plan
        assert f"--run-dir {out} " in plan and "error" not in plan
    assert f"common.results {out}" in node0 and "# wait for node 0" in node1 and not out.exists()


def test_experiments_are_the_folders_with_a_config_and_a_run_sh(tmp_path, monkeypatch):
    """A fourth experiment needs no entry in common/launch.py: a folder with config.yaml and run.sh is one;
    a cycle.py makes it decoupled, and its smoke settings come from its own smoke.args."""
    import common.launch as L

    assert L.experiments() == ("CIFAR-10", "DIGIT-MNIST", "ImageNet1K")
    fourth = tmp_path / "FOURTH"
    fourth.mkdir()
    for name in ("config.yaml", "run.sh", "cycle.py"):
        (fourth / name).write_text("")
    (fourth / "smoke.args").write_text("# a comment\n--model.width 4 --aux.sweep '[0.1, 0.2]'\n")
    (tmp_path / "notes").mkdir()
    monkeypatch.setattr(L, "REPO", tmp_path)
    assert L.experiments() == ("FOURTH",) and L.is_decoupled("FOURTH")
    assert L.smoke_overrides("FOURTH") == ["--model.width", "4", "--aux.sweep", "[0.1, 0.2]"]
