"""Run a model over a dataset and write the hooked activations to an on-disk cache.

``extract(model, data, module_name, selector, out_dir, ...)`` captures the output of one module
(:class:`common.hooks.ActivationCapture`, detached) under optional autocast and appends it, with
the labels and dataset indices, to a :class:`common.activation_cache.CacheWriter`. ``data`` is

* a dataset whose items are ``(image, label, dataset_index)``: the rows are visited in dataset
  order, an interrupted extraction resumes from its finished chunks, and under ``torchrun`` every
  global batch is split over the ranks and gathered back in order on rank 0, which alone writes;
* or any iterable of ``(images, labels, dataset_indices)`` batches (e.g. a DataLoader): written
  in the order it yields (under ``torchrun`` each rank's batches are gathered to rank 0); an
  interrupted run starts the cache again.

The cache is finished (manifest written) only when every row is in, so a later stage can never
read a half-written cache. Every rank returns the finished :class:`ActivationCache`.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import distributed as D
from . import preflight
from .activation_cache import ActivationCache, CacheWriter, cache_complete
from .errors import require
from .hooks import ActivationCapture


def _ordered_shard(n_remaining: int, offset: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Dataset positions of this rank: its slice of every global batch of ``batch_size * world`` rows."""
    positions = []
    step = batch_size * world
    for start in range(offset, offset + n_remaining, step):
        lo = min(start + rank * batch_size, offset + n_remaining)
        hi = min(lo + batch_size, offset + n_remaining)
        positions.extend(range(lo, hi))
    return positions


def _is_dataset(data) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__")


@torch.no_grad()
def extract(model: nn.Module, data, module_name: str, selector: str, out_dir: str | os.PathLike, *,
            device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
            batch_size: int = 128, num_workers: int = 0, chunk_rows: int = 8192, dtype: str = "float16",
            forward: Callable[[nn.Module, torch.Tensor], object] | None = None, fingerprint: dict | None = None,
            desc: str = "extract", **meta) -> ActivationCache:
    """Write the activations of ``model.<module_name>`` over ``data`` to ``out_dir``; see the module doc."""
    out_dir = Path(out_dir)
    rank, world = D.rank(), D.world_size()
    device = torch.device(device)
    if cache_complete(out_dir):
        return ActivationCache(out_dir)
    require(batch_size > 0, f"extraction batch size must be positive, got {batch_size}")
    model = model.to(device).eval()
    forward = forward or (lambda m, images: m(images))
    ordered = _is_dataset(data)
    # the row order depends only on the data, never on batch size or world size, so both may change on resume
    # (``meta`` is part of it: rows extracted under other metadata, e.g. other weights, are never continued)
    settings = {"module": module_name, "selector": selector, "n": len(data) if ordered else None,
                "meta": {k: str(v) for k, v in meta.items()}}

    writer, shared = None, None
    if rank == 0:
        dim = _probe_dim(model, data, module_name, selector, device, forward, autocast_dtype, ordered)
        writer = CacheWriter(out_dir, dim, chunk_rows=chunk_rows, dtype=dtype, resume=ordered, settings=settings)
        shared = (writer.rows_done, dim)
    rows_done, dim = D.broadcast_object(shared)  # rows already written (resume), activation width

    if ordered:
        remaining = len(data) - rows_done
        mine = _ordered_shard(remaining, rows_done, batch_size, rank, world)
        loader = DataLoader(Subset(data, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        steps = math.ceil(remaining / (batch_size * world))
    else:
        loader = data
        steps = len(data) if hasattr(data, "__len__") else None

    ctx = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    batches = iter(preflight.steps(loader, desc, total=steps, output=out_dir))
    steps = steps if steps is None else preflight.limit(steps)   # a preflight runs only the first few
    bar = tqdm(total=steps, desc=desc, disable=rank != 0, initial=0)
    with ActivationCapture(model, module_name, selector, detach=True) as capture:
        step = 0
        while True:
            batch = next(batches, None)
            if ordered:
                if step >= steps:
                    break
            elif world > 1:  # iterable data: stop when every rank is exhausted
                alive = D.all_reduce_sum(torch.tensor([batch is not None], dtype=torch.long, device=device))
                if int(alive) == 0:
                    break
            elif batch is None:
                break
            if batch is not None:
                images, labels, indices = batch
                with ctx():
                    forward(model, images.to(device, non_blocking=True))
                x = capture.pop().float()
                rows = torch.stack([torch.as_tensor(indices).long(), torch.as_tensor(labels).long()], 1).to(device)
            else:  # this rank has no rows in the last global batch
                x = torch.zeros((0, dim), device=device)
                rows = torch.zeros((0, 2), dtype=torch.long, device=device)
            x, rows = D.all_gather_cat(x), D.all_gather_cat(rows)  # rank order = global order
            if writer is not None:
                writer.append(x.cpu(), rows[:, 1].cpu(), rows[:, 0].cpu())
            step += 1
            bar.update(1)
    bar.close()
    if writer is not None:
        if ordered and step:
            preflight.fill_cache(writer, x, data)  # after a preflight's budget: the rest repeats the last batch
        writer.finish(fingerprint, **meta)
    D.barrier()
    return ActivationCache(out_dir)


def _probe_dim(model, data, module_name, selector, device, forward, autocast_dtype, ordered) -> int:
    """Width of the hooked activation, from one example (datasets) or a dry pass on the first batch."""
    if ordered:
        image = data[0][0]
        images = torch.as_tensor(image).unsqueeze(0)
    else:
        images = next(iter(data))[0][:1]
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with ActivationCapture(model, module_name, selector, detach=True) as capture, ctx:
        forward(model, images.to(device))
        return int(capture.pop().reshape(1, -1).shape[1])
