"""Our SAE checkpoints to and from the SAELens directory format.

``python -m common.export --format saelens CHECKPOINT OUT_DIR`` writes ``OUT_DIR/cfg.json`` and
``OUT_DIR/sae_weights.safetensors``, which ``sae_lens.SAE.load_from_disk(OUT_DIR)`` opens (SAELens 6.x):

=============  ============  ==============================================
SAELens        shape         ours (:class:`common.sae.SparseAutoencoder`)
=============  ============  ==============================================
``W_enc``      d_in x d_sae  ``encoder.weight`` transposed
``b_enc``      d_sae         ``encoder.bias``
``W_dec``      d_sae x d_in  ``decoder.weight`` transposed
``b_dec``      d_in          ``decoder.bias``
=============  ============  ==============================================

Our encoder is relu(W_e x + b_e) with no pre-bias, so the export sets ``apply_b_dec_to_input`` to
false (SAELens then computes relu(x @ W_enc + b_enc), the same function, with ``b_enc`` unchanged).
Architecture ``standard`` (ReLU) or ``topk`` with ``k`` (SAELens takes the top k pre-activations and
applies ReLU to them; ours applies ReLU first and then keeps the top k: the same codes). No input
normalisation. The decoder norm ('none' | 'rows' | 'features') is a constraint applied while
training; the stored weights are exported as they are and the norm is recorded in the metadata.
``metadata`` also names the hooked activation (``hook_name``, from the run's ``config.yaml``) and
holds our SAE config, so that the way back is exact.

``python -m common.export --format ours SAELENS_DIR OUT.safetensors`` (or :func:`import_saelens`)
turns an SAELens ``standard`` / ``topk`` SAE into our class, so that our sharpening and metrics run
on it. SAELens options our class has no equivalent for are refused; ``apply_b_dec_to_input`` and
``rescale_acts_by_decoder_norm`` are folded into the weights (the same function up to float rounding).
Neither direction needs the ``sae_lens`` package.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import load_meta
from .errors import UserError, cli_main, require
from .sae import SAEConfig, SparseAutoencoder

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# the cfg.json layout SAELens introduced in 6.0; an older (or missing) version makes SAELens rewrite
# the config with its pre-6.0 defaults (e.g. apply_b_dec_to_input = true)
SAELENS_FORMAT_VERSION = "6.0.0"
SAELENS_ARCHITECTURES = ("standard", "topk")
OUR_CONFIG_KEY = "sae_ception_config"  # our SAEConfig inside cfg.json's metadata


def saelens_state(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The four SAELens tensors of our SAE (float32, contiguous, on the CPU)."""
    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous()

    return {"W_enc": plain(sae.encoder.weight.T), "b_enc": plain(sae.encoder.bias),
            "W_dec": plain(sae.decoder.weight.T), "b_dec": plain(sae.decoder.bias)}


def saelens_cfg(cfg: SAEConfig, *, hook_name: str | None, model_name: str | None = None, **metadata) -> dict:
    """The ``cfg.json`` of an SAELens SAE computing exactly our SAE's function (see the module docstring)."""
    out = {"architecture": "standard" if cfg.topk is None else "topk", "d_in": cfg.d_in, "d_sae": cfg.d_sae,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none"}
    if cfg.topk is not None:
        out.update({"k": cfg.topk, "rescale_acts_by_decoder_norm": False})
    out["metadata"] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "hook_name": hook_name, "model_name": model_name,
                       OUR_CONFIG_KEY: asdict(cfg), **metadata}
    return out


