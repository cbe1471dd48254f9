"""Checks of a resolved ImageNet1K config, run by `python -m common.runs` before anything runs."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded by file path: make imagenet.py importable

from imagenet import ImageNetExperiment  # noqa: E402

from common.decoupled import validate_config  # noqa: E402


def validate(cfg: dict) -> None:
    validate_config(cfg, ImageNetExperiment())
