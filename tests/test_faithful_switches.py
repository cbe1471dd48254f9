"""The decoupled experiments' faithful switches: CIFAR-10's gradient-free auxiliary term
(``aux.detach``), the per-stage precision of the authors' runs, and Table 5's top-k chosen on
the test or the training codes (``metrics.recon_top_k_from``). Small custom ViTs, generated data, CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import Dataset
from torchvision.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT / "CIFAR-10"
sys.path.insert(0, str(CIFAR_DIR))

import cifar  # noqa: E402

import common.activations as ACT  # noqa: E402
import common.cycle_stages as CS  # noqa: E402
import common.extraction as EX  # noqa: E402
import common.finetune as FT  # noqa: E402
from common.activation_cache import ActivationCache  # noqa: E402
from common.config import Config, load_config  # noqa: E402
from conftest import recipe_stages, run_stages  # noqa: E402
from common.finetune import FinetuneConfig, build_loader, finetune  # noqa: E402
from common.io import read_json  # noqa: E402
from common.metrics import reconstruction_csi  # noqa: E402
from common.sae import SparseAutoencoder  # noqa: E402
from common.sae_training import encode_source  # noqa: E402
from common.sharpening import class_means, top_features  # noqa: E402
from common.targets import TargetTable, save_targets  # noqa: E402

CPU = torch.device("cpu")


class Images(Dataset):
    """(image, label, index): class-dependent mean plus noise, 3 x 16 x 16."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.randn(n, 3, 16, 16, generator=g) + self.y.view(-1, 1, 1, 1).float() * 0.5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=4)


def _fine_tune(tmp_path: Path, aux_lambda: float, detach: bool):
    train = Images(48, 1)
    targets = torch.randn(len(train), 16, generator=torch.Generator().manual_seed(2))
    save_targets(tmp_path / "t.npy", targets, train.y)
    model = _vit()
    cfg = FinetuneConfig(epochs=2, lr=0.05, aux_lambda=aux_lambda, aux_detach=detach, accum_steps=2)
    result = finetune(model, build_loader(train, 8, train=True, seed=3), build_loader(Images(16, 4), 16, train=False),
                      None, cfg, device=CPU, trainable=["encoder"], hook=("encoder", "cls_token"),
                      targets=TargetTable(tmp_path / "t.npy", train.y), log=lambda _: None)
    return model.state_dict(), result.history


def test_detached_aux_term_is_logged_but_changes_no_weight(tmp_path):
    big, big_log = _fine_tune(tmp_path, 0.3, detach=True)
    small, small_log = _fine_tune(tmp_path, 0.01, detach=True)
    assert all(torch.equal(big[k], small[k]) for k in big)                 # bit-identical: λ moved nothing
    assert all(r["train_aux"] > 0.1 for r in big_log + small_log)          # ... though the term was computed
    assert [r["train_ce"] for r in big_log] == [r["train_ce"] for r in small_log]
    live_big, live_log = _fine_tune(tmp_path, 0.3, detach=False)
    live_small, _ = _fine_tune(tmp_path, 0.01, detach=False)
    assert any(not torch.equal(live_big[k], live_small[k]) for k in live_big)   # with its gradient, λ matters
    assert all(r["train_aux"] > 0.1 for r in live_log)


def test_detach_is_on_in_faithful_cifar_only():
    def detach(config: Path, preset: str) -> bool:
        return load_config(config, preset)["aux"]["detach"]

    assert detach(CIFAR_DIR / "config.yaml", "faithful") is True
    assert detach(CIFAR_DIR / "config.yaml", "corrected") is False
    assert detach(ROOT / "ImageNet1K" / "config.yaml", "faithful") is False
    assert detach(ROOT / "ImageNet1K" / "config.yaml", "corrected") is False


# ----------------------------------------------------------------------------- precision per stage
def _init(out: Path, preset: str, *more: str) -> None:
    subprocess.run([sys.executable, "-m", "common.runs", "--config", str(CIFAR_DIR / "config.yaml"), "--preset", preset,
                    "--out", str(out), "--model.arch", "custom", "--model.weights", "none", "--model.image_size", "16",
                    "--data.verify_md5", "false", "--data.num_workers", "0", "--cycles", "1", "--runtime.threads", "1",
                    "--baseline.finetune.epochs", "1", "--baseline.batch_size", "16",
                    "--baseline.finetune.accum_steps", "1", "--adapt.finetune.epochs", "1", "--adapt.batch_size", "16",
                    "--adapt.finetune.accum_steps", "1", "--aux.lambdas", "[0.1]", "--sae.d_sae", "16",
                    "--sae.epochs", "1", "--sharpen.top_k", "3", "--metrics.recon_top_k", "3",
                    "--metrics.probe.epochs", "1",
                    "--model.custom", "{patch_size: 8, num_layers: 1, num_heads: 2, hidden_dim: 16, mlp_dim: 32}",
                    *more], cwd=ROOT, check=True, capture_output=True)


