"""Checks of a resolved DIGIT-MNIST config, run by `python -m common.runs` before anything trains.

Every key's type, range and allowed values (:data:`SCHEMA`, common/schema.py), then the values that
depend on each other. Each impossible setting stops with one ``error:`` line before any work.
"""
from common import schema as S
from common.aux_loss import AUX_LOSSES
from common.errors import require
from common.sae import DECODER_NORMS, L1_FORMS, SAEConfig
from common.sharpening import SAE_STRATEGIES

LAYERS = (1, 2)          # the MLP's two hidden layers, h1 and h2

SCHEMA = {
    "experiment": S.text(), "cycles": S.integer(ge=0), "preset": S.optional(S.text()),
    "data": {"val_size": S.integer(ge=1, le=59999), "split_seed": S.integer(ge=0)},
    "train": {"epochs": S.integer(ge=1), "batch_size": S.integer(ge=1), "lr": S.real(gt=0),
              "threads": S.integer(ge=0),                              # 0: torch's default thread count
              "adam": S.optional(S.choice("fused", "plain")),
              "step": S.optional(S.choice("autograd", "manual"))},
    "sae": {"d_sae": S.integer(ge=1), "l1_coeff": S.real(ge=0), "l1_form": S.choice(*L1_FORMS),
            "decoder_norm": S.choice(*DECODER_NORMS), "lr": S.real(gt=0), "layers": S.items(S.choice(*LAYERS))},
    "aux": {"kind": S.choice(*AUX_LOSSES), "layer": S.choice(*LAYERS), "select": S.choice("fixed", "sweep"),
            "lambdas": S.items(S.real(ge=0), nonempty=False), "sweep": S.items(S.real(ge=0)),
            "select_on": S.optional(S.choice("val", "test"))},
    "sharpen": {"top_k": S.integer(ge=1), "mode": S.choice(*SAE_STRATEGIES), "pairing": S.choice("shuffled", "aligned")},
    "ablation": {"aux_lambda": S.optional(S.real(ge=0)), "lambda": S.optional(S.real(ge=0)),   # old name of aux_lambda
                 "kind": S.choice(*AUX_LOSSES), "select": S.choice("fixed", "sweep")},
    "metrics": {"l0_threshold": S.real(ge=0), "probe_max_iter": S.integer(ge=1),
                "extra_probe_layers": S.items(S.choice(*LAYERS), nonempty=False), "recon_top_k": S.integer(ge=1),
                "recon_top_k_from": S.optional(S.choice("test", "train")),
                "probe_backend": S.optional(S.choice("sklearn", "fast"))},
}


def validate(cfg: dict) -> None:
    """Impossible settings stop before anything runs."""
    S.check(cfg, SCHEMA)
    ablation = cfg["ablation"]
    require(("aux_lambda" in ablation) != ("lambda" in ablation),
            "the config needs exactly one of ablation.aux_lambda and ablation.lambda (its old name)")
    require(cfg["aux"]["select"] != "fixed" or len(cfg["aux"]["lambdas"]) >= cfg["cycles"],
            f"aux.lambdas has {len(cfg['aux']['lambdas'])} values for {cfg['cycles']} cycles")
    d_sae = cfg["sae"]["d_sae"]
    require(cfg["sharpen"]["top_k"] <= d_sae, f"sharpen.top_k={cfg['sharpen']['top_k']} must be in 1..{d_sae} (sae.d_sae)")
    require(cfg["metrics"]["recon_top_k"] <= d_sae,
            f"metrics.recon_top_k={cfg['metrics']['recon_top_k']} must be in 1..{d_sae} (sae.d_sae)")
    require(cfg["aux"]["layer"] in cfg["sae"]["layers"], f"aux.layer {cfg['aux']['layer']} needs an SAE (sae.layers)")
    SAEConfig(d_in=16, d_sae=d_sae, l1_coeff=cfg["sae"]["l1_coeff"], l1_form=cfg["sae"]["l1_form"],
              decoder_norm=cfg["sae"]["decoder_norm"])
    require(all(k in cfg["sae"]["layers"] for k in cfg["metrics"]["extra_probe_layers"]),
            "metrics.extra_probe_layers must name layers that have an SAE (sae.layers)")
