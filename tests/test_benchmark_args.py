"""The benchmark scripts' command lines: a bad value is one clear error line and exit 2, before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

GRID = Path(__file__).resolve().parent / "benchmarks" / "bench_metrics_grid.py"


@pytest.mark.parametrize("spec, says", [("2000,10", "is not N,CLASSES,DENSITY"),
                                        ("2000,x,0.1", "is not N,CLASSES,DENSITY"),
                                        ("2000,10,1.5", "want N >= 3, 2 <= CLASSES < N and 0 < DENSITY <= 1"),
                                        ("2000,1,0.1", "want N >= 3")])
def test_a_bad_grid_cell_is_one_error_line(spec, says):
    proc = subprocess.run([sys.executable, str(GRID), "--cell", spec], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bench_metrics_grid.py: error: argument --cell:") and says in last
    assert "Traceback" not in proc.stderr
