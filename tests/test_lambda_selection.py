"""DIGIT-MNIST/lambda_selection.py: the λ each cycle chose, and the arms' accuracy gains compared."""
import json

import pandas as pd
from conftest import REPO, run_script_in_process

SCRIPT = REPO / "DIGIT-MNIST" / "lambda_selection.py"


def summary(folder, gains, base=92.0):
    """A summary.csv whose seed s gains gains[s] points from cycle 0 to cycle 3 (cycles 1-2 halfway)."""
    folder.mkdir(parents=True)
    rows = []
    for seed, gain in gains.items():
        for cycle, acc in enumerate([base, base + gain / 2, base + gain / 2, base + gain]):
            rows.append({"experiment": "DIGIT-MNIST", "seed": seed, "cycle": cycle, "acc": acc, "preset": "faithful"})
        rows.append({"experiment": "DIGIT-MNIST-random-targets", "seed": seed, "cycle": 1, "acc": 50.0,
                     "preset": "faithful"})
    pd.DataFrame(rows).to_csv(folder / "summary.csv", index=False)
    return folder


def test_report_pairs_the_gains_by_seed(tmp_path, capsys):
    seeds = range(42, 52)
    fixed = summary(tmp_path / "fixed", {s: 0.0 for s in seeds})
    val = summary(tmp_path / "val", {s: 0.5 + 0.1 * (s % 2) for s in seeds})
    test = summary(tmp_path / "test", {s: 2.0 + 0.1 * (s % 3) for s in range(42, 53)})   # one seed more
    assert run_script_in_process(SCRIPT, ["report", "--fixed", fixed, "--val", val, "--test", test]) == 0
    out = capsys.readouterr().out
    assert "seeds 42-51 (10)" in out                     # only the seeds every arm has
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "+0.00 [+0.00, +0.00]" in lines["fixed"] and "+0.55 [" in lines["val"]
    assert "+2.09 [" in lines["test"]                    # 2 + 0.1 * mean(s % 3) over 42-51
    # every seed gains more under test selection: the sign-flip p is its floor 2/2^10
    assert "test − val" in out and "0.002" in out


def test_collect_writes_the_chosen_lambda_and_its_sweep_row(tmp_path):
    run = tmp_path / "run"
    for seed in (42, 43):
        for cycle, lam in ((0, None), (1, 0.05), (2, 0.2)):
            folder = run / f"seed_{seed}" / f"cycle_{cycle}"
            folder.mkdir(parents=True)
            sweep = [] if lam is None else [{"aux_lambda": 0.05, "best_val_acc": 90.0, "best_epoch": 3, "best_test_acc": 91.5},
                                            {"aux_lambda": 0.2, "best_val_acc": 89.0, "best_epoch": 4, "best_test_acc": 92.5}]
            (folder / "train.json").write_text(json.dumps({"aux_lambda": lam, "sweep": sweep or None}))
    out = tmp_path / "lambdas.csv"
    assert run_script_in_process(SCRIPT, ["collect", run, out]) == 0
    table = pd.read_csv(out)
    assert list(table["cycle"]) == [1, 2, 1, 2] and list(table["aux_lambda"]) == [0.05, 0.2, 0.05, 0.2]
    assert list(table["sweep_best_test_acc"]) == [91.5, 92.5, 91.5, 92.5]


def test_report_needs_two_arms_and_their_summaries(tmp_path, capsys):
    fixed = summary(tmp_path / "fixed", {42: 0.0, 43: 1.0})
    assert run_script_in_process(SCRIPT, ["report", "--fixed", fixed]) != 0
    assert capsys.readouterr().err.startswith("error: give at least two")
    assert run_script_in_process(SCRIPT, ["report", "--fixed", fixed, "--test", tmp_path / "missing"]) != 0
    assert capsys.readouterr().err.startswith("error: no summary.csv in")
