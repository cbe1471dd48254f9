"""Thread limits for small kernels: a pass over a cache-sized block is faster on one thread than
split across a pool (the fork/join costs more than the work, and much more when the cores are shared
with another process), and a BLAS product on one thread also rounds the same whatever the machine's
core count."""
from __future__ import annotations

from contextlib import contextmanager

import torch

_blas_controller = None


@contextmanager
def blas_one_thread():
    """numpy's BLAS on one thread (threadpoolctl finds the libraries once: that takes milliseconds)."""
    global _blas_controller
    from threadpoolctl import ThreadpoolController

    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


@contextmanager
def single_threaded():
    """torch's intra-op pool and numpy's BLAS both on one thread for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with blas_one_thread():
            yield
    finally:
        torch.set_num_threads(before)
