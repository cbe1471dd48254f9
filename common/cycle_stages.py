"""The extract, SAE, sharpen and metrics blocks of a decoupled cycle, over an experiment's data.

Each takes what the recipe built (the frozen model's inputs per split, the splits' labels, the rest
of the model after the hook) and the cycle's settings from the config; none knows an experiment.
Nothing here materialises a dataset-sized array of SAE codes: class means, targets and the probe
stream over :class:`~common.activations.ActivationSource` objects, so ImageNet's 1.26M-row caches
work in bounded memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed as D
from .activation_cache import ActivationCache
from .activations import ArraySource, EncodedSource
from .config import Config
from .decoupled import CycleRun, per_cycle
from .errors import require
from .finetune import amp_dtype
from .io import read_json, write_json
from .runs import Stage
from .sae import SAEConfig, SparseAutoencoder
from .seed import set_seed
from .sharpening import NEEDS_CLASS_FEATURES, ClassMeans, top_features
from .targets import write_targets

Labels = Callable[[str], torch.Tensor]        # split -> labels in index order


def hook_of(cfg: Config) -> tuple[str, str]:
    """(module name, selector) of the hooked activation (``hook.module``, ``hook.selector``)."""
    return cfg.hook.module, cfg.hook.selector


# ----------------------------------------------------------------------------- extract
@dataclass(frozen=True)
class Extraction:
    """One activation cache of a cycle: which split, which forward precision, which storage."""
    name: str        # folder under activations/
    split: str
    amp: str         # autocast of the forward pass
    dtype: str       # storage


def extractions(cfg: Config) -> list[Extraction]:
    """The caches a cycle extracts. ``train`` (targets, probe, SAE) and ``test`` (metrics) run under
    ``activations.amp``; ``val`` (SAE validation only) under ``activations.sae_amp``; a probe split
    whose precision is not ``shared`` gets a cache of its own (``probe_train``, ``probe_test``). A
    pass without autocast is stored as float32: an fp16 file would round it again."""
    acts, probe = cfg.activations, cfg.metrics.probe

    def own(name: str, split: str, amp: str) -> Extraction:
        if amp == "shared":
            return Extraction(name, split, acts.amp, acts.dtype)
        return Extraction(name, split, amp, "float32" if amp == "none" else acts.dtype)

    plan = [own("train", "train", "shared"), own("val", "val", acts.sae_amp), own("test", "test", "shared")]
    plan += [own(f"probe_{split}", split, probe[f"{split}_amp"]) for split in ("train", "test")
             if probe[f"{split}_amp"] != "shared"]
    return plan


def probe_cache_name(cfg: Config, split: str) -> str:
    return split if cfg.metrics.probe[f"{split}_amp"] == "shared" else f"probe_{split}"


def sae_data_amp(cfg: Config) -> str:
    """Autocast of the forward pass that makes the SAE's training data on the fly (as its validation split)."""
    acts = cfg.activations
    return acts.amp if acts.sae_amp == "shared" else acts.sae_amp


def extract_caches(run: CycleRun, stage: Stage, inputs: Callable[[str, bool], tuple[nn.Module, Dataset]],
                   labels: Labels) -> None:
    """Every cache of :func:`extractions`: ``inputs(split, augmented)`` gives the frozen module to
    run and the dataset of (input, label, index) to run it on; the train split is the augmented view
    when ``activations.train_view`` is ``augmented`` (seeded, so the draws are reproducible)."""
    from .extraction import extract

    acts, outputs = run.cfg.activations, []
    for job in extractions(run.cfg):
        augmented = job.split == "train" and acts.train_view == "augmented"
        set_seed(run.seed)
        module, data = inputs(job.split, augmented)
        cache = extract(module, data, *hook_of(run.cfg), run.paths().acts(job.name), device=run.device,
                        autocast_dtype=amp_dtype(run.device, job.amp), batch_size=int(acts.batch_size),
                        num_workers=int(run.cfg.data.num_workers), chunk_rows=int(acts.chunk_rows),
                        dtype=job.dtype, desc=f"extract {job.name}", view="augmented" if augmented else "clean",
                        amp=job.amp)
        cache.require_dataset(labels(job.split), f"the {job.split} split")
        outputs.append(run.paths().acts(job.name) / "manifest.json")
    if run.dist.is_main:
        stage.finish(outputs)
    D.barrier()


