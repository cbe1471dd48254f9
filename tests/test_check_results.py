"""common/check_results.py: rerun seed 42's cycle 0 of committed results (made here in tmp, on fake MNIST)."""
import shutil

import pandas as pd
import pytest
import yaml

from common.check_results import compare_rows, main, recorded_environment, render_comparison, resolve_committed_config
from common.errors import UserError
from common.results import write_summary
from conftest import REPO, assert_one_line_error, run, write_fake_mnist

EXP = REPO / "DIGIT-MNIST"
SMALL = ["--data.val_size", "100", "--train.epochs", "1", "--sae.d_sae", "32", "--metrics.probe_max_iter", "50"]


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """results/<preset>/{config.yaml, summary.csv} as run.sh would leave them: seed 42, cycle 0 only."""
    root = tmp_path_factory.mktemp("check-results")
    data = write_fake_mnist(root / "data")
    made = root / "made"
    run(["python", "-m", "common.runs", "--config", EXP / "config.yaml", "--preset", "faithful", "--out", made, *SMALL],
        check=True)
    stage = [f"{EXP / script} --run-dir {made} --data-root {data} --seed 42 --cycle 0"
             for script in ("train.py", "evaluate.py")]
    run(["python", "-m", "common.lane", "--", *stage], env={"OMP_NUM_THREADS": "1"}, check=True)
    write_summary(made)
    results = root / "results"
    (results / "faithful").mkdir(parents=True)
    for name in ("config.yaml", "summary.csv"):
        shutil.copy(made / name, results / "faithful" / name)
    return results, data


def test_rerun_reproduces_the_row_and_reports_an_edited_value(committed, tmp_path):
    results, data = committed
    edited = tmp_path / "results"
    shutil.copytree(results, edited)
    # the committed row with acc changed, and a config from another code version
    summary = pd.read_csv(edited / "faithful" / "summary.csv")
    summary["acc"] += 0.5
    summary.to_csv(edited / "faithful" / "summary.csv", index=False)
    cfg = yaml.safe_load((edited / "faithful" / "config.yaml").read_text())
    del cfg["metrics"]["recon_top_k"]
    cfg["ablation"]["old_name"] = 0.29
    (edited / "faithful" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (edited / "README.md").write_text("Made on a 2-core Intel Xeon Imaginary, PyTorch 1.0 / scikit-learn 0.1.\n")

    proc = run(["python", "-m", "common.check_results", EXP, "--results", edited, "--data-root", data,
                "--keep", tmp_path / "rerun"], check=True)
    out = proc.stdout
    assert "=> faithful: differs in 1 of 13 metrics" in out          # every other metric is identical
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
    assert "differs by -0.5" in rows["acc"]
    assert all(rows[m].endswith("identical") for m in ("probe", "csi", "u", "ari", "sil_u", "dbi", "chi", "l0"))
    assert "lacks (today's default used): metrics.recon_top_k=25" in out
    assert "no longer knows (not applied): ablation.old_name=0.29" in out
    assert "recorded 1.0  <- different" in out and "Intel Xeon Imaginary" in out
    assert "Why a rerun can differ" in out
    assert (tmp_path / "rerun" / "faithful" / "seed_42" / "cycle_0" / "metrics.json").is_file()
    assert sorted(p.name for p in (edited / "faithful").iterdir()) == ["config.yaml", "summary.csv"]


def test_all_identical_verdict():
    row = pd.Series({"acc": 90.0, "ari": float("nan")})
    lines = render_comparison("faithful", compare_rows(row, row.copy(), metrics=("acc", "ari")))
    assert lines[-1] == "  => faithful: identical"


def test_bad_input_is_one_line_before_any_work(committed, tmp_path):
    results, data = committed
    assert_one_line_error(run(["python", "-m", "common.check_results", EXP, "--results", tmp_path / "none",
                               "--data-root", data]), "not found")
    broken = tmp_path / "broken"
    shutil.copytree(results, broken)
    (broken / "faithful" / "config.yaml").unlink()
    for argv, message in [([EXP, "--results", results, "--data-root", tmp_path], "MNIST not found"),
                          ([REPO / "CIFAR-10", "--data-root", data], "only DIGIT-MNIST"),
                          ([EXP, "--results", results, "--data-root", data, "--seed", "7"], "0 rows for DIGIT-MNIST seed 7"),
                          ([EXP, "--results", broken, "--data-root", data], "no config.yaml"),
                          ([EXP, "--results", results, "--data-root", data, "--keep", results], "new or empty")]:
        with pytest.raises(UserError, match=message):
            main([str(a) for a in argv])
    assert sorted(p.name for p in (results / "faithful").iterdir()) == ["config.yaml", "summary.csv"]


def test_compare_rows_and_config_resolution():
    old = pd.Series({"acc": 90.86, "probe": 91.44, "sil_u": float("nan"), "l0": 36.0639})
    new = pd.Series({"acc": 91.52, "probe": 91.44, "sil_u": float("nan"), "dbi": 1.4})
    table = compare_rows(old, new, metrics=("acc", "probe", "sil_u", "l0", "dbi", "chi")).set_index("metric")
    assert table["status"].to_dict() == {"acc": "differs", "probe": "identical", "sil_u": "identical",
                                         "l0": "only committed", "dbi": "only rerun"}
    committed = yaml.safe_load((REPO / "DIGIT-MNIST" / "results" / "faithful" / "config.yaml").read_text()) \
        if (REPO / "DIGIT-MNIST" / "results" / "faithful" / "config.yaml").is_file() else None
    if committed is not None:
        cfg, new_keys, unknown = resolve_committed_config(EXP, committed)
        assert cfg["preset"] == "faithful" and cfg["aux"]["lambdas"] == committed["aux"]["lambdas"]
    cfg, new_keys, unknown = resolve_committed_config(EXP, {"preset": "corrected", "train": {"epochs": 3}, "gone": 1})
    assert cfg["train"]["epochs"] == 3 and cfg["aux"]["kind"] == "cosine" and unknown == ["gone=1"]
    assert any(k.startswith("train.lr=") for k in new_keys)


def test_recorded_environment_prefers_json(tmp_path):
    (tmp_path / "faithful").mkdir()
    (tmp_path / "README.md").write_text("torch 2.3.1, numpy 1.26.4, scikit-learn 1.5. AMD EPYC 7763; commit abc1234f\n")
    found, source = recorded_environment(tmp_path, "faithful")
    assert found == {"torch": "2.3.1", "numpy": "1.26.4", "scikit-learn": "1.5", "cpu": "AMD EPYC 7763",
                     "commit": "abc1234f"} and "README.md" in source
    (tmp_path / "environment.json").write_text('{"torch": "9.9"}')
    assert recorded_environment(tmp_path, "faithful")[0] == {"torch": "9.9"}
