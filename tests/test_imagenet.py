"""ImageNet1K: data, model, the backbone-feature cache, and the whole pipeline on a generated ImageFolder tree
with timm convnextv2_atto (random weights) on the CPU."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "ImageNet1K"
sys.path.insert(0, str(EXP))

from imagenet import (BACKBONE_HOOK, HeadOnly, ImageNetData, build_convnext, check_config, load_convnext, save_convnext,  # noqa: E402
                      split_rows, write_imagefolder)

from common.activation_cache import CacheDataset  # noqa: E402
from common.aux_loss import aux_loss  # noqa: E402
from common.config import Config, load_config  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.extraction import extract  # noqa: E402
from common.finetune import FinetuneConfig, build_loader, finetune  # noqa: E402
from common.hooks import ActivationCapture  # noqa: E402
from common.targets import TargetTable, save_targets  # noqa: E402

SMALL = {"model.name": "convnextv2_atto", "model.weights": "none", "data.image_size": 32, "data.val_size": 6,
         "data.num_workers": 0}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inet")
    write_imagefolder(root / "imagenet", n_classes=4, n_train=8, n_val=3, size=36, seed=1)
    return root


def small_cfg(preset: str = "faithful", **overrides) -> Config:
    return Config(load_config(EXP / "config.yaml", preset, {**SMALL, **overrides}))


def test_split_is_a_seeded_permutation():
    train, val = split_rows(100, 25, 42)
    assert len(train) == 75 and len(val) == 25
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again = split_rows(100, 25, 42)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, split_rows(100, 25, 43)[1])
    with pytest.raises(UserError, match="val_size"):
        split_rows(10, 10, 42)


def test_splits_yield_their_index_and_labels(data_root):
    data = ImageNetData(str(data_root), small_cfg())
    train, val, test = (data.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (26, 6, 12)
    image, label, index = train[3]
    assert image.shape == (3, 32, 32) and index == 3 and label == int(data.labels("train")[3])
    folder = data.folder(True)
    assert set(folder.targets[r] for r in data.rows("val").tolist()) <= set(range(4))
    assert data.labels("test").tolist() == sorted(data.labels("test").tolist())  # ImageFolder order, no shuffle
    assert set(data.rows("train").tolist()).isdisjoint(data.rows("val").tolist())


def test_missing_data_is_one_line(tmp_path):
    data = ImageNetData(str(tmp_path), small_cfg())
    with pytest.raises(UserError, match=r"ImageNet training folder .*imagenet/train not found; arrange ImageNet"):
        data.labels("train")
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        data.labels("train")


def test_pretrained_weights_need_all_classes(data_root):
    data = ImageNetData(str(data_root), small_cfg(**{"model.weights": "pretrained"}))
    with pytest.raises(UserError, match="has 4 class folders; the pretrained classifier needs the 1000"):
        data.labels("train")


def test_missing_weights_offline_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no network here anyway; offline mode skips the retries
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"pretrained weights of convnextv2_atto .* --model.weights"):
        build_convnext(small_cfg(**{"model.weights": "pretrained"}), pretrained=True)
    with pytest.raises(UserError, match="model.weights file .* not found"):
        build_convnext(small_cfg(**{"model.weights": str(tmp_path / "w.safetensors")}), pretrained=True)


def test_local_weights_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = build_convnext(small_cfg(), pretrained=False)
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = build_convnext(small_cfg(**{"model.weights": str(tmp_path / "w.safetensors")}), pretrained=True)
    assert torch.equal(loaded.head.fc.weight, reference.head.fc.weight)


def test_validation_rejects_a_backbone_cache_with_a_trainable_backbone():
    with pytest.raises(UserError, match="backbone.cache is only valid when only the head trains"):
        check_config(small_cfg(**{"adapt.trainable": ["stages.3", "head"]}))
    check_config(small_cfg(**{"adapt.trainable": ["stages.3", "head"], "backbone.cache": False}))
    with pytest.raises(UserError, match="no augmentation"):
        check_config(small_cfg(**{"adapt.augment": True}))
    with pytest.raises(UserError, match="no augmentation"):
        check_config(small_cfg(**{"activations.train_view": "augmented"}))


def test_cached_backbone_path_equals_the_full_model(data_root, tmp_path):
    """Logits, head.flatten activations, CE + λ·aux losses and one epoch of head-only SGD are the same
    whether the model runs on images or model.head runs on the cached pooled backbone features."""
    torch.manual_seed(0)
    model = build_convnext(small_cfg(), pretrained=False).eval()
    train = ImageNetData(str(data_root), small_cfg()).dataset("train")
    cache = extract(model, train, *BACKBONE_HOOK, tmp_path / "backbone", batch_size=8, chunk_rows=8,
                    dtype="float32")
    assert cache.dim == model.head.norm.normalized_shape[0]
    images = torch.stack([train[i][0] for i in range(len(train))])
    targets = torch.randn(len(train), cache.dim, generator=torch.Generator().manual_seed(1))
    labels = train.labels

    with torch.no_grad(), ActivationCapture(model, "head.flatten", "flatten") as cap:
        logits_full = model(images)
        acts_full = cap.pop()
    head = HeadOnly(model)
    with torch.no_grad(), ActivationCapture(head, "head.flatten", "flatten") as cap:
        logits_cached = head(cache.read_all())
        acts_cached = cap.pop()
    torch.testing.assert_close(logits_cached, logits_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts_cached, acts_full, rtol=1e-5, atol=1e-5)
    loss_full = F.cross_entropy(logits_full, labels) + 0.5 * aux_loss(acts_full, targets, "cosine")
    loss_cached = F.cross_entropy(logits_cached, labels) + 0.5 * aux_loss(acts_cached, targets, "cosine")
    torch.testing.assert_close(loss_cached, loss_full, rtol=1e-5, atol=1e-6)

    # one epoch of the real fine-tuning engine both ways: same batches, same losses, same trained head
    save_targets(tmp_path / "targets.npy", targets, labels)
    table = TargetTable(tmp_path / "targets.npy", labels)
    ft = FinetuneConfig(epochs=1, lr=0.05, momentum=0.9, weight_decay=0.05, clip_grad=1.0, aux_lambda=0.5)
    results = []
    for module, dataset in ((copy.deepcopy(model), train), (None, CacheDataset(cache))):
        if module is None:
            module = HeadOnly(copy.deepcopy(model))
        loader = build_loader(dataset, 8, train=True, seed=0)
        evaluation = build_loader(dataset, 64, train=False)
        res = finetune(module, loader, evaluation, None, ft, device=torch.device("cpu"),
                       trainable=["head.norm", "head.fc"], hook=("head.flatten", "flatten"), targets=table)
        results.append((res.history[0], {k: v.detach().clone() for k, v in module.head.state_dict().items()}))
    (hist_full, head_full), (hist_cached, head_cached) = results
    assert hist_full["train_ce"] == pytest.approx(hist_cached["train_ce"], rel=1e-5)
    assert hist_full["train_aux"] == pytest.approx(hist_cached["train_aux"], rel=1e-5)
    assert hist_full["val_acc"] == hist_cached["val_acc"]
    for name in head_full:
        torch.testing.assert_close(head_cached[name], head_full[name], rtol=1e-4, atol=1e-6)
    assert not torch.equal(head_full["fc.weight"], model.head.fc.weight)  # it did train


# ----------------------------------------------------------------------------- the whole pipeline
SMOKE_CYCLES = 2


def _run_sh(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(EXP / "run.sh"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """`run.sh --smoke` for cycles 0-2: every stage of every cycle, summary.csv and the paper comparison."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = _run_sh("--smoke", "--cycles", str(SMOKE_CYCLES), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Table 4" in proc.stdout and "ImageNet1K" in proc.stdout
    return out


