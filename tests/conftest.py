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


def recipe_stages(experiment: str) -> dict:
    """The stage functions of a decoupled experiment's recipe scripts (adapt.py, train_sae.py,
    sharpen.py, evaluate.py), each file loaded by path under a name of its own: the three experiment
    folders have scripts of the same names, which a plain import would mix up."""
    import importlib.util

    folder = REPO / experiment
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # the recipes import their experiment module (cifar, imagenet)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"recipe_{experiment.replace('-', '_')}_{name}",
                                                      folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    adapt, train_sae, sharpen, evaluate = (load(n) for n in ("adapt", "train_sae", "sharpen", "evaluate"))
    return {"adapt": adapt.adapt, "extract": train_sae.extract, "sae": train_sae.train_sae,
            "sharpen": sharpen.sharpen, "metrics": evaluate.evaluate, "_modules": [adapt, train_sae, sharpen, evaluate]}


def run_stages(experiment: str, stages: dict, names, argv: list) -> None:
    """``names`` of ``stages`` (from :func:`recipe_stages`) in one process, as cycle.py runs them."""
    from common.decoupled import stage_cli

    stage_cli({n: stages[n] for n in names}, experiment, "test", argv=[str(a) for a in argv])


def run_script_in_process(script: Path, argv: list) -> int:
    """``python script argv...`` in this process (faster than a subprocess): the script's folder first
    on the path and its sibling modules imported afresh, because the experiment folders hold scripts
    of the same names (adapt.py, sharpen.py, ...). Returns the exit status."""
    import runpy

    script = Path(script)
    siblings = {p.stem for p in script.parent.glob("*.py")}
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name in siblings}
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(script), *map(str, argv)], [str(script.parent)]
    try:
        runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        for name in siblings:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