@pytest.fixture()
def recorded(monkeypatch):
    """What reaches the autocast arguments of extraction, on-the-fly SAE data and test evaluation. A CPU
    never autocasts, so the configured mode is recorded and the real call then runs in fp32."""
    calls = {"extract": {}, "sae_data": [], "test_eval": []}
    modes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    for module in [CS, *STAGES["_modules"]]:
        if hasattr(module, "amp_dtype"):
            monkeypatch.setattr(module, "amp_dtype", lambda device, amp: modes[amp])
    real_extract, real_source, real_evaluate = EX.extract, ACT.ModelActivationSource.__init__, FT.evaluate

    def extract(*args, autocast_dtype=None, dtype="float16", **kw):
        calls["extract"][Path(args[4]).name] = (autocast_dtype, dtype)
        return real_extract(*args, autocast_dtype=None, dtype=dtype, **kw)

    def source(self, *args, autocast=None, **kw):
        calls["sae_data"].append(autocast)
        real_source(self, *args, autocast=None, **kw)

    def evaluate(*args, amp="none", desc="eval", **kw):
        if desc.endswith("test"):
            calls["test_eval"].append((desc, amp))
        return real_evaluate(*args, amp="none", desc=desc, **kw)

    monkeypatch.setattr(EX, "extract", extract)
    monkeypatch.setattr(ACT.ModelActivationSource, "__init__", source)
    monkeypatch.setattr(FT, "evaluate", evaluate)
    return calls


STAGES = recipe_stages("CIFAR-10")   # the recipe scripts' stage functions, run in-process


def _run_cycles(out: Path, data: Path, stages=("adapt", "extract", "sae", "sharpen", "metrics"), cycles=(0, 1)) -> None:
    for k in cycles:
        names = [n for n in stages if not (n == "sharpen" and k == cycles[-1])]
        run_stages("CIFAR-10", STAGES, names, ["--run-dir", out, "--cycle", k, "--device", "cpu", "--data-root", data])


def test_faithful_cifar_runs_each_stage_at_the_authors_precision(tmp_path, recorded):
    cifar.write_cifar10_archive(tmp_path / "data", n_train=80, n_test=40, seed=1)
    out = tmp_path / "run"
    _init(out, "faithful")
    _run_cycles(out, tmp_path / "data")
    fp16 = torch.float16
    # targets' train split and the metrics' test split under fp16 autocast; the SAE's validation split
    # and the probe's codes from an fp32 pass, stored as float32
    assert recorded["extract"] == {"train": (fp16, "float16"), "val": (None, "float32"), "test": (fp16, "float16"),
                                   "probe_train": (None, "float32"), "probe_test": (None, "float32")}
    assert recorded["sae_data"] == [None, None]                   # the SAE's training data: fp32, both cycles
    assert recorded["test_eval"] == [("baseline test", "none"), ("cycle 1 λ=0.1 test", "fp16")]
    cycle = out / "seed_42" / "cycle_1"
    assert ActivationCache(cycle / "activations" / "probe_test").meta["amp"] == "none"
    assert (cycle / "activations" / "probe_train" / "manifest.json").is_file()


def test_corrected_cifar_shares_one_precision(tmp_path, recorded):
    cifar.write_cifar10_archive(tmp_path / "data", n_train=80, n_test=40, seed=1)
    out = tmp_path / "run"
    _init(out, "corrected", "--aux.sweep", "[0.1]")
    _run_cycles(out, tmp_path / "data", stages=("adapt", "extract"), cycles=(0,))
    fp16 = torch.float16
    assert recorded["extract"] == {"train": (fp16, "float16"), "val": (fp16, "float16"), "test": (fp16, "float16")}
    assert recorded["test_eval"] == [("baseline test", "none")]


def test_imagenet_faithful_probe_is_scored_on_fp32_test_codes():
    def plan(preset):
        cfg = load_config(ROOT / "ImageNet1K" / "config.yaml", preset)
        return {e.name: (e.amp, e.dtype) for e in CS.extractions(Config(cfg))}, cfg

    faithful, cfg = plan("faithful")
    assert faithful == {"train": ("fp16", "float16"), "val": ("fp16", "float16"), "test": ("fp16", "float16"),
                        "probe_test": ("none", "float32")}
    for section in ("baseline", "adapt"):
        assert FinetuneConfig.from_dict(cfg[section]["finetune"]).eval_test_amp == "none"
    assert set(plan("corrected")[0]) == {"train", "val", "test"}


# ----------------------------------------------------------------------------- Table 5's top-k
def test_table5_top_k_from_the_test_or_the_training_codes(tmp_path):
    cifar.write_cifar10_archive(tmp_path / "data", n_train=80, n_test=40, seed=1)
    out = tmp_path / "run"
    _init(out, "corrected", "--aux.sweep", "[0.1]", "--cycles", "0", "--metrics.recon_top_k_from", "test")
    _run_cycles(out, tmp_path / "data", cycles=(0,))
    cycle = out / "seed_42" / "cycle_0"
    sae = SparseAutoencoder.load(cycle / "sae.safetensors").eval()
    test, train = ActivationCache(cycle / "activations" / "test"), ActivationCache(cycle / "activations" / "train")
    with torch.no_grad():
        codes, train_codes = encode_source(sae, test), encode_source(sae, train)
        on_test = reconstruction_csi(sae, codes, test.labels, 3)
        on_train = reconstruction_csi(sae, codes, test.labels, 3,
                                      top=top_features(class_means(train_codes, train.labels, 10), 3))
    assert on_test != on_train                       # the two choices of top-k differ on these codes
    assert read_json(cycle / "metrics.json")["csi_recon_sharpened"] == pytest.approx(on_test["csi_recon_sharpened"])
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["metrics"]["recon_top_k_from"] = "train"
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    (cycle / "metrics.done").unlink()
    _run_cycles(out, tmp_path / "data", stages=("metrics",), cycles=(0,))
    metrics = read_json(cycle / "metrics.json")
    assert metrics["csi_recon_sharpened"] == pytest.approx(on_train["csi_recon_sharpened"])
    assert metrics["csi_recon"] == pytest.approx(on_train["csi_recon"])
