"""common/claims.py: the claims file, the verdict rule, the table on made-up summaries, the CLI."""
import math

import numpy as np
import pandas as pd
import pytest

from common.claims import evaluate_claims, load_claims, render, render_markdown, verdict
from common.paper import EXPERIMENT_ALIASES, paper_table
from common.results import METRIC_COLUMNS
from conftest import REPO, assert_one_line_error, run

SEEDS = list(range(42, 52))


def summary(seeds=SEEDS, preset="faithful", acc_gain=2.55, chi_step=-300.0, noise=0.05, seed=0) -> pd.DataFrame:
    """DIGIT-MNIST cycles 0-3 and the random-target ablation. Every metric is noise around a per-seed
    level except: acc rises by acc_gain from k=0 to k=3, chi moves by chi_step from k=0 to k=1."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        level = {m: rng.normal(1.0, 0.3) for m in METRIC_COLUMNS}
        for experiment, cycle in [("DIGIT-MNIST", k) for k in range(4)] + [("DIGIT-MNIST-random-targets", 1)]:
            row = {"experiment": experiment, "seed": s, "cycle": cycle, "preset": preset}
            row.update({m: level[m] + rng.normal(0, noise) for m in METRIC_COLUMNS})
            row["acc"] = 90 + level["acc"] + (acc_gain + rng.normal(0, 0.01) if cycle == 3 else 0)
            row["chi"] = 1500 + level["chi"] + (chi_step if cycle == 1 and experiment == "DIGIT-MNIST" else 0)
            rows.append(row)
    return pd.DataFrame(rows)


def by_id(table, source="faithful"):
    return table[table["source"] == source].set_index("claim_id")


def test_claims_file_matches_the_paper_tables():
    claims = load_claims()
    paper = paper_table()
    paper["experiment"] = paper["experiment"].map(lambda e: EXPERIMENT_ALIASES.get(e, e))

    def value(experiment, cycle, metric):
        cell = paper[(paper["experiment"] == experiment) & (paper["cycle"] == cycle) & (paper["metric"] == metric)]
        assert len(cell), (experiment, cycle, metric)
        return float(cell["value"].iloc[0])

    for c in claims.itertuples():
        published = value(c.treatment_experiment, c.treatment_cycle, c.metric) - \
            value(c.baseline_experiment, c.baseline_cycle, c.metric)
        assert c.paper_effect == pytest.approx(published, abs=1e-9), c.claim_id
        assert c.metric in METRIC_COLUMNS
    # what the issue asks for at least
    ids = set(claims["claim_id"])
    assert {"mnist-acc-0-3", "cifar-u-0-1", "cifar-acc-0-1", "imagenet-u-0-2", "mnist-csi-0-3", "mnist-u-0-3"} <= ids
    for setting in ("mnist", "cifar", "imagenet"):
        assert {f"{setting}-{m}-0-1" for m in ("ari", "sil_u", "sil_s", "dbi", "chi")} <= ids
    assert {f"random-{m}" for m in ("acc", "probe", "csi", "u", "ari", "sil_u", "sil_s", "dbi", "chi")} <= ids
    assert claims.set_index("claim_id").loc["mnist-dbi-0-1", "direction"] == "lower"


@pytest.mark.parametrize("direction,judged_on,n,low,high,p_holm,paper,expected", [
    ("higher", "direction", 0, math.nan, math.nan, math.nan, 1.0, "not run"),
    ("higher", "direction", 1, math.nan, math.nan, 1.0, 1.0, "inconclusive"),
    ("higher", "direction", 10, 0.1, 0.5, 0.01, 1.0, "supported"),
    ("higher", "direction", 10, 0.1, 0.5, 0.06, 1.0, "inconclusive"),     # interval fine, Holm p not
    ("higher", "direction", 10, -0.1, 0.5, 0.01, 1.0, "inconclusive"),    # p fine, interval touches 0
    ("higher", "direction", 10, -0.5, -0.1, 0.01, 1.0, "contradicted"),
    ("lower", "direction", 10, -0.5, -0.1, 0.01, -1.0, "supported"),
    ("lower", "direction", 10, 0.1, 0.5, 0.01, -1.0, "contradicted"),
    ("changes", "direction", 10, -0.5, -0.1, 0.01, 1.0, "supported"),
    ("changes", "direction", 10, 0.1, 0.5, 0.01, 1.0, "supported"),
    ("changes", "direction", 10, -0.1, 0.5, 0.20, 1.0, "inconclusive"),  # never contradicted
    ("higher", "size", 10, 0.1, 0.5, 0.01, 0.3, "supported"),
    ("higher", "size", 10, 0.1, 0.5, 0.01, 2.55, "contradicted"),        # the stated size is outside
    ("higher", "size", 10, 0.1, 0.5, 0.01, 0.05, "contradicted"),        # ... on either side
    ("higher", "size", 5, -0.3, 3.0, 1.0, 2.55, "inconclusive"),         # size fits, direction undecided
    ("higher", "size", 5, -0.3, 1.8, 1.0, 2.55, "contradicted"),         # five seeds can contradict a size
    ("higher", "size", 10, -0.5, -0.1, 0.01, -0.3, "contradicted"),      # direction contradicted
    ("changes", "size", 10, 0.01, 0.05, 0.01, 0.03, "supported"),
    ("changes", "size", 10, -0.02, 0.05, 0.30, 0.03, "inconclusive"),
])
def test_verdict_rule(direction, judged_on, n, low, high, p_holm, paper, expected):
    assert verdict(direction, judged_on, n, low, high, p_holm, paper) == expected


def test_table_on_made_up_runs():
    table = evaluate_claims([("made-up", summary())])
    rows = by_id(table)
    assert len(rows) == len(load_claims())
    acc = rows.loc["mnist-acc-0-3"]
    assert acc["n"] == 10 and acc["mean"] == pytest.approx(2.55, abs=0.02)
    assert acc["p"] == pytest.approx(2 / 1024) and acc["low"] < 2.55 < acc["high"]
    assert acc["verdict"] == "supported" and acc["paper_baseline"] == 91.11 and acc["paper_treatment"] == 93.66
    chi = rows.loc["mnist-chi-0-1"]                         # the paper says "improves": ours fall, on every seed
    assert chi["verdict"] == "contradicted" and chi["mean"] == pytest.approx(-300, abs=1)
    # Holm over the 17 MNIST claims with data: the smallest p is multiplied by 17
    family = rows[rows["n"] > 0]
    assert len(family) == 17 and acc["p_holm"] == pytest.approx(min(1.0, 17 * 2 / 1024))
    assert (rows.loc[rows["treatment_experiment"].isin(["CIFAR-10", "ImageNet1K"]), "verdict"] == "not run").all()
    assert set(rows["verdict"]) <= {"supported", "contradicted", "inconclusive", "not run"}
    assert rows.loc["random-acc", "seeds"] == " ".join(map(str, SEEDS))
    text, markdown = render(table), render_markdown(table)
    assert "mnist-acc-0-3" in text and "91.11→93.66 (Δ +2.55)" in text and "not run" in text
    assert "| mnist-acc-0-3 |" in markdown and "**supported**" in markdown


def test_five_seeds_decide_no_direction():
    rows = by_id(evaluate_claims([("five", summary(seeds=SEEDS[:5], acc_gain=0.5))]))
    assert rows.loc["mnist-acc-0-3", "p"] == pytest.approx(0.0625)
    assert rows.loc["mnist-acc-0-3", "verdict"] == "contradicted"     # a size can be: +0.5 is not +2.55
    assert rows.loc["mnist-chi-0-1", "verdict"] == "inconclusive"     # a direction cannot
    assert not rows["verdict"].eq("supported").any()


def test_presets_are_separate_families_and_files_of_one_preset_pool():
    faithful, corrected = summary(), summary(preset="corrected", acc_gain=0.0, seed=1)
    table = evaluate_claims([("a", faithful), ("b", corrected)])
    assert list(dict.fromkeys(table["source"])) == ["faithful", "corrected"]
    assert by_id(table, "corrected").loc["mnist-acc-0-3", "verdict"] == "contradicted"
    mnist, ablation = faithful[faithful["experiment"] == "DIGIT-MNIST"], faithful[faithful["experiment"] != "DIGIT-MNIST"]
    pooled = evaluate_claims([("a", mnist), ("b", ablation)])
    pd.testing.assert_frame_equal(pooled, evaluate_claims([("a", faithful)]))
    no_preset = evaluate_claims([("runs/x/summary.csv", faithful.drop(columns="preset"))])
    assert set(no_preset["source"]) == {"runs/x/summary.csv"}


def test_missing_seeds_and_nan_pair_out():
    frame = summary()
    frame.loc[(frame["cycle"] == 3) & (frame["seed"] == 42), "acc"] = math.nan
    frame = frame[~((frame["cycle"] == 0) & (frame["seed"] == 43))]
    acc = by_id(evaluate_claims([("x", frame)])).loc["mnist-acc-0-3"]
    assert acc["n"] == 8 and "42" not in acc["seeds"].split() and "43" not in acc["seeds"].split()
    one = summary(seeds=[42])
    assert (by_id(evaluate_claims([("x", one)]))["verdict"].isin(["inconclusive", "not run"])).all()


def test_cli_text_markdown_and_bad_input(tmp_path):
    path = tmp_path / "summary.csv"
    summary().to_csv(path, index=False)
    proc = run(["python", "-m", "common.claims", path], check=True)
    assert "faithful: 17 of 31 claims with data, seeds 42-51 (10)" in proc.stdout and "supported" in proc.stdout
    proc = run(["python", "-m", "common.claims", path, "--markdown", "--csv", tmp_path / "claims.csv"], check=True)
    assert proc.stdout.lstrip().startswith("**faithful") and "| claim |" in proc.stdout
    assert len(pd.read_csv(tmp_path / "claims.csv")) == 31
    assert_one_line_error(run(["python", "-m", "common.claims", tmp_path / "missing.csv"]), "not found")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert_one_line_error(run(["python", "-m", "common.claims", tmp_path / "other.csv"]), "not a summary.csv")
    summary().drop(columns="ari").to_csv(tmp_path / "old.csv", index=False)
    assert_one_line_error(run(["python", "-m", "common.claims", tmp_path / "old.csv"]), "no 'ari' column")
    assert_one_line_error(run(["python", "-m", "common.claims", path, path]), "repeat")
    proc = run(["python", "-m", "common.claims"], check=True)             # no summaries: every claim not run
    assert proc.stdout.count("not run") == 31


def test_committed_reference_results_give_a_verdict_for_every_mnist_claim():
    paths = sorted((REPO / "DIGIT-MNIST" / "results").glob("*/summary.csv"))
    if not paths:
        pytest.skip("no committed DIGIT-MNIST results")
    table = evaluate_claims([(str(p), pd.read_csv(p)) for p in paths])
    mnist = table["treatment_experiment"].str.startswith("DIGIT-MNIST")
    assert table.loc[mnist, "verdict"].isin(["supported", "contradicted", "inconclusive"]).all()
    assert table.loc[~mnist, "verdict"].eq("not run").all()


def test_forest_plot_renders(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from common.plots import plot_claims

    table = evaluate_claims([("a", summary()), ("b", summary(preset="corrected", seed=3))])
    fig = plot_claims(table)
    ax = fig.axes[0]
    drawn = [t.get_text() for t in ax.get_yticklabels()]
    assert "mnist-acc-0-3" in drawn and "cifar-u-0-1" not in drawn            # not run: not drawn
    no_spread = {"mnist-chi-0-1", "random-chi", "random-acc"}   # the made-up Δ are constant there: no sd
    assert len(drawn) == 17 - 3 and not no_spread & set(drawn)
    fig.savefig(tmp_path / "forest.png")
    assert (tmp_path / "forest.png").stat().st_size > 0
    raw = plot_claims(table[table["claim_id"] == "mnist-acc-0-3"], standardise=False)
    xs = [x for line in raw.axes[0].lines for x in line.get_xdata()]
    assert max(xs) == pytest.approx(max(table.loc[table["claim_id"] == "mnist-acc-0-3", "high"].max(), 2.55))
    empty = plot_claims(evaluate_claims([]))                                    # nothing to draw: a note
    assert empty.axes[0].texts