def export_saelens(sae: SparseAutoencoder, out_dir: str | os.PathLike, *, hook_name: str | None,
                   model_name: str | None = None, **metadata) -> Path:
    """Write ``out_dir/cfg.json`` and ``out_dir/sae_weights.safetensors`` (the directory appears complete or not at all)."""
    out_dir = Path(out_dir)
    require(not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())),
            f"{out_dir} already exists and is not empty; choose a new directory")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(saelens_state(sae), str(tmp / SAELENS_WEIGHTS))
        cfg = saelens_cfg(sae.cfg, hook_name=hook_name, model_name=model_name, **metadata)
        (tmp / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def import_saelens(directory: str | os.PathLike) -> SparseAutoencoder:
    """An SAELens ``standard`` or ``topk`` SAE directory as our :class:`SparseAutoencoder` (float32, CPU).

    An SAE we exported comes back bit for bit, with its training config (L1 coefficient and form,
    decoder norm) from the metadata; a foreign one gets ``l1_coeff`` 0 and decoder norm 'none'.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / SAELENS_CFG, directory / SAELENS_WEIGHTS
    require(cfg_path.is_file() and weights_path.is_file(),
            f"{directory} is not an SAELens SAE directory (needs {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
        state = load_file(str(weights_path))
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{directory} holds a corrupt SAELens SAE ({err})") from None
    require(isinstance(cfg, dict), f"{cfg_path} is not a JSON object")
    arch = cfg.get("architecture", "standard")
    require(arch in SAELENS_ARCHITECTURES, f"{cfg_path}: architecture '{arch}' has no equivalent here "
                                           f"(supported: {', '.join(SAELENS_ARCHITECTURES)})")
    norm = cfg.get("normalize_activations") or "none"
    require(norm == "none", f"{cfg_path}: normalize_activations '{norm}' is not supported (only 'none')")
    require((cfg.get("reshape_activations") or "none") == "none",
            f"{cfg_path}: reshape_activations '{cfg.get('reshape_activations')}' is not supported (only 'none')")
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in state]
    require(not missing, f"{weights_path} lacks {', '.join(missing)}")
    w_enc, b_enc, w_dec, b_dec = (state[k].to(torch.float32) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    d_in, d_sae = int(cfg.get("d_in", w_enc.shape[0])), int(cfg.get("d_sae", w_enc.shape[1]))
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    wrong = [k for k, t in zip(shapes, (w_enc, b_enc, w_dec, b_dec)) if tuple(t.shape) != shapes[k]]
    require(not wrong, f"{weights_path}: {', '.join(wrong)} do not have the shapes of d_in={d_in}, d_sae={d_sae}")
    # SAELens' apply_b_dec_to_input defaults to true when absent (its 6.x dataclass default)
    if cfg.get("apply_b_dec_to_input", True):      # relu((x - b_dec) W_enc + b_enc)
        b_enc = b_enc - b_dec @ w_enc
    if cfg.get("rescale_acts_by_decoder_norm", False):  # codes scaled by ||W_dec_j||, atoms divided by it
        norms = w_dec.norm(dim=1).clamp_min(1e-8)
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    topk = int(cfg.get("k", 100)) if arch == "topk" else None   # 100: SAELens' default k
    ours = (cfg.get("metadata") or {}).get(OUR_CONFIG_KEY)
    if isinstance(ours, dict) and ours.get("d_in") == d_in and ours.get("d_sae") == d_sae:
        sae_cfg = SAEConfig(**{f.name: ours[f.name] for f in fields(SAEConfig) if f.name in ours})
        require(sae_cfg.topk == topk, f"{cfg_path}: architecture {arch} (k={topk}) contradicts the recorded "
                                      f"{OUR_CONFIG_KEY} (topk={sae_cfg.topk})")
    else:
        sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, l1_coeff=0.0, decoder_norm="none", topk=topk)
    sae = SparseAutoencoder(sae_cfg)
    with torch.no_grad():
        sae.encoder.weight.copy_(w_enc.T)
        sae.encoder.bias.copy_(b_enc)
        sae.decoder.weight.copy_(w_dec.T)
        sae.decoder.bias.copy_(b_dec)
    return sae.eval()


def checkpoint_hook(checkpoint: str | os.PathLike) -> tuple[str | None, str | None, dict]:
    """(hook name, model name, provenance) of one of our SAE checkpoints, from its metadata and the
    ``config.yaml`` of the run it belongs to (``<run>/seed_<s>/cycle_<k>/<sae>.safetensors``)."""
    from .config import load_run_config

    checkpoint = Path(checkpoint)
    meta = load_meta(checkpoint)
    provenance = {k: meta[k] for k in ("experiment", "cycle", "seed", "layer", "best_epoch") if k in meta}
    run_dir = checkpoint.resolve().parent.parent.parent
    cfg = load_run_config(run_dir) if (run_dir / "config.yaml").is_file() else {}
    if cfg:
        provenance.setdefault("experiment", cfg.get("experiment"))
        provenance["preset"] = cfg.get("preset")
        cycle_name = checkpoint.resolve().parent.name
        if "cycle" not in provenance and cycle_name.startswith("cycle_"):
            provenance["cycle"] = int(cycle_name[len("cycle_"):])
    hook_name = model_name = None
    if "hook" in cfg:    # CIFAR-10 / ImageNet: a forward hook on a module, then a selector
        hook_name = cfg["hook"]["module"]
        provenance["hook_selector"] = cfg["hook"]["selector"]
        model = cfg.get("model", {})
        model_name = model.get("name") or model.get("arch")
    elif "layer" in meta:   # DIGIT-MNIST: the post-ReLU hidden layer h<layer> of the MLP 784-16-16-10
        hook_name = f"h{meta['layer']}"
        model_name = "mlp_784_16_16_10"
    return hook_name, model_name, provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an SAE between our checkpoint format and SAELens'.")
    parser.add_argument("--format", required=True, choices=("saelens", "ours"),
                        help="saelens: our CHECKPOINT (.safetensors) -> SAELens directory DEST; "
                             "ours: SAELens directory SOURCE -> our checkpoint DEST (.safetensors)")
    parser.add_argument("source", help="our SAE checkpoint (--format saelens) or an SAELens directory (--format ours)")
    parser.add_argument("dest", help="the SAELens directory to write (saelens) or the .safetensors file to write (ours)")
    parser.add_argument("--hook-name", help="hook name to record (default: from the checkpoint's run config)")
    parser.add_argument("--model-name", help="model name to record (default: from the checkpoint's run config)")
    args = parser.parse_args(argv)
    if args.format == "saelens":
        source = Path(args.source)
        require(source.suffix == ".safetensors", f"{source} is not an SAE checkpoint (.safetensors)")
        sae = SparseAutoencoder.load(source)
        hook_name, model_name, provenance = checkpoint_hook(source)
        out = export_saelens(sae, args.dest, hook_name=args.hook_name or hook_name,
                             model_name=args.model_name or model_name, **provenance)
        print(f"wrote {out}/{SAELENS_CFG} and {out}/{SAELENS_WEIGHTS} (architecture "
              f"{'standard' if sae.cfg.topk is None else 'topk'}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, "
              f"hook {args.hook_name or hook_name})")
    else:
        dest = Path(args.dest)
        require(dest.suffix == ".safetensors", f"{dest}: the checkpoint to write must end in .safetensors")
        require(not dest.exists(), f"{dest} already exists; choose a new path")
        sae = import_saelens(args.source)
        meta = (json.loads((Path(args.source) / SAELENS_CFG).read_text()).get("metadata") or {})
        sae.save(dest, imported_from=str(args.source), hook_name=args.hook_name or meta.get("hook_name"))
        print(f"wrote {dest} (d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, topk {sae.cfg.topk})")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
