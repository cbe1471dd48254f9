"""DIGIT-MNIST end to end on MNIST files written in the real idx.gz format: run.sh, resume, notebook, bad input."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import torch
import pytest

from common.results import METRIC_COLUMNS
from conftest import REPO, assert_one_line_error, run, write_fake_mnist

EXP = REPO / "DIGIT-MNIST"
TINY = ["--data.val_size", "100", "--train.epochs", "2", "--sae.d_sae", "32", "--sharpen.top_k", "4",
        "--metrics.probe_max_iter", "50"]


def run_sh(data, out, *extra, preset="faithful"):
    return run(["bash", EXP / "run.sh", "--preset", preset, "--data-root", data, "--out", out, *TINY, *extra])


@pytest.fixture(scope="module")
def full_run(fake_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist-run") / "faithful"
    proc = run_sh(fake_mnist, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_every_artifact_and_metric_column(full_run):
    out, proc = full_run
    summary = pd.read_csv(out / "summary.csv")
    assert set(METRIC_COLUMNS) <= set(summary.columns)
    rows = {(r.experiment, r.cycle) for r in summary.itertuples()}
    assert rows == {("DIGIT-MNIST", k) for k in range(4)} | {("DIGIT-MNIST-random-targets", 1)}
    assert summary["seed"].eq(42).all()
    assert summary[["acc", "probe", "csi", "u", "u_corrected", "l0", "csi_recon", "csi_recon_sharpened",
                    "ari", "sil_s", "dbi", "chi"]].notna().all().all()
    for k in range(4):
        cycle = out / "seed_42" / f"cycle_{k}"
        for name in ("mlp.safetensors", "mlp.json", "sae_h1.safetensors", "sae_h2.safetensors", "train.json",
                     "metrics.json", "train.done", "metrics.done"):
            assert (cycle / name).is_file(), cycle / name
        assert (cycle / "targets.npy").is_file() == (k < 3)
    assert (out / "config.yaml").is_file() and (out / "seed_42" / "random_targets" / "metrics.json").is_file()
    assert "Table 4" in proc.stdout and "91.11" in proc.stdout     # the comparison with the paper is printed


def test_faithful_and_corrected_differ_where_they_should(fake_mnist, tmp_path):
    out = tmp_path / "corrected"
    proc = run_sh(fake_mnist, out, "--aux.sweep", "[0.05, 0.2]", "--cycles", "1", preset="corrected")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["aux"]["kind"] == "cosine" and cfg["sharpen"]["pairing"] == "aligned"
    train = json.loads((out / "seed_42" / "cycle_1" / "train.json").read_text())
    assert [r["aux_lambda"] for r in train["sweep"]] == [0.05, 0.2]      # λ chosen on validation accuracy
    assert train["aux_lambda"] == max(train["sweep"], key=lambda r: r["best_val_acc"])["aux_lambda"]
    assert cfg["metrics"]["recon_top_k_from"] == "train"                  # Table 5's top-k from the training codes


def test_resume_after_a_kill_gives_the_same_summary(fake_mnist, full_run, tmp_path):
    out = tmp_path / "killed"
    cmd = ["bash", EXP / "run.sh", "--data-root", fake_mnist, "--out", out, *TINY]
    env = {**os.environ, "TQDM_DISABLE": "1", "SAE_CEPTION_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "seed_42" / "cycle_1" / "train.done"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)                        # the whole run, mid-flight
    proc.wait()
    assert marker.exists() and not (out / "summary.csv").exists()
    kept = (out / "seed_42" / "cycle_0" / "mlp.safetensors").stat().st_mtime_ns
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "cycle 0: train already done, skipping" in resumed.stdout
    assert (out / "seed_42" / "cycle_0" / "mlp.safetensors").stat().st_mtime_ns == kept
    once = pd.read_csv(full_run[0] / "summary.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), once, check_exact=False, rtol=1e-9)
    assert not list(out.rglob("*.tmp"))                         # nothing half-written survived


def test_notebook_executes_on_the_run(full_run, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(EXP / "metrics.ipynb", as_version=4)
    os.environ["SAE_CEPTION_SUMMARY"] = str(full_run[0] / "summary.csv")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXP)}}).execute()
    finally:
        del os.environ["SAE_CEPTION_SUMMARY"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "91.11" in text and "Table 10" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def stage(script, out, data, *args):
    return run([sys.executable, EXP / script, "--run-dir", out, "--data-root", data, *args])


def rerun_stage_with(full_run, data, tmp_path, key, value, script, cycle):
    """A copy of the full run with one config value changed and ``script``'s stage of ``cycle`` rerun
    on it; returns (the changed config, the cycle folder)."""
    import yaml

    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    section, name = key.split(".")
    cfg[section][name] = value
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    folder = out / "seed_42" / f"cycle_{cycle}"
    (folder / {"evaluate.py": "metrics.done", "sharpen.py": "sharpen.done"}[script]).unlink()
    stage(script, out, data, "--cycle", str(cycle)).check_returncode()
    return cfg, folder


def test_missing_mnist_is_one_line(tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "-m", "common.runs", "--config", EXP / "config.yaml", "--out", out, *TINY], check=True)
    proc = stage("train.py", out, tmp_path / "nowhere", "--cycle", "0")
    assert_one_line_error(proc, "MNIST not found", "train-images-idx3-ubyte.gz")
    assert not (out / "seed_42").exists()


def test_cycle_before_its_predecessor_is_one_line(full_run, fake_mnist, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "-m", "common.runs", "--config", EXP / "config.yaml", "--out", out, *TINY], check=True)
    proc = stage("train.py", out, fake_mnist, "--cycle", "2")
    assert_one_line_error(proc, "run cycle 1")
    assert not (out / "seed_42" / "cycle_2").exists() or not any((out / "seed_42" / "cycle_2").iterdir())


def test_corrupt_checkpoint_is_one_line(full_run, fake_mnist, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    ckpt = out / "seed_42" / "cycle_1" / "sae_h1.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(b"\xff" * 64 + data[64:])                   # same size, garbage header
    (out / "seed_42" / "cycle_1" / "metrics.done").unlink()
    proc = stage("evaluate.py", out, fake_mnist, "--cycle", "1")
    assert_one_line_error(proc, "sae_h1", "corrupt")
    assert not (out / "seed_42" / "cycle_1" / "metrics.done").exists()


def test_targets_from_another_dataset_are_one_line(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    other = write_fake_mnist(tmp_path / "other-data", n_train=600, seed=5)   # same sizes, other labels
    shutil.rmtree(out / "seed_42" / "cycle_1")
    proc = stage("train.py", out, other, "--cycle", "1")
    assert_one_line_error(proc, "another dataset")
    assert not (out / "seed_42" / "cycle_1").exists() or not any((out / "seed_42" / "cycle_1").iterdir())


@pytest.mark.parametrize("override,match", [(["--sharpen.top_k", "300"], "top_k"), (["--data.val_size", "0.5"], "val_size"),
                                            (["--aux.select", "best"], "aux.select"), (["--epochs", "3"], "unknown config key"),
                                            (["--sharpen.mode", "random"], "sharpen.mode")])
def test_impossible_config_is_one_line(tmp_path, override, match):
    proc = run([sys.executable, "-m", "common.runs", "--config", EXP / "config.yaml", "--out", tmp_path / "r", *override])
    assert_one_line_error(proc, match)
    assert not (tmp_path / "r").exists()


def _mnist_module():
    sys.path.insert(0, str(REPO / "DIGIT-MNIST"))
    try:
        import mnist
    finally:
        sys.path.pop(0)
    return mnist


def test_split_cache_gives_the_same_split_and_follows_the_files(tmp_path, monkeypatch):
    mnist = _mnist_module()
    monkeypatch.setenv("SAE_CEPTION_OFFLINE", "1")
    root = write_fake_mnist(tmp_path / "data", n_train=300, n_test=50)
    cfg = {"data": {"val_size": 60, "split_seed": 42}}
    first = mnist.load_splits(str(root), cfg)
    caches = list((root / "MNIST" / "sae-ception").glob("splits-*.pt"))
    assert len(caches) == 1

    def no_archives(*args):
        raise AssertionError("the archives were read although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(mnist, "_split_archives", no_archives)
        cached = mnist.load_splits(str(root), cfg)
    for name in ("train", "val", "test"):
        assert cached[name][0].dtype == torch.float32 and cached[name][1].dtype == torch.int64
        assert torch.equal(cached[name][0], first[name][0]) and torch.equal(cached[name][1], first[name][1])
    assert len(cached["val"][1]) == 60 and float(cached["train"][0].max()) > 1.0     # 0-255, not rescaled

    caches[0].write_bytes(b"damaged")                       # a damaged cache is rebuilt
    assert torch.equal(mnist.load_splits(str(root), cfg)["train"][0], first["train"][0])
    # other split settings, or new files under the same names: another cache entry
    assert not torch.equal(mnist.load_splits(str(root), {"data": {"val_size": 60, "split_seed": 7}})["val"][1],
                           first["val"][1])
    shutil.rmtree(root / "MNIST" / "raw")
    write_fake_mnist(root, n_train=300, n_test=50, seed=1)
    assert not torch.equal(mnist.load_splits(str(root), cfg)["test"][0], first["test"][0])


def test_stage_graph_of_a_seed(tmp_path):
    """train k builds on sharpen k-1, sharpen and metrics on their cycle's train, the ablation on nothing."""
    stage = _mnist_module().stage
    seed = tmp_path / "seed_42"
    after = lambda d, name: [(s.directory.name, s.name) for s in stage(seed / d, name).after]
    assert after("cycle_2", "train") == [("cycle_1", "sharpen")]
    assert after("cycle_0", "train") == [] and after("random_targets", "train") == []
    assert after("cycle_1", "sharpen") == after("cycle_1", "metrics") == [("cycle_1", "train")]
    assert [s.name for s in stage(seed / "cycle_2", "metrics").after[0].after] == ["sharpen"]