def test_smoke_pipeline_writes_every_artifact(smoke_run):
    import pandas as pd

    from common.activation_cache import ActivationCache
    from common.results import METRIC_COLUMNS

    summary = pd.read_csv(smoke_run / "summary.csv")
    assert summary["cycle"].tolist() == list(range(SMOKE_CYCLES + 1)) and set(summary["seed"]) == {42}
    assert summary[list(METRIC_COLUMNS)].notna().all().all(), summary.T
    assert (summary["acc"] > 25).all()  # 4 classes: better than chance
    assert summary["aux_lambda"].tolist() == [0.0, 0.01, 0.5]
    backbone = smoke_run / "seed_42" / "backbone"  # random weights: one backbone cache per seed
    for split, n in (("train", 40), ("val", 8), ("test", 16)):  # make_smoke_data: 4 classes x (12 + 4), val_size 8
        assert len(ActivationCache(backbone / split)) == n
    for k in range(SMOKE_CYCLES + 1):
        cdir = smoke_run / "seed_42" / f"cycle_{k}"
        for name in ("adapt", "extract", "sae", "metrics") + (("sharpen",) if k < SMOKE_CYCLES else ()):
            assert (cdir / f"{name}.done").is_file(), (k, name)
        acts = ActivationCache(cdir / "activations" / "train")
        assert acts.dim == 320 and len(acts) == 40 and acts.indices.tolist() == list(range(40))
    assert not (smoke_run / "seed_42" / f"cycle_{SMOKE_CYCLES}" / "targets.npy").exists()
    # only the head changes between cycles: the activations of cycle 1 come from a trained head
    a0 = ActivationCache(smoke_run / "seed_42" / "cycle_0" / "activations" / "test").read_all()
    a1 = ActivationCache(smoke_run / "seed_42" / "cycle_1" / "activations" / "test").read_all()
    assert not torch.allclose(a0, a1)


