"""Shared test helpers: paths, subprocess runs with the project's environment, tiny data writers."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args, env=None, check=False, timeout=600, cwd=REPO):
    """Run a command the way a user would (repo root, this interpreter first on PATH, no progress bars)."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", "SAE_CEPTION_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format: big-endian magic (0x0800 | ndim, dtype ubyte), dims, raw bytes; gzipped."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Learnable digit-like data: a fixed random stroke pattern per class plus pixel noise."""
    rng = np.random.default_rng(seed)
    patterns = (rng.random((10, 28, 28)) < 0.15) * 200.0
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = np.clip(patterns[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255)
        write_idx_gz(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory):
    return write_fake_mnist(tmp_path_factory.mktemp("mnist-data"))
