"""Checks of a resolved ImageNet1K config, run by `python -m common.runs` before anything runs."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded by file path: make imagenet.py importable

from imagenet import check_config as validate  # noqa: E402,F401