# ----------------------------------------------------------------------------- sae
def train_cycle_sae(run: CycleRun, stage: Stage, train, val: ActivationCache) -> None:
    """The cycle's SAE (``sae.*``, the cycle's ``l1_coeff`` and ``epochs``) on ``train`` (a cache,
    or activations recomputed each epoch), the epoch of lowest ``val`` loss kept."""
    from .sae_training import train_sae

    s, on_the_fly = run.cfg.sae, bool(run.cfg.activations.sae_on_the_fly)
    sae_cfg = SAEConfig(d_in=val.dim, d_sae=int(s.d_sae),
                        l1_coeff=float(per_cycle(s.l1_coeff, run.cycle, "sae.l1_coeff")),
                        l1_form=s.l1_form, decoder_norm=s.decoder_norm)
    set_seed(run.seed)
    sae = SparseAutoencoder(sae_cfg)
    result = train_sae(sae, train, val, epochs=int(per_cycle(s.epochs, run.cycle, "sae.epochs")),
                       batch_size=int(s.batch_size), lr=float(s.lr), seed=run.seed, device=run.device,
                       autocast_dtype=amp_dtype(run.device, s.amp), desc=f"SAE cycle {run.cycle}")
    best = result["history"][result["best_epoch"]]
    run.log(f"SAE: best epoch {result['best_epoch'] + 1}, val loss {best.get('val_loss', float('nan')):.5f}, "
            f"val L0 {best.get('val_l0', float('nan')):.1f}")
    paths = run.paths()
    sae.to("cpu").save(paths.sae, experiment=run.experiment, cycle=run.cycle, seed=run.seed,
                       best_epoch=result["best_epoch"], on_the_fly=on_the_fly)
    write_json(paths.dir / "sae_train.json", {**result, "on_the_fly": on_the_fly,
                                              "train_view": run.cfg.activations.train_view})
    stage.finish(["sae.safetensors", "sae.json", "sae_train.json"])


def load_cycle_sae(run: CycleRun) -> SparseAutoencoder:
    return SparseAutoencoder.load(run.paths().sae, run.device).eval()