def test_notebook_executes_on_the_run(smoke_run):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXP / "metrics.ipynb", as_version=4)
    os.environ["SAE_CEPTION_SUMMARY"] = str(smoke_run)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        del os.environ["SAE_CEPTION_SUMMARY"]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert str(smoke_run / "summary.csv") in text and "Table 3" in text
    assert any("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)


def _stage(script: str, run: Path, cycle: int, data_root: Path, capsys) -> tuple[int, str]:
    """Run a stage script in this process (as `python ImageNet1K/<script> ...` would)."""
    from conftest import run_script_in_process

    code = run_script_in_process(EXP / script, ["--run-dir", run, "--seed", "42", "--cycle", cycle, "--device", "cpu",
                                                "--data-root", data_root])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_rerun_skips_finished_stages_and_redoes_a_lost_one(smoke_run, capsys):
    import json

    data_root = smoke_run / "data"
    for script in ("adapt.py", "extract.py", "train_sae.py", "sharpen.py", "evaluate.py"):
        code, text = _stage(script, smoke_run, 1, data_root, capsys)
        assert code == 0 and "already finished, skipped" in text, text
    metrics = smoke_run / "seed_42" / "cycle_1" / "metrics.json"
    before = json.loads(metrics.read_text())
    (smoke_run / "seed_42" / "cycle_1" / "metrics.done").unlink()  # as if interrupted before finishing
    code, text = _stage("evaluate.py", smoke_run, 1, data_root, capsys)
    assert code == 0, text
    after = json.loads(metrics.read_text())
    assert after["acc"] == before["acc"] and after["probe"] == pytest.approx(before["probe"])


def test_a_cycle_before_its_predecessor_and_missing_data_are_one_line(smoke_run, tmp_path, capsys):
    from common.runs import init_run

    run = tmp_path / "fresh"
    init_run(["--config", str(EXP / "config.yaml"), "--out", str(run), *sum(([f"--{k}", str(v)]
                                                                             for k, v in SMALL.items()), [])])
    code, text = _stage("adapt.py", run, 1, smoke_run / "data", capsys)
    assert code == 2 and text.strip().splitlines()[-1].startswith("error: cycle 1 'adapt' needs"), text
    code, text = _stage("adapt.py", run, 0, tmp_path / "no-data", capsys)
    assert code == 2 and "ImageNet training folder" in text and "Traceback" not in text, text
    assert not (run / "seed_42" / "cycle_0" / "adapt.done").exists()


def test_later_cycles_never_decode_an_image(smoke_run, tmp_path, capsys):
    """After the one backbone pass, adaptation and extraction run on the cached features: with every JPEG
    replaced by garbage (same file names, so the folder scan and labels are unchanged) cycle 1 redoes its
    adapt and extract stages and gets the same model and the same activations."""
    import shutil

    from common.activation_cache import ActivationCache
    from common.checkpoint import load_state

    garbage = tmp_path / "data"
    shutil.copytree(smoke_run / "data", garbage)
    for path in garbage.rglob("*.JPEG"):
        path.write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("data"))
    cdir = run / "seed_42" / "cycle_1"
    before_model, _ = load_state(cdir / "model.safetensors")
    before = ActivationCache(cdir / "activations" / "train").read_all()
    for name in ("adapt", "extract", "sae", "sharpen", "metrics"):
        (cdir / f"{name}.done").unlink()
    shutil.rmtree(cdir / "activations")
    for script in ("adapt.py", "extract.py"):
        code, text = _stage(script, run, 1, garbage, capsys)
        assert code == 0, text
    after_model, _ = load_state(cdir / "model.safetensors")
    for name in ("head.norm.weight", "head.fc.weight", "head.fc.bias"):
        torch.testing.assert_close(after_model[name], before_model[name])
    torch.testing.assert_close(ActivationCache(cdir / "activations" / "train").read_all(), before)


