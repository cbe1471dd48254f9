"""SAE quality columns (common/sae_quality.py) and their place in the result files and the comparison."""
import math

import pandas as pd
import pytest
import torch

from common.config import Config
from common.sae import SAEConfig, SparseAutoencoder
from common.sae_quality import (QUALITY_COLUMNS, acc_spliced, dead_frac, explained_variance, feature_density,
                                read_feature_density, recon_mse, sae_quality, write_feature_density)


def small_sae(seed=0, d_in=6, d_sae=20):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, l1_coeff=0.0))
    with torch.no_grad():
        sae.encoder.bias[:4] = -100.0   # four features that can never fire
    return sae.eval()


def test_explained_variance_is_one_minus_fvu():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    assert explained_variance(x, x) == 1.0
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)  # the mean explains nothing
    x_hat = x + torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    total = ((x - x.mean(0)) ** 2).sum()        # 8 + 8 = 16
    assert explained_variance(x, x_hat) == pytest.approx(1 - 2 / float(total))
    assert recon_mse(x, x_hat) == pytest.approx(2 / 6)


def test_dead_frac_and_density_count_features_that_never_fire():
    codes = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0]])
    assert dead_frac(codes) == 0.5
    assert feature_density(codes).tolist() == [0.0, 1.0, 0.0, 0.5]


def test_streamed_quality_equals_the_definitions():
    sae = small_sae()
    torch.manual_seed(1)
    acts = torch.randn(301, 6) * 3 + 1
    labels = torch.randint(0, 3, (301,))
    head = torch.nn.Linear(6, 3)
    q = sae_quality(sae, acts, head=head, labels=labels, batch_size=64, return_density=True)
    with torch.no_grad():
        x_hat, codes = sae(acts)
        spliced = float((head(x_hat).argmax(1) == labels).double().mean() * 100)
    assert set(QUALITY_COLUMNS) <= set(q)
    assert q["explained_variance"] == pytest.approx(explained_variance(acts, x_hat), rel=1e-6)
    assert q["recon_mse"] == pytest.approx(recon_mse(acts, x_hat), rel=1e-6)
    assert q["dead_frac"] == dead_frac(codes) >= 4 / 20
    assert q["acc_spliced"] == pytest.approx(spliced) == acc_spliced(head, sae, acts, labels, batch_size=50)
    torch.testing.assert_close(q["feature_density"], feature_density(codes))
    assert math.isnan(sae_quality(sae, acts)["acc_spliced"])    # no head: no spliced accuracy


def test_a_perfect_reconstruction_keeps_the_model_accuracy():
    """An SAE whose decoder inverts its encoder on the positive orthant: x̂ = x, so head(x̂) = head(x)."""
    sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=4, l1_coeff=0.0))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(4)), sae.encoder.bias.zero_()
        sae.decoder.weight.copy_(torch.eye(4)), sae.decoder.bias.zero_()
    acts = torch.rand(100, 4)
    labels = acts.argmax(1)
    q = sae_quality(sae, acts, head=lambda h: h, labels=labels)
    assert q == {"explained_variance": 1.0, "recon_mse": 0.0, "dead_frac": 0.0, "acc_spliced": 100.0}


def test_feature_density_file_round_trip(tmp_path):
    density = torch.tensor([0.0, 0.123456789, 1.0])
    write_feature_density(tmp_path, density, 10)
    assert read_feature_density(tmp_path).tolist() == [0.0, 0.123457, 1.0]
    assert read_feature_density(tmp_path / "absent") is None


def test_comparison_skips_columns_the_paper_does_not_have():
    """``python -m common.compare``: quality columns in a summary add no cell and change none."""
    from common.compare import comparison

    base = pd.DataFrame({"experiment": ["DIGIT-MNIST"] * 2, "seed": [42, 43], "cycle": [0, 0],
                         "acc": [91.0, 93.0], "l0": [30.0, 34.0]})
    with_quality = base.assign(explained_variance=[0.9, 0.8], recon_mse=[1.0, 2.0], dead_frac=[0.1, 0.2],
                               acc_spliced=[80.0, 85.0])
    plain, extended = comparison([base]), comparison([with_quality])
    pd.testing.assert_frame_equal(plain, extended)
    assert not set(QUALITY_COLUMNS) & set(extended["metric"])
    assert extended.query("experiment == 'DIGIT-MNIST' and cycle == 0 and metric == 'acc'")["ours"].item() == 92.0


def test_summary_carries_the_quality_columns(tmp_path):
    from common.results import read_summary, write_metrics, write_summary
    from common.results import METRIC_COLUMNS

    for seed in (42, 43):
        (tmp_path / f"seed_{seed}" / "cycle_0").mkdir(parents=True)
        write_metrics(tmp_path / f"seed_{seed}" / "cycle_0" / "metrics.json", experiment="DIGIT-MNIST", seed=seed,
                      cycle=0, metrics={**{c: 1.0 for c in METRIC_COLUMNS}, "explained_variance": 0.75,
                                        "recon_mse": 0.5, "dead_frac": 0.25, "acc_spliced": 90.0})
    summary = read_summary(write_summary(tmp_path))
    assert summary[list(QUALITY_COLUMNS)].values.tolist() == [[0.75, 0.5, 0.25, 90.0]] * 2


def test_the_rest_of_each_model_after_its_hook_gives_its_logits():
    """The ``head`` each experiment passes to acc_spliced, on the small models of the smoke runs:
    DIGIT-MNIST fc3(relu(fc2(h1))), CIFAR-10 ``model.heads`` on the CLS token of ``encoder``,
    ImageNet ``model.head.fc`` after ``head.flatten`` (through pre_logits and drop, identities here)."""
    import sys
    from pathlib import Path

    from common.hooks import ActivationCapture

    repo = Path(__file__).resolve().parents[1]
    for folder in ("DIGIT-MNIST", "CIFAR-10", "ImageNet1K"):
        sys.path.insert(0, str(repo / folder))
    import cifar
    import imagenet
    from mnist import MLP

    torch.manual_seed(0)
    mlp = MLP().eval()
    x = torch.rand(8, 784) * 255
    logits, h1, _ = mlp(x)
    assert torch.equal(mlp.fc3(torch.relu(mlp.fc2(h1))), logits)
    vit = cifar.build_vit(Config({"model": {"arch": "custom", "image_size": 16, "weights": "none",
                                            "custom": {"patch_size": 8, "num_layers": 2, "num_heads": 2,
                                                       "hidden_dim": 32, "mlp_dim": 64}}}), 10, pretrained=False).eval()
    convnext = imagenet.build_convnext(Config({"model": {"name": "convnextv2_atto", "weights": "none"}}),
                                       pretrained=False).eval()
    cases = ((vit, ("encoder", "cls_token"), torch.randn(4, 3, 16, 16), lambda m: m.heads),
             (convnext, ("head.flatten", "flatten"), torch.randn(2, 3, 32, 32),
              lambda m: (lambda h: m.head.fc(m.head.drop(m.head.pre_logits(h))))))
    for model, hook, images, rest in cases:
        with torch.no_grad(), ActivationCapture(model, *hook) as capture:
            logits = model(images)
            hooked = capture.pop()
            assert torch.equal(rest(model)(hooked), logits)
