"""common.sae and common.sae_training: loss forms, decoder constraints, TopK, training, save/load."""
import pytest
import torch

from common.activations import ArraySource
from common.errors import UserError
from common.sae import SAEConfig, SparseAutoencoder
from common.sae_training import evaluate_sae, sae_step, train_sae


def make(**kw):
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(**{"d_in": 8, "d_sae": 32, "l1_coeff": 0.1, **kw}))


@pytest.mark.parametrize("form", ["mean", "sum"])
def test_loss_forms(form):
    sae = make(l1_form=form)
    x = torch.randn(16, 8)
    z = torch.relu(x @ sae.encoder.weight.T + sae.encoder.bias)
    x_hat = z @ sae.decoder.weight.T + sae.decoder.bias
    mse = ((x_hat - x) ** 2).mean()
    l1 = z.abs().mean() if form == "mean" else z.abs().sum(1).mean()
    loss = sae.loss(x)
    assert torch.allclose(loss.mse, mse) and torch.allclose(loss.l1, l1)
    assert torch.allclose(loss.total, mse + 0.1 * l1)
    if form == "sum":
        assert torch.allclose(sae.loss(x).l1, make(l1_form="mean").loss(x).l1 * 32)


@pytest.mark.parametrize("norm,dim", [("rows", 1), ("features", 0)])
def test_decoder_normalisation_holds_after_a_step(norm, dim):
    sae = make(decoder_norm=norm)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae_step(sae, opt, torch.randn(64, 8))
    norms = sae.decoder.weight.norm(dim=dim)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert norms.numel() == (8 if norm == "rows" else 32)  # rows: the authors' d_in rows; features: atoms


def test_no_decoder_normalisation_leaves_weights_free():
    sae = make(decoder_norm="none")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-1)
    sae_step(sae, opt, torch.randn(64, 8) * 10)
    assert not torch.allclose(sae.decoder.weight.norm(dim=0), torch.ones(32), atol=1e-3)


def test_topk_keeps_at_most_k_codes():
    sae = make(topk=3)
    z = sae.encode(torch.randn(20, 8))
    assert int((z > 0).sum(1).max()) <= 3
    dense = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, l1_coeff=0.1))
    dense.load_state_dict(sae.state_dict())
    full = dense.encode(torch.randn(1, 8).expand(2, 8))
    assert torch.equal(sae.encode(torch.zeros(1, 8)).ne(0).sum(), dense.encode(torch.zeros(1, 8)).ne(0).sum().clamp(max=3))
    assert full.shape == (2, 32)


def test_training_reduces_loss_and_keeps_best_validation_epoch():
    torch.manual_seed(1)
    atoms = torch.randn(6, 8)
    x = torch.relu(torch.randn(600, 6)) @ atoms
    sae = make(l1_coeff=1e-3, decoder_norm="features")
    before = evaluate_sae(sae, ArraySource(x[500:]))["loss"]
    out = train_sae(sae, x[:500], x[500:], epochs=4, batch_size=32, lr=1e-2, seed=0)
    after = evaluate_sae(sae, ArraySource(x[500:]))["loss"]
    assert after < 0.5 * before
    best = min(range(4), key=lambda e: out["history"][e]["val_loss"])
    assert out["best_epoch"] == best
    assert after == pytest.approx(out["history"][best]["val_loss"], rel=1e-5)


def test_training_accepts_a_memmap(tmp_path):
    import numpy as np

    arr = np.lib.format.open_memmap(tmp_path / "acts.npy", mode="w+", dtype=np.float16, shape=(256, 8))
    arr[:] = np.random.default_rng(0).normal(size=(256, 8))
    arr.flush()
    sae = make()
    train_sae(sae, np.load(tmp_path / "acts.npy", mmap_mode="r"), None, epochs=1, batch_size=64, lr=1e-3)


def test_save_load_round_trip(tmp_path):
    sae = make(l1_form="mean", decoder_norm="rows", topk=5)
    sae.save(tmp_path / "sae.safetensors", cycle=2)
    loaded = SparseAutoencoder.load(tmp_path / "sae.safetensors")
    assert loaded.cfg == sae.cfg
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x)[0], sae(x)[0])


def test_corrupt_or_mismatched_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "sae.safetensors"
    make().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        SparseAutoencoder.load(path)
    make().save(path)
    from common.checkpoint import load_module

    with pytest.raises(UserError, match="does not match"):
        load_module(path, SparseAutoencoder(SAEConfig(d_in=8, d_sae=64, l1_coeff=0.1)))


@pytest.mark.parametrize("kw", [{"l1_form": "max"}, {"decoder_norm": "cols"}, {"topk": 0}, {"topk": 33},
                                {"l1_coeff": -1.0}, {"d_sae": 0}])
def test_impossible_config_is_rejected(kw):
    with pytest.raises(UserError):
        make(**kw)


def test_training_rejects_wrong_width():
    with pytest.raises(UserError, match="width"):
        train_sae(make(), torch.randn(10, 9), None, epochs=1, batch_size=4, lr=1e-3)


def test_training_from_an_iterator_of_batches():
    from common.activations import IterableSource

    torch.manual_seed(3)
    data = torch.randn(256, 8)
    calls = []

    def batches(shuffle, seed):  # e.g. activations recomputed from fresh augmentations each epoch
        calls.append(seed)
        order = torch.randperm(256, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(256)
        return (data[order[i:i + 32]] for i in range(0, 256, 32))

    sae = make(l1_coeff=1e-3)
    out = train_sae(sae, IterableSource(batches, dim=8, length=256), data[:64], epochs=2, batch_size=32, lr=1e-2, seed=5)
    assert calls == [5, 6] and len(out["history"]) == 2
    with pytest.raises(UserError, match="expected"):
        train_sae(make(), IterableSource(lambda s, e: iter([torch.randn(4, 9)]), dim=8, length=4), None,
                  epochs=1, batch_size=4, lr=1e-3)


@pytest.mark.parametrize("form", ["sum", "mean"])
@pytest.mark.parametrize("topk", [None, 5])
def test_hand_derived_gradients_equal_autograd(form, topk):
    """loss_and_grads_ writes exactly the gradients autograd gives (float64), reusing its buffers."""
    torch.manual_seed(3)
    sae = SparseAutoencoder(SAEConfig(d_in=12, d_sae=40, l1_coeff=0.05, l1_form=form, topk=topk)).double()
    x = torch.randn(33, 12, dtype=torch.float64)
    want = sae.loss(x)
    want.total.backward()
    grads = [p.grad.clone() for p in sae.parameters()]
    buffers = [p.grad.data_ptr() for p in sae.parameters()]
    got = sae.loss_and_grads_(x)
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-13, atol=0)
    for p, g, ptr in zip(sae.parameters(), grads, buffers):
        assert torch.allclose(p.grad, g, rtol=1e-12, atol=1e-15)
        assert p.grad.data_ptr() == ptr            # overwritten in place, not accumulated
    assert not any(p.grad is None for p in sae.parameters())


def test_sae_step_matches_an_autograd_step():
    torch.manual_seed(4)
    a = make(decoder_norm="rows")
    b = make(decoder_norm="rows")
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (a, b))
    for _ in range(3):
        x = torch.randn(64, 8)
        got = sae_step(a, opt_a, x)
        want = b.loss(x).total
        opt_b.zero_grad(set_to_none=True)
        want.backward()
        opt_b.step()
        b.normalize_decoder_()
        assert got == pytest.approx(float(want.detach()), rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