def test_rerunning_a_stage_reruns_what_was_built_on_it(full_run, fake_mnist, tmp_path):
    """Remove cycle 1's train marker and rerun: cycle 1 trains again, and everything built on it runs
    again — its targets, cycles 2-3, their metrics (the other lane waits for their new trainings
    instead of taking the old markers); cycle 0 and the ablation are kept."""
    out = tmp_path / "rerun"
    shutil.copytree(full_run[0], out)
    seed = out / "seed_42"
    (seed / "cycle_1" / "train.done").unlink()
    files = {p: p.stat().st_mtime_ns for p in [seed / f"cycle_{k}" / name for k in range(4)
                                               for name in ("mlp.safetensors", "metrics.json")]
             + [seed / "cycle_1" / "targets.npy", seed / "cycle_2" / "targets.npy",
                seed / "random_targets" / "metrics.json"]}
    proc = run_sh(fake_mnist, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = {p for p, mtime in files.items() if p.stat().st_mtime_ns != mtime}
    assert again == {seed / f"cycle_{k}" / name for k in (1, 2, 3) for name in ("mlp.safetensors", "metrics.json")} \
        | {seed / "cycle_1" / "targets.npy", seed / "cycle_2" / "targets.npy"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), pd.read_csv(full_run[0] / "summary.csv"),
                                  check_exact=False, rtol=1e-9)


