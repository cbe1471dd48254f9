"""common.sharpening and common.targets: hand-built example, alignment fingerprint, random targets."""
import numpy as np
import pytest
import torch

from common.errors import UserError
from common.sae import SAEConfig, SparseAutoencoder
from common.sharpening import (ClassMeans, class_means, per_example_topk, random_targets, sharpen,
                               sharpened_targets, top_features)
from common.targets import TargetTable, dataset_fingerprint, save_targets

# 4 examples, 5 features, 2 classes. Class 0 means: [3, 0, 1, 2, 0]; class 1 means: [0, 4, 0.5, 1, 3].
CODES = torch.tensor([[4.0, 0.0, 2.0, 2.0, 0.0],
                      [2.0, 0.0, 0.0, 2.0, 0.0],
                      [0.0, 3.0, 1.0, 2.0, 5.0],
                      [0.0, 5.0, 0.0, 0.0, 1.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_top_features_by_class_mean():
    means = class_means(CODES, LABELS, 2)
    assert torch.allclose(means, torch.tensor([[3, 0, 1, 2, 0], [0, 4, 0.5, 1, 3]], dtype=torch.float64))
    assert top_features(means, 2).tolist() == [[0, 3], [1, 4]]


def test_sharpen_top_and_mask():
    top = top_features(class_means(CODES, LABELS, 2), 2)
    kept = sharpen(CODES, LABELS, top, "top")
    assert kept.tolist() == [[4, 0, 0, 2, 0], [2, 0, 0, 2, 0], [0, 3, 0, 0, 5], [0, 5, 0, 0, 1]]
    assert torch.equal(sharpen(CODES, LABELS, top, "mask"), CODES - kept)


def test_streaming_class_means_equal_one_shot():
    acc = ClassMeans(2, 5)
    acc.update(CODES[:3], LABELS[:3])
    acc.update(CODES[3:], LABELS[3:])
    assert torch.allclose(acc.means(), class_means(CODES, LABELS, 2))


def test_targets_decode_sharpened_codes_with_bias():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=3, d_sae=5, l1_coeff=0.0))
    top = top_features(class_means(CODES, LABELS, 2), 2)
    targets = sharpened_targets(sae, CODES, LABELS, top, "top", batch_size=3)
    with torch.no_grad():
        expected = sharpen(CODES, LABELS, top) @ sae.decoder.weight.T + sae.decoder.bias
    assert torch.allclose(targets, expected)
    full = top_features(class_means(CODES, LABELS, 2), 5)  # N = d_sae: "top" = full reconstruction
    with torch.no_grad():
        assert torch.allclose(sharpened_targets(sae, CODES, LABELS, full, "top"), sae.decode(CODES))
        mask_all = sharpened_targets(sae, CODES, LABELS, full, "mask")  # "mask" = decoder bias only
    assert torch.allclose(mask_all, sae.decoder.bias.detach().expand(4, 3))


def test_per_example_topk():
    assert per_example_topk(CODES, 1).tolist() == [[4, 0, 0, 0, 0], [2, 0, 0, 0, 0], [0, 0, 0, 0, 5], [0, 5, 0, 0, 0]]


def test_k_larger_than_dictionary_is_rejected():
    with pytest.raises(UserError, match="k=6"):
        top_features(class_means(CODES, LABELS, 2), 6)


def test_labels_must_match_codes():
    top = top_features(class_means(CODES, LABELS, 2), 2)
    with pytest.raises(UserError, match="labels"):
        sharpen(CODES, LABELS[:3], top)
    with pytest.raises(UserError, match="labels must lie"):
        sharpen(CODES, torch.tensor([0, 0, 1, 2]), top)


def test_random_targets_unit_norm_seeded_and_as_authors():
    t = random_targets(100, 16, seed=42)
    assert torch.allclose(t.norm(dim=1), torch.ones(100), atol=1e-6)
    assert torch.equal(t, random_targets(100, 16, seed=42))
    assert not torch.equal(t, random_targets(100, 16, seed=43))
    torch.manual_seed(42)
    raw = torch.randn(100, 16)
    assert torch.equal(t, raw / raw.norm(dim=1, keepdim=True))            # bit for bit the authors' draw


def test_targets_round_trip_by_index(tmp_path):
    labels = torch.tensor([0, 1, 1, 0, 2])
    targets = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    save_targets(tmp_path / "t.npy", targets, labels, cycle=0)
    table = TargetTable(tmp_path / "t.npy", labels)
    assert torch.equal(table.lookup(torch.tensor([4, 0, 2])), targets[[4, 0, 2]])


def test_targets_from_another_dataset_fail_in_one_line(tmp_path):
    labels = torch.tensor([0, 1, 1, 0, 2])
    save_targets(tmp_path / "t.npy", torch.zeros(5, 3), labels)
    with pytest.raises(UserError, match="another dataset"):
        TargetTable(tmp_path / "t.npy", torch.tensor([0, 1, 1, 0, 1]))   # same length, other labels
    with pytest.raises(UserError, match="another dataset"):
        TargetTable(tmp_path / "t.npy", labels[:4])                      # other length
    assert dataset_fingerprint(labels) == dataset_fingerprint(np.array([0, 1, 1, 0, 2]))
    x = torch.arange(10.0).reshape(5, 2)
    save_targets(tmp_path / "c.npy", torch.zeros(5, 3), labels, content=x)
    TargetTable(tmp_path / "c.npy", labels, content=x.clone())
    with pytest.raises(UserError, match="another dataset"):
        TargetTable(tmp_path / "c.npy", labels, content=x + 1)                 # same labels, other inputs


def test_missing_or_corrupt_targets(tmp_path):
    with pytest.raises(UserError, match="not found"):
        TargetTable(tmp_path / "none.npy", torch.zeros(3))
    save_targets(tmp_path / "t.npy", torch.zeros(3, 2), torch.zeros(3))
    (tmp_path / "t.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        TargetTable(tmp_path / "t.npy", torch.zeros(3))


def test_every_strategy_through_the_one_streaming_builder(tmp_path):
    from common.activations import ArraySource
    from common.sharpening import STRATEGIES
    from common.targets import write_targets

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=5, l1_coeff=0.1)).eval()
    x = torch.randn(4, 6)
    top = top_features(class_means(CODES, LABELS, 2), 2)
    with torch.no_grad():
        z = sae.encode(x)
        expected = {"top": sae.decode(sharpen(z, LABELS, top, "top")), "mask": sae.decode(sharpen(z, LABELS, top, "mask")),
                    "per_example": sae.decode(per_example_topk(z, 2))}
    source = ArraySource(x, LABELS)
    for strategy in STRATEGIES:
        path = tmp_path / f"{strategy}.npy"
        write_targets(path, source.iter_batches(3), LABELS, 6, strategy, sae=sae, top_idx=top, k=2, random_seed=7)
        rows = torch.as_tensor(TargetTable(path, LABELS).lookup(torch.arange(4)))
        if strategy == "random":
            torch.testing.assert_close(rows.norm(dim=1), torch.ones(4))
            g = torch.Generator().manual_seed(7)
            first, second = torch.randn(3, 6, generator=g), torch.randn(1, 6, generator=g)   # batch by batch
            drawn = torch.cat([first, second])
            torch.testing.assert_close(rows, drawn / drawn.norm(dim=1, keepdim=True))
        else:
            torch.testing.assert_close(rows, expected[strategy])
    with pytest.raises(UserError, match="unknown sharpening strategy 'keep'"):
        write_targets(tmp_path / "k.npy", source.iter_batches(3), LABELS, 6, "keep", sae=sae)
    assert not (tmp_path / "k.npy").exists()


