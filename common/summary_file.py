"""The columns of a run's ``summary.csv`` and reading one back (no other module of common needed,
so both the result writers and the comparison with the paper can import it)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import require

METRIC_COLUMNS = ("acc", "probe", "csi", "u", "u_corrected", "ari", "sil_u", "sil_s", "dbi", "chi", "l0",
                  "csi_recon", "csi_recon_sharpened")
KEY_COLUMNS = ("experiment", "seed", "cycle")


def read_summary(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    require(path.is_file(), f"summary {path} not found; run the experiment's run.sh first")
    frame = pd.read_csv(path)
    missing = [c for c in KEY_COLUMNS if c not in frame.columns]
    require(not missing, f"{path} is not a summary.csv (no {', '.join(missing)} column)")
    return frame