def test_the_authors_floating_point_path_runs_and_is_recorded(fake_mnist, tmp_path):
    """train.adam plain, train.threads 0 (torch's default) and train.step manual reach the training."""
    import json

    # torch's default thread count as a fresh process sees it (this process may have changed its own)
    default_threads = int(run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                              check=True).stdout)
    for adam, threads, step in (("plain", 0, "autograd"), ("fused", 1, "manual")):
        out = tmp_path / f"{adam}-{step}"
        run([sys.executable, "-m", "common.runs", "--config", EXP / "config.yaml", "--out", out, *TINY,
             "--train.adam", adam, "--train.threads", str(threads), "--train.step", step], check=True)
        stage("train.py", out, fake_mnist, "--cycle", "0").check_returncode()
        train = json.loads((out / "seed_42" / "cycle_0" / "train.json").read_text())
        assert (train["adam"], train["step"]) == (adam, step)
        assert train["threads"] == (1 if threads == 1 else default_threads)


def test_table5_top_k_from_the_training_codes(full_run, fake_mnist, tmp_path):
    """metrics.recon_top_k_from train: the sharpened reconstruction's per-class top-k comes from the
    50k training codes (what the corrected preset uses); test (faithful) from the test codes."""
    import json

    from common import metrics
    from common.sharpening import class_means, top_features

    cfg, cycle = rerun_stage_with(full_run, fake_mnist, tmp_path, "metrics.recon_top_k_from", "train", "evaluate.py", 1)
    mnist = _mnist_module()
    model, saes = mnist.load_checkpoint(cycle, cfg, 42)
    splits = mnist.load_splits(str(fake_mnist), cfg)
    with torch.no_grad():
        codes = {name: saes[1].encode(model(splits[name][0])[1]) for name in ("train", "test")}
    k = cfg["metrics"]["recon_top_k"]
    y_train, y_test = splits["train"][1], splits["test"][1]
    from_train = metrics.reconstruction_csi(saes[1], codes["test"], y_test, k,
                                            top=top_features(class_means(codes["train"], y_train, 10), k))
    from_test = metrics.reconstruction_csi(saes[1], codes["test"], y_test, k)
    got = json.loads((cycle / "metrics.json").read_text())
    faithful = json.loads((full_run[0] / "seed_42" / "cycle_1" / "metrics.json").read_text())
    for name in ("csi_recon", "csi_recon_sharpened"):
        assert got[name] == pytest.approx(from_train[name], rel=1e-12)
        assert faithful[name] == pytest.approx(from_test[name], rel=1e-12)


