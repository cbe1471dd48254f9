"""Every config value of the three experiments is checked (type, range, allowed set) before any work:
one `error:` line, exit status 2, nothing written (common/schema.py and each experiment's validate.py)."""
from __future__ import annotations

import copy
import sys

import pytest

from common import schema as S
from common.config import load_config
from common.errors import UserError
from conftest import REPO, assert_one_line_error, run

MNIST = REPO / "DIGIT-MNIST"


def _validator(folder):
    """The experiment's validate(cfg) as init and the launcher call it (on a read-only Config)."""
    from common.runs import experiment_validator

    return experiment_validator(folder / "config.yaml")


# ----------------------------------------------------------------------------- DIGIT-MNIST, as a new user
@pytest.mark.parametrize("override,match", [
    (["--train.lr", "fast"], "train.lr must be a number > 0, got 'fast'"),
    (["--aux.kind", "cosinus"], "aux.kind must be one of 'cosine', 'broadcast', got 'cosinus'"),
    (["--sharpen.mode", "keep"], "sharpen.mode must be one of 'top', 'mask', 'per_example', got 'keep'"),
])
def test_mnist_run_sh_rejects_a_bad_value_before_any_work(tmp_path, override, match):
    out = tmp_path / "run"
    proc = run(["bash", MNIST / "run.sh", "--data-root", tmp_path / "data", "--out", out, *override])
    assert proc.returncode == 2
    assert_one_line_error(proc, match)
    assert not out.exists() and not (tmp_path / "data").exists()   # no run folder, no download started


def test_mnist_run_sh_rejects_an_out_that_is_a_file(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("a user's file\n")
    proc = run(["bash", MNIST / "run.sh", "--data-root", tmp_path / "data", "--out", out])
    assert proc.returncode == 2
    assert_one_line_error(proc, "is a file, not a run directory")
    assert out.read_text() == "a user's file\n"


def _mnist_cfg(preset="faithful"):
    return load_config(MNIST / "config.yaml", preset)


def test_mnist_keys_of_the_other_branch_are_checked_when_present_and_may_be_absent():
    validate = _validator(MNIST)
    base = _mnist_cfg()
    for key in ("adam", "step"):
        base["train"].pop(key, None)
    base["metrics"].pop("probe_backend", None)
    base["metrics"].pop("recon_top_k_from", None)
    validate(base)                                             # absent: accepted
    added = copy.deepcopy(base)
    added["train"].update(adam="plain", step="manual", threads=0)
    added["metrics"].update(probe_backend="fast", recon_top_k_from="train")
    added["ablation"]["aux_lambda"] = added["ablation"].pop("lambda", added["ablation"].get("aux_lambda"))
    validate(added)                                            # present, valid: accepted (threads 0 allowed)
    bad = {("train", "adam"): "fussed", ("train", "step"): "numeric", ("train", "threads"): -1,
           ("metrics", "probe_backend"): "torch", ("metrics", "recon_top_k_from"): "val",
           ("ablation", "aux_lambda"): "0.2x"}
    for (section, key), value in bad.items():
        cfg = copy.deepcopy(added)
        cfg[section][key] = value
        with pytest.raises(UserError, match=f"{section}.{key} must be"):
            validate(cfg)
    both = copy.deepcopy(added)
    both["ablation"]["lambda"] = 0.1
    with pytest.raises(UserError, match="exactly one of ablation.aux_lambda and ablation.lambda"):
        validate(both)


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "epochs", 2.5, "train.epochs must be an integer >= 1, got 2.5"),
    ("train", "batch_size", True, "train.batch_size must be an integer >= 1, got True"),
    ("data", "val_size", 60000, "data.val_size must be an integer >= 1 and <= 59999"),
    ("sae", "layers", [1, 3], "sae.layers[1] must be one of 1, 2, got 3"),
    ("aux", "sweep", [], "aux.sweep must be a list of at least 1"),
    ("aux", "lambdas", [0.1, -0.2, 0.1], "aux.lambdas[1] must be a number >= 0"),
    ("sharpen", "pairing", "random", "sharpen.pairing must be one of 'shuffled', 'aligned'"),
    ("metrics", "l0_threshold", "tiny", "metrics.l0_threshold must be a number >= 0"),
])
def test_mnist_every_section_is_typed(section, key, value, match):
    cfg = _mnist_cfg("corrected")
    cfg[section][key] = value
    with pytest.raises(UserError, match=match.replace("[", r"\[").replace("]", r"\]")):
        _validator(MNIST)(cfg)