def test_streamed_random_rows_are_random_targets(tmp_path):
    """The ablation's targets: write_targets' ``random`` strategy, in any batching, gives exactly the
    rows of random_targets (width 16: torch draws normals 16 at a time)."""
    from common.activations import ArraySource
    from common.targets import write_targets

    n, labels = 1000, torch.arange(1000) % 10
    source = ArraySource(torch.zeros(n, 16), labels)
    for batch in (n, 96, 333):
        path = tmp_path / f"r{batch}.npy"
        write_targets(path, source.iter_batches(batch), labels, 16, "random", random_seed=42)
        assert torch.equal(TargetTable(path, labels).all(), random_targets(n, 16, seed=42))


def test_a_pairing_is_a_permuted_source(tmp_path):
    """MNIST's shuffled pairing: a source whose row i holds the activations of example pi(i) gives
    target_i = decode(sharpen_{y_i}(z_pi(i))), bit for bit the table decoded from the permuted codes."""
    from common.activations import ArraySource
    from common.targets import write_targets

    torch.manual_seed(3)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, l1_coeff=0.1)).eval()
    h, labels = torch.relu(torch.randn(500, 16)), torch.arange(500) % 10
    perm = torch.randperm(500)
    with torch.no_grad():
        codes = sae.encode(h)
    top = top_features(class_means(codes, labels, 10), 4)
    content = torch.arange(500.0)
    for mode in ("top", "mask"):
        path = tmp_path / f"{mode}.npy"
        source = ArraySource(h[perm], labels)
        write_targets(path, source.iter_batches(len(source)), labels, 16, mode, sae=sae, top_idx=top, content=content)
        table = TargetTable(path, labels, content=content).all()
        assert torch.equal(table, sharpened_targets(sae, codes[perm], labels, top, mode))
    with pytest.raises(UserError, match="another dataset"):
        TargetTable(tmp_path / "top.npy", labels, content=content + 1)      # the inputs' hash is in the fingerprint
