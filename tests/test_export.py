"""SAELens export / import (common/export.py): the cfg.json format, a bit-exact round trip, and the
real ``sae_lens`` package computing the same encode / decode as our SAE (skipped only without the
``saelens`` extra: ``pip install -e ".[saelens]"``)."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.export import SAELENS_CFG, SAELENS_WEIGHTS, export_saelens, import_saelens
from common.io import write_yaml
from common.sae import SAEConfig, SparseAutoencoder

from conftest import assert_one_line_error, run

VARIANTS = {"relu-l1, decoder norm none": dict(decoder_norm="none"),
            "relu-l1, decoder norm rows": dict(decoder_norm="rows"),
            "relu-l1, decoder norm features": dict(decoder_norm="features"),
            "topk": dict(decoder_norm="features", topk=5)}


def trained_like(d_in=12, d_sae=40, seed=0, **options) -> SparseAutoencoder:
    """Random weights that satisfy the decoder-norm constraint, biases nonzero (a pre-bias would show)."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, l1_coeff=3e-4, **options))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.3)
        sae.decoder.bias.normal_(0, 1.0)
    sae.normalize_decoder_()
    return sae.eval()


def same_params(a: SparseAutoencoder, b: SparseAutoencoder) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


GOLDEN_STANDARD = {
    "architecture": "standard", "d_in": 12, "d_sae": 40, "dtype": "float32", "device": "cpu",
    "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
    "metadata": {"sae_lens_version": "6.0.0", "hook_name": "encoder", "model_name": "vit_h_14",
                 "sae_ception_config": {"d_in": 12, "d_sae": 40, "l1_coeff": 3e-4, "l1_form": "sum",
                                        "decoder_norm": "rows", "topk": None},
                 "experiment": "CIFAR-10", "cycle": 2}}


def test_cfg_json_is_the_saelens_6_layout(tmp_path):
    """Golden file: the fields SAELens 6.x needs (dtype, architecture, d_in, d_sae, version >= 6 so that
    no pre-6.0 defaults are applied) and apply_b_dec_to_input false (our encoder has no pre-bias)."""
    sae = trained_like(decoder_norm="rows")
    out = export_saelens(sae, tmp_path / "sae", hook_name="encoder", model_name="vit_h_14", experiment="CIFAR-10",
                         cycle=2)
    assert sorted(p.name for p in out.iterdir()) == [SAELENS_CFG, SAELENS_WEIGHTS]
    assert json.loads((out / SAELENS_CFG).read_text()) == GOLDEN_STANDARD
    weights = load_file(str(out / SAELENS_WEIGHTS))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"W_enc": (12, 40), "b_enc": (40,),
                                                               "W_dec": (40, 12), "b_dec": (12,)}
    assert torch.equal(weights["W_enc"], sae.encoder.weight.T) and torch.equal(weights["W_dec"], sae.decoder.weight.T)
    assert torch.equal(weights["b_enc"], sae.encoder.bias)   # no adjustment: SAELens does not subtract b_dec
    topk = json.loads((export_saelens(trained_like(topk=5), tmp_path / "topk", hook_name="h1") / SAELENS_CFG).read_text())
    assert topk["architecture"] == "topk" and topk["k"] == 5 and topk["rescale_acts_by_decoder_norm"] is False
    assert topk["metadata"]["sae_ception_config"]["topk"] == 5


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_exact(tmp_path, variant):
    sae = trained_like(**VARIANTS[variant])
    back = import_saelens(export_saelens(sae, tmp_path / "sae", hook_name="h1"))
    assert back.cfg == sae.cfg and same_params(back, sae)
    x = torch.randn(64, 12)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x)[0], sae(x)[0])


def test_foreign_saelens_layout_is_folded_into_our_class(tmp_path):
    """A directory as SAELens writes it by default: apply_b_dec_to_input true, codes rescaled by the
    decoder norms; our SAE computes the same function after folding both into its weights."""
    torch.manual_seed(1)
    w_enc, b_enc, w_dec, b_dec = torch.randn(12, 30), torch.randn(30) * 0.3, torch.randn(30, 12), torch.randn(12)
    (tmp_path / "foreign").mkdir()
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(tmp_path / "foreign" / SAELENS_WEIGHTS))
    cfg = {"architecture": "topk", "d_in": 12, "d_sae": 30, "dtype": "float32", "k": 6, "apply_b_dec_to_input": True,
           "rescale_acts_by_decoder_norm": True, "normalize_activations": "none", "metadata": {"sae_lens_version": "6.1.0"}}
    (tmp_path / "foreign" / SAELENS_CFG).write_text(json.dumps(cfg))
    ours = import_saelens(tmp_path / "foreign")
    assert ours.cfg == SAEConfig(d_in=12, d_sae=30, l1_coeff=0.0, decoder_norm="none", topk=6)
    x = torch.randn(50, 12)
    norms = w_dec.norm(dim=1)
    pre = ((x - b_dec) @ w_enc + b_enc) * norms       # SAELens' TopK SAE with both options, written out
    top = pre.topk(6, dim=-1)
    codes = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    x_hat = codes @ (w_dec / norms[:, None]) + b_dec
    torch.testing.assert_close(ours.encode(x), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x)[0], x_hat, rtol=1e-5, atol=1e-5)