# ----------------------------------------------------------------------------- CIFAR-10 and ImageNet
@pytest.mark.parametrize("experiment", ["CIFAR-10", "ImageNet1K"])
@pytest.mark.parametrize("key,value,match", [
    ("aux.detach", "yes", "aux.detach must be true or false, got 'yes'"),
    ("aux.kind", "cosinus", "aux.kind must be one of"),
    ("adapt.finetune.lr", "fast", "adapt.finetune.lr must be a number > 0, got 'fast'"),
    ("baseline.finetune.test_amp", "fp8", "baseline.finetune.test_amp must be one of"),
    ("activations.sae_amp", "fp32", "activations.sae_amp must be one of 'shared', 'none', 'bf16', 'fp16'"),
    ("metrics.probe.test_amp", 16, "metrics.probe.test_amp must be one of"),
    ("metrics.recon_top_k_from", "val", "metrics.recon_top_k_from must be one of 'test', 'train', got 'val'"),
    ("sharpen.mode", "keep", "sharpen.mode must be one of"),
    ("sae.epochs", [1, 0, 1, 1], r"sae.epochs\[1\] must be an integer >= 1"),
    ("sae.l1_coeff", "small", "sae.l1_coeff must be a number >= 0, or a list"),
    ("runtime.threads", -1, "runtime.threads must be an integer >= 0"),
    ("metrics.probe.subset_fraction", 1.5, "metrics.probe.subset_fraction must be a number > 0 and <= 1"),
    ("cycles", "three", "cycles must be an integer >= 0, got 'three'"),
])
def test_decoupled_configs_reject_bad_values_in_process(experiment, key, value, match):
    folder = REPO / experiment
    cfg = load_config(folder / "config.yaml", "faithful", {key: value})
    with pytest.raises(UserError, match=match):
        _validator(folder)(cfg)


@pytest.mark.parametrize("experiment,key,value,match", [
    ("CIFAR-10", "model.arch", "vit_b_16", "model.arch must be one of 'vit_h_14', 'custom'"),
    ("CIFAR-10", "data.val_fraction", 1.0, "data.val_fraction must be a number > 0 and < 1"),
    ("CIFAR-10", "model.custom.num_heads", 0, "model.custom.num_heads must be an integer >= 1"),
    ("ImageNet1K", "data.interpolation", "nearest", "data.interpolation must be one of 'bilinear', 'bicubic'"),
    ("ImageNet1K", "backbone.batch_size", "big", "backbone.batch_size must be an integer >= 1"),
])
def test_each_experiment_checks_its_own_keys(experiment, key, value, match):
    folder = REPO / experiment
    with pytest.raises(UserError, match=match):
        _validator(folder)(load_config(folder / "config.yaml", "corrected", {key: value}))


def test_cifar_weights_may_be_a_file_path_checked_where_it_is_loaded(tmp_path):
    validate = _validator(REPO / "CIFAR-10")
    for weights in ("swag_e2e", "none", str(tmp_path / "my_vit.pth")):
        validate(load_config(REPO / "CIFAR-10" / "config.yaml", "faithful", {"model.weights": weights}))
    with pytest.raises(UserError, match="model.weights must be a non-empty string"):
        validate(load_config(REPO / "CIFAR-10" / "config.yaml", "faithful", {"model.weights": 3}))


@pytest.mark.parametrize("experiment", ["CIFAR-10", "ImageNet1K"])
def test_decoupled_run_sh_stops_with_one_line_and_writes_nothing(tmp_path, experiment):
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "common.runs", "--config", REPO / experiment / "config.yaml", "--out", out,
                "--adapt.finetune.epochs", "many"])
    assert proc.returncode == 2
    assert_one_line_error(proc, "adapt.finetune.epochs must be an integer >= 1, got 'many'")
    assert not out.exists()


def test_schema_fields():
    S.check({"a": 1, "b": {"c": [0.5, 1]}}, {"a": S.integer(ge=0), "b": {"c": S.items(S.real(gt=0))},
                                               "d": S.optional(S.boolean())})
    with pytest.raises(UserError, match="the config lacks the key 'b.c'"):
        S.check({"a": 1, "b": {}}, {"a": S.integer(), "b": {"c": S.integer()}})
    with pytest.raises(UserError, match="b must be a mapping"):
        S.check({"b": 3}, {"b": {"c": S.integer()}})
    with pytest.raises(UserError, match="a must be one of 0, 1, got True"):   # True == 1, but is no option
        S.check({"a": True}, {"a": S.choice(0, 1)})
    with pytest.raises(UserError, match="a must be a number >= 0 or null, got -1"):
        S.check({"a": -1}, {"a": S.nullable(S.real(ge=0))})
    S.check({"a": None}, {"a": S.nullable(S.real(ge=0))})
