"""Images/s of the cycle-k fine-tune step of ViT-H/14 at 384 px, fp32 vs bf16 vs fp16 autocast.

Runs the real engine (common.finetune: encoder trainable, SGD, CE + λ·aux towards per-index
targets, gradient clipping) on random weights and generated images, so it needs no download:

    python CIFAR-10/benchmark_step.py                       # vit_h_14, 384 px, batch 8, on the GPU
    python CIFAR-10/benchmark_step.py --precisions fp32,bf16 --steps 30 --json bench.json

Each precision runs two epochs of ``--steps`` optimizer steps over in-memory images; the first is
warm-up, the second is timed (data loading is negligible, so this is the model step). Prints a
Markdown table with the GPU named, ready for the README.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cifar import build_vit

from common.config import Config
from common.errors import cli_main, require
from common.finetune import FinetuneConfig, finetune
from common.io import write_json
from common.seed import pick_device
from common.targets import TargetTable, save_targets


class RandomImages(Dataset):
    def __init__(self, n: int, size: int, classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


def bench(precision: str, args, device: torch.device, workdir: Path) -> dict:
    cfg = Config({"model": {"arch": args.arch, "weights": "none", "image_size": args.image_size,
                            "custom": {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32,
                                       "mlp_dim": 64}}})
    torch.manual_seed(0)
    model = build_vit(cfg, pretrained=False)
    n = args.steps * args.batch_size * args.accum_steps
    data = RandomImages(n, args.image_size)
    width = model.hidden_dim
    save_targets(workdir / "targets.npy", torch.randn(n, width), data.y)
    targets = TargetTable(workdir / "targets.npy", data.y)
    train = DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                       pin_memory=device.type == "cuda")
    val = DataLoader(RandomImages(args.batch_size, args.image_size, seed=1), batch_size=args.batch_size)
    ft = FinetuneConfig(epochs=2, lr=1e-4, optimizer="sgd", momentum=0.9, weight_decay=0.05,
                        accum_steps=args.accum_steps, clip_grad=1.0, amp={"fp32": "none"}.get(precision, precision),
                        aux_lambda=args.aux_lambda, channels_last=args.channels_last, compile=args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = finetune(model, train, val, None, ft, device=device, trainable=["encoder"], hook=("encoder", "cls_token"),
                      targets=targets, desc=f"benchmark {precision}", log=lambda msg: None)
    timed = result.history[-1]
    row = {"precision": precision, "images_per_s": timed["examples_per_s"], "seconds": timed["seconds"],
           "images": n, "train_ce": timed["train_ce"]}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, result
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_h_14", choices=["vit_h_14", "custom"],
                        help="custom = the 2-layer smoke ViT (to try the script on a CPU)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch (the authors: 8)")
    parser.add_argument("--accum-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per (timed) epoch")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--aux-lambda", type=float, default=0.01)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    require(precisions and all(p in ("fp32", "bf16", "fp16") for p in precisions),
            f"--precisions takes fp32, bf16 and/or fp16, got '{args.precisions}'")
    require(args.steps > 0 and args.batch_size > 0 and args.accum_steps > 0, "steps, batch size and accum steps must be positive")
    device = pick_device(args.device)
    if device.type != "cuda" and set(precisions) - {"fp32"}:
        print("note: autocast applies on CUDA only; on this device every precision runs in fp32", file=sys.stderr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            rows.append(bench(precision, args, device, Path(tmp)))
            print(f"{precision}: {rows[-1]['images_per_s']:.2f} images/s", flush=True)
    base = rows[0]["images_per_s"]
    print(f"\n{args.arch} fine-tune step at {args.image_size} px, batch {args.batch_size} x {args.accum_steps}, "
          f"encoder trainable, on {name} (torch {torch.__version__})\n")
    print("| precision | images/s | speed-up | peak memory (GiB) |")
    print("|---|---|---|---|")
    for r in rows:
        memory = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "—"
        print(f"| {r['precision']} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f}x | {memory} |")
    if args.json:
        write_json(args.json, {"device": device.type, "device_name": name, "torch": torch.__version__,
                               "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
                               "accum_steps": args.accum_steps, "steps": args.steps, "results": rows})


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