def test_unsupported_saelens_options_are_refused(tmp_path):
    sae_dir = export_saelens(trained_like(), tmp_path / "sae", hook_name="h1")
    cfg = json.loads((sae_dir / SAELENS_CFG).read_text())
    from common.errors import UserError

    for change, fragment in (({"architecture": "jumprelu"}, "architecture 'jumprelu'"),
                             ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm'"),
                             ({"d_sae": 41}, "do not have the shapes")):
        (sae_dir / SAELENS_CFG).write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UserError, match=fragment):
            import_saelens(sae_dir)
    with pytest.raises(UserError, match="not an SAELens SAE directory"):
        import_saelens(tmp_path)


def test_cli_exports_a_run_checkpoint_with_its_hook_and_imports_it_back(tmp_path):
    """``python -m common.export``: the hook comes from the run's config.yaml; --format ours comes back exact."""
    run_dir = tmp_path / "run"
    cycle = run_dir / "seed_42" / "cycle_1"
    cycle.mkdir(parents=True)
    write_yaml(run_dir / "config.yaml", {"experiment": "ImageNet1K", "preset": "corrected",
                                         "hook": {"module": "head.flatten", "selector": "flatten"},
                                         "model": {"name": "convnextv2_atto"}})
    sae = trained_like(decoder_norm="features")
    sae.save(cycle / "sae.safetensors", experiment="ImageNet1K", cycle=1, seed=42, best_epoch=0)
    out = tmp_path / "exported"
    run([sys.executable, "-m", "common.export", "--format", "saelens", cycle / "sae.safetensors", out], check=True)
    meta = json.loads((out / SAELENS_CFG).read_text())["metadata"]
    assert (meta["hook_name"], meta["hook_selector"], meta["model_name"]) == ("head.flatten", "flatten", "convnextv2_atto")
    assert (meta["experiment"], meta["cycle"], meta["seed"], meta["preset"]) == ("ImageNet1K", 1, 42, "corrected")
    run([sys.executable, "-m", "common.export", "--format", "ours", out, tmp_path / "back.safetensors"], check=True)
    back = SparseAutoencoder.load(tmp_path / "back.safetensors")
    assert back.cfg == sae.cfg and same_params(back, sae)
    # bad input: one line, nothing written
    proc = run([sys.executable, "-m", "common.export", "--format", "saelens", cycle / "sae.safetensors", out])
    assert_one_line_error(proc, "already exists and is not empty")
    proc = run([sys.executable, "-m", "common.export", "--format", "saelens", tmp_path / "none.safetensors", tmp_path / "x"])
    assert_one_line_error(proc, "not found")
    assert not (tmp_path / "x").exists()


def test_mnist_checkpoint_names_its_hidden_layer(tmp_path):
    from common.export import checkpoint_hook

    cycle = tmp_path / "run" / "seed_43" / "cycle_0"
    cycle.mkdir(parents=True)
    write_yaml(tmp_path / "run" / "config.yaml", {"experiment": "DIGIT-MNIST", "preset": "faithful"})
    trained_like(d_in=16).save(cycle / "sae_h1.safetensors", layer=1, seed=43)
    hook, model, provenance = checkpoint_hook(cycle / "sae_h1.safetensors")
    assert (hook, model) == ("h1", "mlp_784_16_16_10")
    assert provenance == {"layer": 1, "seed": 43, "experiment": "DIGIT-MNIST", "preset": "faithful", "cycle": 0}


# ------------------------------------------------------------------ the real sae_lens (the "saelens" extra)
@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="the saelens extra is not installed (pip install -e '.[saelens]')")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sae_lens_loads_our_export_and_computes_the_same(tmp_path, sae_lens, variant):
    ours = trained_like(**VARIANTS[variant])
    theirs = sae_lens.SAE.load_from_disk(str(export_saelens(ours, tmp_path / "sae", hook_name="h1")), device="cpu")
    assert type(theirs).__name__ == ("TopKSAE" if "topk" in VARIANTS[variant] else "StandardSAE")
    assert theirs.cfg.metadata.hook_name == "h1" and theirs.cfg.apply_b_dec_to_input is False
    x = torch.randn(256, 12) * 2
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x)
        assert 0.05 < float((z_ours > 0).double().mean()) < 0.95       # some codes fire, some do not
        torch.testing.assert_close(z_theirs, z_ours, rtol=1e-6, atol=1e-6)
        assert torch.equal(z_theirs != 0, z_ours != 0)
        torch.testing.assert_close(theirs.decode(z_ours), ours.decode(z_ours), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(theirs(x), ours(x)[0], rtol=1e-6, atol=1e-6)


def test_sae_lens_default_sae_imports_as_the_same_function(tmp_path, sae_lens):
    """SAELens' own standard SAE (apply_b_dec_to_input true), saved by SAELens, imported here."""
    torch.manual_seed(2)
    theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=12, d_sae=40))
    with torch.no_grad():
        theirs.b_dec.normal_(0, 1.0)
        theirs.b_enc.normal_(0, 0.3)
    theirs.save_model(str(tmp_path / "theirs"))
    ours = import_saelens(tmp_path / "theirs")
    x = torch.randn(128, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x)[0], theirs(x), rtol=1e-5, atol=1e-5)
