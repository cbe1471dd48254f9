"""The three metrics notebooks: committed executed, and their committed outputs are what executing them
on the committed results gives today (so they never rot); given a run directory they draw the SAE
pictures from its small per-cycle files, and skip a picture whose files are absent with one line."""

import nbformat
import pytest
import torch

from common.io import write_json
from common.notebooks import REPO, execute, keep_picture_inputs, text_outputs
from common.plots import (plot_feature_density, plot_histories, plot_top_features, quality_table, run_artifacts,
                          runs_with)
from common.results import METRIC_COLUMNS, write_metrics, write_summary
from common.sae_quality import write_feature_density

NOTEBOOKS = {"DIGIT-MNIST": REPO / "DIGIT-MNIST" / "metrics.ipynb", "CIFAR-10": REPO / "CIFAR-10" / "metrics.ipynb",
             "ImageNet1K": REPO / "ImageNet1K" / "metrics.ipynb"}
REFRESH = "python -m common.notebooks execute " + " ".join(str(p.relative_to(REPO)) for p in NOTEBOOKS.values())


def outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def pngs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def errors(nb):
    return [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs(nb) if o.get("output_type") == "error"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_matches_a_fresh_execution_on_the_committed_results(name):
    experiment = NOTEBOOKS[name].parent
    if not list(experiment.glob("results/**/summary.csv")) and list(experiment.glob("runs/*/summary.csv")):
        pytest.skip(f"{experiment.name}/runs/ holds a run, which the notebook reads instead of the (absent) committed results")
    committed = nbformat.read(NOTEBOOKS[name], as_version=4)
    assert outputs(committed), f"{NOTEBOOKS[name]} is committed without outputs; run {REFRESH}"
    assert pngs(committed) >= 1
    fresh = execute(NOTEBOOKS[name])
    assert not errors(fresh)
    stale = [i for i, (a, b) in enumerate(zip(text_outputs(committed), text_outputs(fresh))) if a.split() != b.split()]
    assert not stale and pngs(fresh) == pngs(committed), \
        f"{NOTEBOOKS[name]}: outputs of code cells {stale} are stale; run {REFRESH}"
    assert "/work/" not in "".join(text_outputs(committed)) and "/tmp/" not in "".join(text_outputs(committed))


def test_committed_notebooks_stay_small():
    for path in NOTEBOOKS.values():
        assert path.stat().st_size < 1_500_000, f"{path} is {path.stat().st_size / 1e6:.1f} MB with its outputs"


# ----------------------------------------------------------------------------- a generated run directory
def fake_decoupled_run(root, experiment="CIFAR-10", n_classes=10, d_sae=64, cycles=(0, 1, 2), seeds=(42, 43),
                       density=True):
    """What the decoupled pipeline leaves in a run directory, with made-up numbers."""
    gen = torch.Generator().manual_seed(0)
    for seed in seeds:
        for cycle in cycles:
            d = root / f"seed_{seed}" / f"cycle_{cycle}"
            d.mkdir(parents=True)
            metrics = {c: float(torch.rand((), generator=gen)) for c in METRIC_COLUMNS}
            metrics.update(acc=95.0 + cycle, explained_variance=0.8, recon_mse=0.01, dead_frac=0.05, acc_spliced=93.0)
            write_metrics(d / "metrics.json", experiment=experiment, seed=seed, cycle=cycle, metrics=metrics)
            if cycle < cycles[-1]:
                top = torch.stack([torch.randperm(d_sae, generator=gen)[:25] for _ in range(n_classes)])
                write_json(d / "sharpen.json", {"top_features": top.tolist(), "top_k": 25, "mode": "top"})
            write_json(d / "adapt.json", {"history": [{"epoch": e, "train_ce": 1.0 / (e + 1), "train_aux": 0.1,
                                                       "val_acc": 90.0 + e, "lr": 1e-4, "seconds": 3.0}
                                                      for e in range(3)]})
            write_json(d / "sae_train.json", {"history": [{"epoch": e, "train_loss": 2.0 - e, "val_loss": 2.1 - e,
                                                           "val_l0": 30.0 + e} for e in range(2)]})
            if density:
                rate = torch.rand(d_sae, generator=gen) ** 4
                rate[:3] = 0.0
                write_feature_density(d, rate, 1000)
    write_summary(root)
    return root


def test_pictures_from_a_run_directory(tmp_path):
    run = fake_decoupled_run(tmp_path / "run")
    artifacts = run_artifacts(run)
    assert sorted(artifacts) == [(s, c) for s in (42, 43) for c in (0, 1, 2)]
    a = artifacts[(42, 0)]
    assert a["density"].shape == (64,) and a["top_features"].shape == (10, 25)
    assert set(a["histories"]) == {"fine-tuning", "SAE training"}
    assert artifacts[(42, 2)]["top_features"] is None       # the last cycle has no targets
    for fig in (plot_feature_density({"run": artifacts}), plot_top_features(artifacts, "run"),
                plot_histories(artifacts, "run")):
        assert fig.axes
    overlap_panel = plot_top_features(artifacts, "run").axes[2]   # cycles 0, 1, then the overlap
    assert overlap_panel.get_title() == "shared with next cycle"
    many = run_artifacts(fake_decoupled_run(tmp_path / "many", n_classes=30, seeds=(42,)))
    assert "first 20 of 30 classes" in plot_top_features(many, "many")._suptitle.get_text()


def test_missing_inputs_are_one_line_notes(tmp_path, capsys):
    run = fake_decoupled_run(tmp_path / "run", density=False)
    assert runs_with({"r": run_artifacts(run)}, "density", "feature_density.json") == {}
    assert capsys.readouterr().out.strip() == "r: no feature_density.json in its cycle directories; this picture is skipped for it"


def test_quality_table_means_over_seeds(tmp_path):
    import pandas as pd

    run = fake_decoupled_run(tmp_path / "run")
    table = quality_table({"r": pd.read_csv(run / "summary.csv")}, "CIFAR-10")
    assert list(table.index.get_level_values("cycle")) == [0, 1, 2]
    assert table.loc[("r", "CIFAR-10", 1), "acc_spliced"] == "93 ± 0" and table["seeds"].tolist() == [2, 2, 2]
    # a summary written before the columns existed: the run's metrics.json files are used instead
    old = pd.read_csv(run / "summary.csv").drop(columns=["explained_variance", "acc_spliced"])
    assert quality_table({"r": old}, "CIFAR-10", {"r": run}).shape == table.shape
    assert quality_table({"r": old}, "CIFAR-10") is None


@pytest.mark.parametrize("name", ["CIFAR-10", "ImageNet1K"])
def test_decoupled_notebooks_draw_a_run_directory(tmp_path, name):
    run = fake_decoupled_run(tmp_path / "run", experiment=name, n_classes=30 if name == "ImageNet1K" else 10)
    nb = execute(NOTEBOOKS[name], summary=str(run))
    assert not errors(nb)
    text = "\n".join(text_outputs(nb))
    assert str(run / "summary.csv") in text and "Table 5" in text and "acc_spliced" in text
    assert pngs(nb) == 5   # across cycles, densities, top features, training curves, the claims' forest plot


def test_notebooks_skip_pictures_without_their_files(tmp_path):
    run = fake_decoupled_run(tmp_path / "run", density=False)
    nb = execute(NOTEBOOKS["CIFAR-10"], summary=str(run / "summary.csv"))
    assert not errors(nb) and pngs(nb) == 4
    assert "no feature_density.json (written by the metrics stage) in its cycle directories" in "\n".join(text_outputs(nb))


def test_mnist_notebook_draws_decoder_images_from_a_run(tmp_path):
    """A DIGIT-MNIST run directory as its stages leave it (summary, train.json, top_features.json,
    feature_density.json, the checkpoints): every picture is drawn, decoder images included."""
    import sys

    sys.path.insert(0, str(REPO / "DIGIT-MNIST"))
    from mnist import MLP

    from common.checkpoint import save_module
    from common.sae import SAEConfig, SparseAutoencoder

    run = tmp_path / "run"
    for cycle in (0, 1):
        d = run / "seed_42" / f"cycle_{cycle}"
        d.mkdir(parents=True)
        metrics = {c: 1.0 for c in METRIC_COLUMNS} | {"explained_variance": 0.9, "recon_mse": 1.0, "dead_frac": 0.1,
                                                      "acc_spliced": 80.0}
        write_metrics(d / "metrics.json", experiment="DIGIT-MNIST", seed=42, cycle=cycle, metrics=metrics)
        save_module(d / "mlp.safetensors", MLP(), {"kind": "mlp"})
        SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, l1_coeff=0.1)).save(d / "sae_h1.safetensors", layer=1)
        write_json(d / "top_features.json", {"top_k": 25, "per_class": [list(range(c, c + 25)) for c in range(10)]})
        write_json(d / "train.json", {"history": [{"epoch": e, "task_loss": 1.0, "aux_loss": 0.0, "sae_loss": 2.0,
                                                   "val_acc": 90.0} for e in range(2)]})
        write_feature_density(d, torch.linspace(0, 1, 32), 100)
        (d / "targets.npy").write_bytes(b"0" * 1000)     # large artifacts stay out of the results folder
    write_summary(run)
    results = tmp_path / "faithful"        # as committed: summary.csv and the kept picture inputs
    results.mkdir()
    (results / "summary.csv").write_bytes((run / "summary.csv").read_bytes())
    kept = keep_picture_inputs(run, results)
    assert {p.name for p in kept} == {"metrics.json", "feature_density.json", "top_features.json", "train.json",
                                      "mlp.safetensors", "mlp.json", "sae_h1.safetensors", "sae_h1.json"}
    assert not list(results.rglob("targets.npy"))
    nb = execute(NOTEBOOKS["DIGIT-MNIST"], summary=str(results))
    assert not errors(nb)
    # cycles plot, the claims' forest plot, densities, top features, decoder images (last cycle with
    # targets), training curves
    assert pngs(nb) == 6
    assert "acc_spliced" in "\n".join(text_outputs(nb))