# ----------------------------------------------------------------------------- sharpen
def class_means(run: CycleRun, sae: SparseAutoencoder, train: ActivationCache, n_classes: int, batch: int) -> ClassMeans:
    """Per-class mean SAE codes over the train cache, streamed batch by batch."""
    means = ClassMeans(n_classes, sae.cfg.d_sae)
    for b in tqdm(EncodedSource(train, sae, run.device).iter_batches(batch), desc="class means", leave=False,
                  total=-(-len(train) // batch)):
        means.update(b.x, b.labels)
    return means


@torch.no_grad()
def write_cycle_targets(run: CycleRun, train_labels: torch.Tensor, n_classes: int) -> None:
    """The sharpen stage: one target per training example (row i = train example i) under
    ``sharpen.mode`` from this cycle's train activations; the per-class strategies first find each
    class's ``sharpen.top_k`` features by mean code. Nothing is done when the stage has finished."""
    stage = run.begin("sharpen")
    if stage is None:
        return
    sh, train = run.cfg.sharpen, run.open_cache("train", train_labels)
    sae = load_cycle_sae(run)
    require(train.dim == sae.cfg.d_in, f"the train activations have width {train.dim}, the SAE expects {sae.cfg.d_in}")
    batch, top, counts = int(sh.batch_size), None, None
    if sh.mode in NEEDS_CLASS_FEATURES:
        means = class_means(run, sae, train, n_classes, batch)
        top, counts = top_features(means.means(), int(sh.top_k)).to(run.device), means.counts.tolist()
    paths = run.paths()
    write_targets(paths.targets, train.iter_batches(batch), train.labels, sae.cfg.d_in, sh.mode, sae=sae,
                  top_idx=top, k=int(sh.top_k), random_seed=run.seed, device=run.device,
                  dtype=sh.get("dtype", "float32"), total=-(-len(train) // batch), experiment=run.experiment,
                  cycle=run.cycle, seed=run.seed, mode=sh.mode, top_k=int(sh.top_k),
                  view=run.cfg.activations.train_view)
    write_json(paths.dir / "sharpen.json", {"top_features": None if top is None else top.cpu().tolist(),
                                            "class_counts": counts, "top_k": int(sh.top_k), "mode": sh.mode})
    stage.finish(["targets.npy", "targets.json", "sharpen.json"])


# ----------------------------------------------------------------------------- metrics
def write_cycle_metrics(run: CycleRun, stage: Stage, labels: Labels, n_classes: int,
                        head: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Every column of docs/conventions.md on the test split: task accuracy (from adapt), the probe,
    CSI, U, clustering, L0, Table 5's reconstruction CSI, and the SAE-quality columns, for which
    ``head`` (hooked activation -> logits, the rest of the model) runs on the reconstructions."""
    from .sae_training import encode_source
    from .metrics import clustering_metrics, csi, l0, reconstruction_csi, uncertainty_coefficient
    from .probes import torch_probe
    from .results import write_metrics
    from .sae_quality import FEATURE_DENSITY_FILE, sae_quality, write_feature_density

    paths, cfg = run.paths(), run.cfg
    m, p = cfg.metrics, cfg.metrics.probe
    sae = load_cycle_sae(run)
    test = run.open_cache("test", labels("test"))
    dense, y = test.read_all(), test.labels
    codes = encode_source(sae, test, int(m.batch_size), run.device)
    adapt = read_json(paths.adapt)
    # the probe's codes: from the metric caches, or from caches of their own precision (metrics.probe.*_amp)
    probe_train = EncodedSource(run.open_cache("train", labels("train"), probe_cache_name(cfg, "train")), sae, run.device)
    probe_test = ArraySource(codes, y) if probe_cache_name(cfg, "test") == "test" else \
        ArraySource(encode_source(sae, run.open_cache("test", labels("test"), "probe_test"), int(m.batch_size),
                                  run.device), y)
    set_seed(int(p.seed))
    probe = torch_probe(probe_train, probe_test, n_classes, epochs=int(p.epochs), lr=float(p.lr),
                        batch_size=int(p.batch_size), subset_fraction=float(p.subset_fraction),
                        seed=int(p.seed), device=run.device)
    # Table 5's per-class top-k: chosen on these test codes (the authors), or on the training codes
    recon_top = None if m.recon_top_k_from == "test" else top_features(
        class_means(run, sae, run.open_cache("train", labels("train")), n_classes, int(m.batch_size)).means(),
        int(m.recon_top_k))
    metrics = {"acc": adapt["test_acc"], "probe": probe, "csi": csi(dense, y),
               "u": uncertainty_coefficient(codes, y, faithful=True),
               "u_corrected": uncertainty_coefficient(codes, y, faithful=False),
               **clustering_metrics(codes, y, device=run.device),
               "l0": l0(codes, float(m.l0_threshold)),
               **reconstruction_csi(sae, codes, y, int(m.recon_top_k), top=recon_top)}
    quality = sae_quality(sae, dense, head=head, labels=y, batch_size=int(m.batch_size), return_density=True)
    write_feature_density(paths.dir, quality.pop("feature_density"), len(y))
    metrics.update(quality)
    sae_meta = read_json(paths.dir / "sae_train.json")
    extra = {"val_acc": adapt["val_acc"], "aux_lambda": adapt["aux_lambda"], "sae_l1_coeff": sae.cfg.l1_coeff,
             "sae_best_epoch": sae_meta["best_epoch"], "dead_features": int((codes > 0).sum(0).eq(0).sum()),
             "sparsity_pct": float(100.0 * (codes == 0).double().mean()), "n_test": int(len(y)),
             "preset": cfg.get("preset", "")}
    write_metrics(paths.metrics, experiment=run.experiment, seed=run.seed, cycle=run.cycle, metrics=metrics, **extra)
    stage.finish(["metrics.json", FEATURE_DENSITY_FILE])
    run.log("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None))