def test_checkpoints_keep_only_the_adapted_head(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    base = build_convnext(small_cfg(), pretrained=False)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    cfg = small_cfg(**{"model.weights": str(tmp_path / "base.safetensors")})
    model = build_convnext(cfg, pretrained=True)
    with torch.no_grad():
        model.head.fc.weight.add_(1.0)
        model.head.norm.bias.add_(0.5)
    save_convnext(cfg, tmp_path / "model.safetensors", model, {"kind": "model"})
    from common.checkpoint import load_state

    saved, meta = load_state(tmp_path / "model.safetensors")
    assert meta["partial"] and sorted(saved) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    loaded = load_convnext(cfg, tmp_path / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    torch.manual_seed(6)
    save_file(build_convnext(small_cfg(), pretrained=False).state_dict(), str(tmp_path / "other.safetensors"))
    other = small_cfg(**{"model.weights": str(tmp_path / "other.safetensors")})
    with pytest.raises(UserError, match="other base weights"):
        load_convnext(other, tmp_path / "model.safetensors")


def test_torchrun_adapts_and_extracts(smoke_run, tmp_path):
    """Two gloo ranks: the backbone pass splits every batch over the ranks and gives the same cache as one
    process; the head trains under DDP and the cycle's activations are written in dataset order."""
    import json
    import shutil

    from common.activation_cache import ActivationCache

    run = tmp_path / "ddp"
    run.mkdir()
    shutil.copy(smoke_run / "config.yaml", run / "config.yaml")
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXP / "cycle.py"), "--run-dir", str(run), "--cycle", "0", "--device", "cpu",
                           "--data-root", str(smoke_run / "data"), "--stages", "adapt,extract"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for split in ("train", "val", "test"):
        ddp = ActivationCache(run / "seed_42" / "backbone" / split)
        one = ActivationCache(smoke_run / "seed_42" / "backbone" / split)
        assert ddp.indices.tolist() == one.indices.tolist() == list(range(len(one)))
        torch.testing.assert_close(ddp.read_all(), one.read_all())
    adapt = json.loads((run / "seed_42" / "cycle_0" / "adapt.json").read_text())
    assert adapt["trained"] and len(adapt["history"]) == 4
    assert ActivationCache(run / "seed_42" / "cycle_0" / "activations" / "test").indices.tolist() == list(range(16))
    assert not (run / "seed_42" / "cycle_0" / "sae.done").exists()