def test_table5_top_features_follow_the_setting():
    sys.path.insert(0, str(EXP))
    try:
        import evaluate
    finally:
        sys.path.pop(0)
    codes = torch.zeros(20, 6)
    labels = torch.arange(20) % 10
    codes[torch.arange(20), (labels + 1) % 6] = 1.0        # class c's strongest feature is (c + 1) % 6
    from common.config import Config

    assert evaluate.table5_top_features(Config({"recon_top_k_from": "test", "recon_top_k": 1}), codes, labels) is None
    top = evaluate.table5_top_features(Config({"recon_top_k_from": "train", "recon_top_k": 1}), codes, labels)
    assert top[:, 0].tolist() == [(c + 1) % 6 for c in range(10)]


def test_ablation_targets_are_the_seeded_random_rows(full_run, fake_mnist):
    """The ablation's table (write_targets, ``random``) holds random_targets(n, 16, seed), row by row."""
    import yaml

    from common.sharpening import random_targets
    from common.targets import TargetTable

    out = full_run[0]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    x, y = _mnist_module().load_splits(str(fake_mnist), cfg)["train"]
    table = TargetTable(out / "seed_42" / "random_targets" / "targets.npy", y, content=x).all()
    assert torch.equal(table, random_targets(len(y), 16, seed=42))


def test_per_example_sharpening_is_selectable(full_run, fake_mnist, tmp_path):
    """sharpen.mode per_example: row i decodes the k largest codes of the (shuffled-paired) activations."""
    from common.concurrent_training import loader_permutations
    from common.sharpening import per_example_topk
    from common.targets import TargetTable

    cfg, cycle = rerun_stage_with(full_run, fake_mnist, tmp_path, "sharpen.mode", "per_example", "sharpen.py", 0)
    mnist = _mnist_module()
    model, saes = mnist.load_checkpoint(cycle, cfg, 42)
    x, y = mnist.load_splits(str(fake_mnist), cfg)["train"]
    with torch.no_grad():
        h = model(x)[1][loader_permutations(len(x), 42, 2)[1]]
        expected = saes[1].decode(per_example_topk(saes[1].encode(h), cfg["sharpen"]["top_k"]))
    table = TargetTable(cycle / "targets.npy", y, content=x)
    assert table.meta["strategy"] == "per_example"
    torch.testing.assert_close(table.all(), expected)
    before = TargetTable(full_run[0] / "seed_42" / "cycle_0" / "targets.npy", y, content=x).all()
    assert not torch.allclose(table.all(), before)
