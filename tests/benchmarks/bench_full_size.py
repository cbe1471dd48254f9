"""The two full-size models without their weights, on the CPU: what one fine-tune step and one
extraction batch cost, so that the READMEs' sizes can be checked on a machine without a GPU.

    python tests/benchmarks/bench_full_size.py                      # both models, batch 1 (step) / 2 (extract)
    python tests/benchmarks/bench_full_size.py --only vit_step --step-batch 1

* ``vit_*``: torchvision ``vit_h_14`` as CIFAR-10 builds it (``cifar.build_vit``, 384 px: 1 + 27 x 27
  tokens, a 10-class head), random weights. ``vit_step``: one optimizer step of what cycle k >= 1 trains
  (``adapt.trainable``: the encoder; SGD with momentum, CE + lambda * cosine aux on the CLS token,
  gradient clipping, from CIFAR-10/config.yaml). ``vit_extract``: one batch through the frozen model
  with the hook on the CLS token; then the model checkpoint is saved (``common.checkpoint``) and sized.
* ``convnext_*``: timm ``convnextv2_large`` at 384 px, random weights. ``convnext_backbone``: one batch
  of pooled backbone features (what the backbone cache and every extraction without it compute);
  ``convnext_step``: one optimizer step of ``head.norm`` + ``head.fc`` on pooled features (what adapt
  trains once the backbone cache exists), and the sizes of the adapted-head and the whole-model
  checkpoints.

* ``flops``: forward FLOPs per image of both (torch's FlopCounterMode on the meta device, 2 per
  multiply-add; normalisation layers are not counted).

Each measurement runs in its own process, one model at a time; peak memory is that process's peak
resident set (``VmHWM`` in /proc/self/status: torch allocates outside Python's allocator, so
tracemalloc and friends miss it), including the interpreter and torch (``baseline`` row).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEASUREMENTS = ("baseline", "flops", "vit_extract", "vit_step", "convnext_backbone", "convnext_step")


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def params(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def saved_size_gb(state: dict) -> float:
    from common.checkpoint import save_state

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_state(path, state, {})
        return path.stat().st_size / 1e9


def vit_cfg():
    from common.config import Config, load_config

    return Config(load_config(ROOT / "CIFAR-10" / "config.yaml", "faithful",
                              {"model.arch": "vit_h_14", "model.weights": "none", "model.image_size": 384}))


def measure(name: str, batch: int) -> dict:
    import torch

    torch.manual_seed(0)
    result: dict = {"measurement": name, "batch": batch, "threads": torch.get_num_threads()}
    if name == "baseline":
        result["peak_rss_gb"] = peak_rss_gb()
        return result
    if name == "flops":
        return {**result, **forward_flops()}
    if name.startswith("vit"):
        sys.path.insert(0, str(ROOT / "CIFAR-10"))
        from cifar import build_vit

        from common.hooks import ActivationCapture

        cfg = vit_cfg()
        model = build_vit(cfg, 10, pretrained=True)  # model.weights none: random weights
        result["rss_after_build_gb"] = rss_gb()
        images = torch.randn(batch, 3, 384, 384)
        result["tokens"] = int(model.encoder.pos_embedding.shape[1])
        if name == "vit_extract":
            model.eval().requires_grad_(False)
            result["params_total"], _ = params(model)
            started = time.perf_counter()
            with torch.no_grad(), ActivationCapture(model, "encoder", "cls_token") as cap:
                model(images)
                cls = cap.pop()
            result["seconds"] = time.perf_counter() - started
            result["activation_shape"] = list(cls.shape)
            result["peak_rss_gb"] = peak_rss_gb()  # before the checkpoint is written
            result["checkpoint_gb"] = saved_size_gb(model.state_dict())
            return result
        from common.aux_loss import aux_loss
        from common.finetune import FinetuneConfig, _make_optimizer, select_trainable

        ft = FinetuneConfig.from_dict(cfg["adapt"]["finetune"], amp="none", aux_lambda=0.01)
        model.train()
        trainable = select_trainable(model, cfg["adapt"]["trainable"])
        result["params_total"], result["params_trainable"] = params(model)
        optimizer = _make_optimizer(trainable, ft)
        labels = torch.randint(0, 10, (batch,))
        targets = torch.randn(batch, model.hidden_dim)
        started = time.perf_counter()
        with ActivationCapture(model, "encoder", "cls_token", detach=False) as cap:
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels) + ft.aux_lambda * aux_loss(cap.pop(), targets, ft.aux_kind)
        forward = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, ft.clip_grad)
        optimizer.step()  # the first step allocates the momentum buffers
        optimizer.zero_grad(set_to_none=True)
        result.update(seconds=time.perf_counter() - started, forward_seconds=forward - started,
                      optimizer=f"{ft.optimizer} momentum {ft.momentum}", peak_rss_gb=peak_rss_gb(),
                      momentum_gb=sum(s["momentum_buffer"].numel() * 4 for s in optimizer.state.values()) / 1e9,
                      trainable_gb=sum(p.numel() * 4 for p in trainable) / 1e9)
        return result
    import timm

    sys.path.insert(0, str(ROOT / "ImageNet1K"))
    from imagenet import HeadOnly

    model = timm.create_model("convnextv2_large", pretrained=False, num_classes=1000)
    result["rss_after_build_gb"] = rss_gb()
    result["params_total"] = params(model)[0]
    if name == "convnext_backbone":
        model.eval().requires_grad_(False)
        images = torch.randn(batch, 3, 384, 384)
        started = time.perf_counter()
        with torch.no_grad():
            pooled = model.head.global_pool(model.forward_features(images)).flatten(1)
        result.update(seconds=time.perf_counter() - started, activation_shape=list(pooled.shape),
                      peak_rss_gb=peak_rss_gb(), checkpoint_whole_gb=saved_size_gb(model.state_dict()))
        return result
    from common.finetune import FinetuneConfig, _make_optimizer, select_trainable

    cfg = _imagenet_cfg()
    ft = FinetuneConfig.from_dict(cfg["adapt"]["finetune"], amp="none", aux_lambda=0.01)
    model.requires_grad_(False)
    trainable = select_trainable(model, cfg["adapt"]["trainable"])
    result["params_trainable"] = sum(p.numel() for p in trainable)
    head = HeadOnly(model).train()
    optimizer = _make_optimizer(trainable, ft)
    pooled, labels = torch.randn(batch, model.num_features), torch.randint(0, 1000, (batch,))
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(head(pooled), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, ft.clip_grad)
    optimizer.step()
    head_names = {n for n, p in model.named_parameters() if p.requires_grad}
    result.update(seconds=time.perf_counter() - started, peak_rss_gb=peak_rss_gb(),
                  checkpoint_head_mb=saved_size_gb({n: t for n, t in model.state_dict().items()
                                                    if n in head_names}) * 1000)
    return result


def forward_flops() -> dict:
    """Forward FLOPs per image (torch's FlopCounterMode: 2 per multiply-add) on the meta device."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "CIFAR-10"))
    from cifar import build_vit

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.device("meta"):
        vit = build_vit(vit_cfg(), 10, pretrained=True)
        convnext = timm.create_model("convnextv2_large", pretrained=False, num_classes=1000)
        image = torch.empty(1, 3, 384, 384)
        return {"vit_h_14_gflop": count(lambda: vit(image)) / 1e9,
                "convnext_backbone_gflop": count(lambda: convnext.head.global_pool(convnext.forward_features(image))) / 1e9,
                "convnext_head_mflop": count(lambda: convnext.head(torch.empty(1, 1536, 1, 1))) / 1e6}


def _imagenet_cfg() -> dict:
    from common.config import load_config

    return load_config(ROOT / "ImageNet1K" / "config.yaml", "faithful", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma list of {', '.join(MEASUREMENTS)}")
    parser.add_argument("--step-batch", type=int, default=1, help="images per fine-tune step (ViT-H)")
    parser.add_argument("--extract-batch", type=int, default=2, help="images per extraction batch")
    parser.add_argument("--head-batch", type=int, default=64, help="pooled features per ConvNeXt head step")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one measurement, JSON on stdout
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch)))
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch on the CPU, fp32")
    batches = {"vit_step": args.step_batch, "vit_extract": args.extract_batch,
               "convnext_backbone": args.extract_batch, "convnext_step": args.head_batch, "baseline": 1, "flops": 1}
    for name in args.only.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(batches[name])],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1:] or ["killed by a signal (out of memory?)"]
            sys.exit(f"error: {name} failed with exit status {proc.returncode}: {why[0]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(result))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
