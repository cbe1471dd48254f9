"""The whole CIFAR-10 pipeline, every stage of cycles 0-2, on a generated archive in the real
torchvision format with a 2-layer torchvision VisionTransformer (CPU): run.sh interrupted and
resumed, the artifacts checked against each other, the notebook executed on the result; plus the
corrected preset's λ sweep, torchrun (DDP) adaptation and the benchmark script."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT / "CIFAR-10"
sys.path.insert(0, str(CIFAR_DIR))

import cifar  # noqa: E402

from common.activation_cache import ActivationCache, cache_complete  # noqa: E402
from common.checkpoint import load_state  # noqa: E402
from common.config import Config  # noqa: E402
from common.io import read_json  # noqa: E402
from common.results import METRIC_COLUMNS  # noqa: E402
from common.sae import SparseAutoencoder  # noqa: E402
from common.sharpening import sharpen  # noqa: E402
from common.targets import TargetTable  # noqa: E402

ENV = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}


def run_sh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CIFAR_DIR / "run.sh"), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, **kwargs)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """run.sh --smoke for cycles 0-2, interrupted (SIGINT to the whole process group) once cycle 1's
    adaptation has finished, then the same command again to resume and finish."""
    tmp = tmp_path_factory.mktemp("cifar_smoke")
    data, out = tmp / "data", tmp / "run"
    cifar.write_cifar10_archive(data, n_train=300, n_test=100)
    args = ["--smoke", "--out", str(out), "--data-root", str(data), "--cycles", "2"]
    with open(tmp / "first.log", "w") as log:
        proc = subprocess.Popen(["bash", str(CIFAR_DIR / "run.sh"), *args], cwd=ROOT, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        marker = out / "seed_42" / "cycle_1" / "adapt.done"
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        interrupted = proc.poll() is None
        if interrupted:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    assert marker.exists(), (tmp / "first.log").read_text()[-3000:]
    before = {p: p.stat().st_mtime_ns for p in (out / "seed_42" / "cycle_0").glob("*.safetensors")}
    before[marker] = marker.stat().st_mtime_ns
    second = run_sh(*args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"out": out, "data": data, "interrupted": interrupted, "before": before, "second": second}


def cycle(smoke, k: int) -> Path:
    return smoke["out"] / "seed_42" / f"cycle_{k}"


def test_every_stage_of_every_cycle_wrote_its_artifacts(smoke):
    summary = pd.read_csv(smoke["out"] / "summary.csv")
    assert list(summary["cycle"]) == [0, 1, 2] and set(summary["seed"]) == {42}
    for column in METRIC_COLUMNS:
        assert summary[column].notna().all() and np.isfinite(summary[column]).all(), column
    for k in range(3):
        d = cycle(smoke, k)
        for stage in ("adapt", "extract", "sae", "metrics") + (("sharpen",) if k < 2 else ()):
            assert (d / f"{stage}.done").is_file(), (k, stage)
        assert not (d / "sharpen.done").exists() or k < 2
        for split, n in (("train", 270), ("val", 30), ("test", 100)):
            assert cache_complete(d / "activations" / split) and len(ActivationCache(d / "activations" / split)) == n
        metrics = read_json(d / "metrics.json")
        assert metrics["experiment"] == "CIFAR-10" and metrics["cycle"] == k and metrics["seed"] == 42
        assert 0 <= metrics["acc"] <= 100 and 0 <= metrics["probe"] <= 100 and 0 < metrics["l0"] <= 64
    assert read_json(cycle(smoke, 1) / "adapt.json")["aux_lambda"] == 0.01  # Table 7
    assert "CIFAR-10" in smoke["second"].stdout and "Table 4" in smoke["second"].stdout  # common.compare


def test_resume_skips_what_finished_before_the_interruption(smoke):
    assert smoke["interrupted"], "run.sh finished before it could be interrupted; the resume was not exercised"
    for path, mtime in smoke["before"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed on resume"
    assert "adapt: already finished, skipped" in smoke["second"].stdout + smoke["second"].stderr
    leftovers = [p for p in smoke["out"].rglob("*.tmp")] + list(smoke["out"].rglob("adapt_state.pt"))
    assert not leftovers


def test_cycles_fine_tune_only_the_encoder_of_the_previous_model(smoke):
    prev, _ = load_state(cycle(smoke, 0) / "model.safetensors")
    for k in (1, 2):
        state, meta = load_state(cycle(smoke, k) / "model.safetensors")
        assert meta["cycle"] == k and meta["kind"] == "model"
        frozen = [n for n in state if not n.startswith("encoder.")]
        assert frozen and all(torch.equal(state[n], prev[n]) for n in frozen)  # conv_proj, class token, head
        assert any(not torch.equal(state[n], prev[n]) for n in state if n.startswith("encoder."))
        prev = state


def test_targets_are_the_sharpened_reconstructions_of_each_train_example(smoke):
    d = cycle(smoke, 0)
    split = Config({"data": {"verify_md5": False, "val_fraction": 0.1, "split_seed": 42}})
    labels = torch.as_tensor(cifar.CIFAR10Data(str(smoke["data"]), split).labels("train"))
    table = TargetTable(d / "targets.npy", labels)
    sae = SparseAutoencoder.load(d / "sae.safetensors")
    top = torch.tensor(read_json(d / "sharpen.json")["top_features"])
    cache = ActivationCache(d / "activations" / "train")
    batch = next(cache.iter_batches(50, shuffle=True, seed=1))
    with torch.no_grad():
        expected = sae.decode(sharpen(sae.encode(batch.x), batch.labels, top, "top"))
    torch.testing.assert_close(table.lookup(batch.indices), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch.labels, labels[batch.indices])
    assert read_json(d / "targets.json")["view"] == "augmented"  # faithful: targets from augmented images


def test_notebook_regenerates_the_tables_from_the_run(smoke):
    import nbclient
    import nbformat

    nb = nbformat.read(CIFAR_DIR / "metrics.ipynb", as_version=4)
    os.environ["SAE_CEPTION_SUMMARY"] = str(smoke["out"] / "summary.csv")
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(CIFAR_DIR)}}).execute()
    finally:
        del os.environ["SAE_CEPTION_SUMMARY"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    for n in (1, 2, 3, 4, 5):
        assert f"Table {n}" in text
    assert "99.56" in text  # the paper's baseline accuracy beside ours
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_corrected_preset_sweeps_lambda_on_validation_and_uses_clean_images(tmp_path):
    """Cycles 0-1 of the corrected preset, stages run in-process (faster than a subprocess each)."""
    from conftest import recipe_stages, run_stages

    cifar.write_cifar10_archive(tmp_path / "data", n_train=120, n_test=40, seed=1)
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "common.runs", "--config", str(CIFAR_DIR / "config.yaml"), "--preset",
                    "corrected", "--out", str(out), "--model.arch", "custom", "--model.weights", "none",
                    "--model.image_size", "16", "--data.verify_md5", "false", "--data.num_workers", "0",
                    "--cycles", "1", "--runtime.threads", "1", "--baseline.finetune.epochs", "1",
                    "--baseline.batch_size", "16", "--baseline.finetune.accum_steps", "1",
                    "--adapt.finetune.epochs", "1", "--adapt.batch_size", "16", "--adapt.finetune.accum_steps", "1",
                    "--aux.sweep", "[0.0, 0.5]", "--sae.d_sae", "16", "--sae.epochs", "1",
                    "--sharpen.top_k", "3", "--metrics.recon_top_k", "3", "--metrics.probe.epochs", "1",
                    "--model.custom", "{patch_size: 8, num_layers: 1, num_heads: 2, hidden_dim: 16, mlp_dim: 32}"],
                   cwd=ROOT, check=True, capture_output=True)
    stages = recipe_stages("CIFAR-10")
    for k in (0, 1):
        for name in ("adapt", "extract", "sae", "sharpen", "metrics"):  # one stage script at a time
            run_stages("CIFAR-10", stages, [name], ["--run-dir", out, "--cycle", k, "--device", "cpu",
                                                    "--data-root", tmp_path / "data"])
    d0, d1 = out / "seed_42" / "cycle_0", out / "seed_42" / "cycle_1"
    adapt = read_json(d1 / "adapt.json")
    sweep = {row["aux_lambda"]: row["val_acc"] for row in adapt["sweep"]}
    assert set(sweep) == {0.0, 0.5} and adapt["selected_on"] == "val_acc"
    best = max(sweep.values())
    assert adapt["aux_lambda"] == min(lam for lam, acc in sweep.items() if acc == best)  # ties: first in the grid
    assert not list((d1 / "sweep").rglob("model.safetensors"))  # keep_sweep_models false
    assert read_json(d0 / "targets.json")["view"] == "clean"
    assert read_json(d0 / "sae.json")["config"]["decoder_norm"] == "features"
    sae = SparseAutoencoder.load(d0 / "sae.safetensors")
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(16))
    assert read_json(d0 / "sae_train.json")["on_the_fly"] is False
    m = read_json(d1 / "metrics.json")
    assert all(m[c] is not None and math.isfinite(m[c]) for c in METRIC_COLUMNS)


def test_adapt_and_extract_run_under_torchrun(tmp_path):
    """Two CPU processes (gloo): DDP fine-tune and sharded extraction give the same accuracy and the
    same activations as one process evaluating the saved model; cycle 1's DDP fine-tune with the
    auxiliary loss changes only the encoder."""
    from common.finetune import build_loader, evaluate

    data, out = tmp_path / "data", tmp_path / "run"
    cifar.write_cifar10_archive(data, n_train=100, n_test=30, seed=2)
    subprocess.run([sys.executable, "-m", "common.runs", "--config", str(CIFAR_DIR / "config.yaml"), "--out", str(out),
                    "--model.arch", "custom", "--model.weights", "none", "--model.image_size", "16",
                    "--data.verify_md5", "false", "--data.num_workers", "0", "--runtime.threads", "1",
                    "--baseline.finetune.epochs", "1", "--baseline.batch_size", "8", "--baseline.eval_batch_size", "4",
                    "--baseline.finetune.accum_steps", "2", "--activations.batch_size", "8",
                    "--adapt.finetune.epochs", "1", "--adapt.finetune.accum_steps", "2", "--sae.d_sae", "32",
                    "--sae.epochs", "1", "--sharpen.top_k", "4", "--metrics.recon_top_k", "4"],
                   cwd=ROOT, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(CIFAR_DIR / "cycle.py"), "--run-dir", str(out), "--device", "cpu", "--data-root", str(data)]
    res = subprocess.run(torchrun + ["--stages", "adapt,extract"], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    d = out / "seed_42" / "cycle_0"
    meta = read_json(d / "model.json")
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg = Config(cfg)
    model = cifar.build_vit(cfg, pretrained=False)
    from common.checkpoint import load_module

    load_module(d / "model.safetensors", model)
    test = cifar.CIFAR10Data(str(data), cfg).dataset("test", augment=False)
    assert evaluate(model, build_loader(test, 7, train=False), torch.device("cpu")) == pytest.approx(meta["test_acc"])
    cache = ActivationCache(d / "activations" / "test")
    assert cache.indices.tolist() == list(range(30))
    from common.hooks import ActivationCapture

    images = torch.stack([test[i][0] for i in range(30)])
    with torch.no_grad(), ActivationCapture(model, "encoder", "cls_token") as cap:
        model.eval()(images)
    torch.testing.assert_close(cache.read_all(), cap.pop().half().float())

    from conftest import recipe_stages, run_stages

    run_stages("CIFAR-10", recipe_stages("CIFAR-10"), ["sae", "sharpen"],
               ["--run-dir", out, "--device", "cpu", "--data-root", data])
    res = subprocess.run(torchrun + ["--cycle", "1", "--stages", "adapt"], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    adapt = read_json(out / "seed_42" / "cycle_1" / "adapt.json")
    assert adapt["aux_lambda"] == 0.01 and adapt["history"][0]["train_aux"] > 0
    before, _ = load_state(d / "model.safetensors")
    after, _ = load_state(out / "seed_42" / "cycle_1" / "model.safetensors")
    assert all(torch.equal(after[n], before[n]) for n in after if not n.startswith("encoder."))
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("encoder."))


def test_benchmark_script_measures_a_fine_tune_step(tmp_path):
    res = subprocess.run([sys.executable, str(CIFAR_DIR / "benchmark_step.py"), "--arch", "custom", "--image-size", "32",
                          "--device", "cpu", "--precisions", "fp32", "--steps", "2", "--batch-size", "4",
                          "--json", str(tmp_path / "bench.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = read_json(tmp_path / "bench.json")
    assert result["device"] == "cpu" and result["results"][0]["precision"] == "fp32"
    assert result["results"][0]["images_per_s"] > 0
