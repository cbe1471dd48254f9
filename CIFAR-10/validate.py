"""Checks of a resolved CIFAR-10 config, run by `python -m common.runs` before anything trains."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded by file path: make cifar.py importable

from cifar import check_config as validate  # noqa: E402,F401
