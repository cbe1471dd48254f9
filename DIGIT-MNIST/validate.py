"""Checks of a resolved DIGIT-MNIST config, run by `python -m common.runs` before anything trains."""
from common.errors import require
from common.sae import SAEConfig


def validate(cfg: dict) -> None:
    """Impossible settings stop before anything runs."""
    require(cfg["cycles"] >= 0, f"cycles must be >= 0, got {cfg['cycles']}")
    require(isinstance(cfg["data"]["val_size"], int) and 0 < cfg["data"]["val_size"] < 60000, f"data.val_size must be an integer in 1..59999, got {cfg['data']['val_size']}")
    require(cfg["train"]["epochs"] > 0 and cfg["train"]["batch_size"] > 0, "train.epochs and train.batch_size must be positive")
    require(cfg["aux"]["select"] in ("fixed", "sweep"), f"aux.select must be fixed or sweep, got {cfg['aux']['select']}")
    require(cfg["aux"]["select"] != "fixed" or len(cfg["aux"]["lambdas"]) >= cfg["cycles"],
            f"aux.lambdas has {len(cfg['aux']['lambdas'])} values for {cfg['cycles']} cycles")
    require(all(lam >= 0 for lam in cfg["aux"]["lambdas"] + cfg["aux"]["sweep"]), "λ values must be >= 0")
    require(1 <= cfg["sharpen"]["top_k"] <= cfg["sae"]["d_sae"],
            f"sharpen.top_k={cfg['sharpen']['top_k']} must be in 1..{cfg['sae']['d_sae']} (sae.d_sae)")
    require(cfg["sharpen"]["pairing"] in ("shuffled", "aligned"), "sharpen.pairing must be shuffled or aligned")
    require(cfg["aux"]["layer"] in cfg["sae"]["layers"], f"aux.layer {cfg['aux']['layer']} needs an SAE (sae.layers)")
    SAEConfig(d_in=16, d_sae=cfg["sae"]["d_sae"], l1_coeff=cfg["sae"]["l1_coeff"], l1_form=cfg["sae"]["l1_form"],
              decoder_norm=cfg["sae"]["decoder_norm"])
    require(all(k in cfg["sae"]["layers"] for k in cfg["metrics"]["extra_probe_layers"]),
            "metrics.extra_probe_layers must name layers that have an SAE (sae.layers)")
