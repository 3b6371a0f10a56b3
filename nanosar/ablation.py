"""
The routing ablation (the paper's Sec. 4.4) under the paper's protocol, at laptop scale, in one command:

    python -m nanosar.ablation --out runs/ablation                 # full: 8 rows x 5 seeds, 107 min on 2 cores
    python -m nanosar.ablation --out runs/ablation_quick --quick   # 8 rows x 1 seed, 10 min (a smoke test)
    python -m nanosar.ablation --variant gpu --device cuda         # small preset, 256 px tiles: one H200
    python -m nanosar.ablation --separability                      # can the descriptors tell the domains apart?
    python -m nanosar.ablation --descriptor-table                  # ENL against looks; descriptors per domain
    python -m nanosar.ablation --curve 400,800,1600                # dense row: mIoU against pre-training steps

Per seed (the seed sets initialisation and data order):
  0. stage 0: a dense tiny ViT pre-trained on the simulated corpus (prepare.py corpus: every sensor,
     polarization, representation and region, each tile its own scene), the stand-in for DINOv2;
then per row (ROWS):
  1. cpt: the row's model starts from stage 0 (MoE rows: upcycled, each expert a copy of the block's FFN,
     the router fresh; the dense row: stage 0 itself) and continues pre-training for the same steps and
     tiles (equal compute: every row has the same active parameters per token);
  2. dg: the backbone is frozen, its features computed once for the 13 domains of the synthetic suite, a
     fresh head trained on each of the 12 sources of the 22 sub-benchmarks and scored (mIoU) on its targets;
  3. routing: on held-out corpus tiles, the normalised mutual information (NMI) between each block's chosen
     expert and each domain factor, beside its chance level, and each factor value's share per expert.
The rows: the oracle router (the true domain factors instead of the descriptors: the positive control,
which shows what the testbed can see), the dense ViT, MoE with a token-only router without auxiliary loss
and with the balance loss, the physics router with the paper's descriptors and with the documented
"physical" variant (README), and the paper's model under the two other gate modes. The MoE rows use gate
HEADLINE_GATE = "straight_through", chosen before any run: with top-1, "renorm" gates are exactly 1, so the
task loss never reaches the router and whatever the descriptors hold, the router follows only the balance
loss; "softmax" scales each expert's output by its probability (~1/6 at the start), so the upcycled model
no longer starts as stage 0; "straight_through" keeps renorm's forward values (upcycled = stage 0, tested)
and sends the task's gradient to the router through the chosen probability.
Then results.md: the table (mean ± std over seeds), each comparison as the mean over seeds of the per-seed
difference with a 95 % t interval over seeds (the seed is the unit of replication), NMI against chance, the
FFN branch's share of the residual, the descriptors' separability. Finished runs are skipped, an
interrupted pre-training resumes exactly from its checkpoint. Nothing is tuned on a target.

Mixed units. The corpus mixes dB, linear amplitude and the real and imaginary parts of the SLC. Each tile
is normalised with the corpus statistics of its own unit (unit_statistics, from pre-training tiles) and its
descriptors are computed in its own unit (model_inputs); the unit is product metadata, known at test time.

Sections: 1. inputs (mixed units, the oracle's factors, descriptor statistics) and the frozen backbone's
features; 2. the protocol (stage 0, upcycling, pre-training, heads, scores, routing, FFN share);
3. separability of the descriptors, and their table per sensor and domain; 4. the runner and its report.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from nanosar import sim
from nanosar.checkpoint import load_checkpoint, save_checkpoint
from nanosar.data import CLASSES_7, Split, augment, check_suite_complete, stream_indices
from nanosar.dinov2 import upcycle_from_dinov2
from nanosar.files import RunLock, RunLockedError, remove_stale_temporaries, write_text_atomic
from nanosar.metrics import evaluate
from nanosar.model import (FPNHead, SARConfig, Segmenter, check_input, router_features, sar_descriptors, sar_intensity,
                           weight_decay_groups)
from nanosar.stats import (chance_nmi, format_mean_std, normalized_mutual_information, paired_bootstrap_ci,
                           separability, share_of_tokens, t_interval)

# -----------------------------------------------------------------------------
# 1. Inputs: mixed units, the oracle's factors, descriptor statistics; the frozen backbone's features

FACTORS = ("sensor", "band", "polarization", "representation", "region")   # what a domain gap can change
# The oracle router's input: one-hot of each factor over these values, concatenated (22 numbers per tile).
ORACLE_VALUES = {"sensor": tuple(sim.SENSORS), "band": ("L", "C", "X"), "polarization": ("HH", "HV", "VH", "VV"),
                 "representation": sim.CORPUS_REPRESENTATIONS, "region": sim.CORPUS_REGIONS}
ORACLE_DIM = sum(len(values) for values in ORACLE_VALUES.values())


def unit_statistics(images, units):
    """Mean and std of the pixels of each unit. images: (N, C, H, W), units: N unit names -> {unit: (mean,
    std)} (floats, in that unit: dB, linear amplitude, ...), the normalisation model_inputs applies."""
    units = np.asarray(units)
    stats = {}
    for unit in sorted(set(units.tolist())):
        pixels = images[torch.from_numpy(np.flatnonzero(units == unit))].double()
        stats[unit] = (float(pixels.mean()), float(max(pixels.std(correction=0).item(), 1e-6)))
    return stats


def oracle_input(factors):
    """The oracle router's input: factors {factor: n values} (each of ORACLE_VALUES) -> (n, ORACLE_DIM)
    float32, per tile the concatenated one-hot codes of its sensor, band, polarization, representation and
    region, in ORACLE_VALUES order. It carries the tile's domain and nothing else."""
    parts = []
    for factor, values in ORACLE_VALUES.items():
        column = np.asarray(factors[factor])
        unknown = sorted(set(column.tolist()) - set(values))
        if unknown:
            raise ValueError(f"oracle: {factor} values {unknown} are not among {list(values)}")
        parts.append(column[:, None] == np.asarray(values)[None])                     # (n, V) bool
    return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))


def model_inputs(segmenter, x, units=None, unit_stats=None, factors=None):
    """What Segmenter.forward feeds its backbone: normalised pixels (B, C, H, W), raw descriptors (B, 3) and
    the router input of a "given"-descriptor model (the oracle's, from factors {factor: B values}; else None).

    units None: the model's own contract (cfg.input_unit, pixel_mean, pixel_std): exactly Segmenter.forward.
    Else units: B unit names, one per tile, and unit_stats {unit: (mean, std)}: each tile is normalised with
    its unit's statistics and its descriptors computed in its unit (a batch mixing dB, amplitude and SLC
    parts). segmenter.forward_prepared(*model_inputs(...)) is then the forward pass.
    """
    cfg = segmenter.cfg
    check_input(x, cfg)
    router_input = None
    if cfg.descriptors == "given" and cfg.descriptor_dim:
        if factors is None:
            raise ValueError("the oracle router needs each tile's domain factors")
        router_input = oracle_input(factors).to(x.device)
    if units is None:
        return (x - segmenter.pixel_mean) / segmenter.pixel_std, sar_descriptors(x, cfg), router_input
    if len(units) != len(x):
        raise ValueError(f"{len(units)} units for {len(x)} tiles")
    x_norm, s_raw = torch.empty_like(x), x.new_empty(len(x), 3)
    units = np.asarray(units)
    for unit in sorted(set(units.tolist())):
        if unit not in unit_stats:
            raise ValueError(f"no normalisation statistics for unit {unit!r} (known: {sorted(unit_stats)})")
        rows = torch.from_numpy(np.flatnonzero(units == unit)).to(x.device)
        mean, std = unit_stats[unit]
        x_norm[rows] = (x[rows] - mean) / std
        s_raw[rows] = sar_descriptors(x[rows], dataclasses.replace(cfg, input_unit=unit))
    return x_norm, s_raw, router_input


def tile_descriptors(cfg, tiles, batch=256):
    """Raw descriptors (N, 3) of Tiles, each tile in its unit, as cfg.descriptors defines them."""
    out = []
    for i in range(0, len(tiles.images), batch):
        x, units = tiles.images[i : i + batch], np.asarray(tiles.units[i : i + batch])
        s = x.new_empty(len(x), 3)
        for unit in sorted(set(units.tolist())):
            rows = torch.from_numpy(np.flatnonzero(units == unit))
            s[rows] = sar_descriptors(x[rows], dataclasses.replace(cfg, input_unit=unit))
        out.append(s)
    return torch.cat(out)


def descriptor_statistics(cfg, tiles):
    """Mean and std of the router's descriptor inputs (router_features, before standardisation) over Tiles
    (the pre-training tiles): -> (mean (3,), std (3,)) tuples for SARConfig.descriptor_mean / descriptor_std."""
    raw_cfg = dataclasses.replace(cfg, descriptor_mean=(), descriptor_std=())
    features = router_features(tile_descriptors(raw_cfg, tiles), raw_cfg).double()        # (N, 3)
    return tuple(features.mean(0).tolist()), tuple(features.std(0).clamp_min(1e-6).tolist())


def backbone_pass(segmenter, images, units=None, unit_stats=None, batch=64, factors=None):
    """The frozen backbone over N tiles, in eval mode without gradient (the module's mode is restored).
    images: (N, C, H, W), factors: {factor: N values} for the oracle -> features (N, 4, D, H/p, W/p) float32 on
    the CPU (the maps of cfg.feature_layers in order) and expert ids (L, N, T) int64 of the top-1 expert per
    token and MoE block ((0, N, T) when dense)."""
    cfg, device = segmenter.cfg, segmenter.pixel_mean.device
    images = torch.as_tensor(images)
    h, w = images.shape[-2] // cfg.patch_size, images.shape[-1] // cfg.patch_size
    T = 1 + cfg.num_register_tokens + h * w
    features, experts = [], []
    was_training = segmenter.training
    segmenter.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = images[i : i + batch].to(device)                                   # (b, C, H, W)
                part = None if factors is None else {f: v[i : i + batch] for f, v in factors.items()}
                x_norm, s_raw, given = model_inputs(segmenter, x, None if units is None else units[i : i + batch],
                                                    unit_stats, part)
                s = given if given is not None else router_features(s_raw, cfg) if cfg.descriptor_dim else None
                maps, routings = segmenter.backbone(x_norm, s)
                features.append(torch.stack(maps, dim=1).float().cpu())                # (b, 4, D, h, w)
                experts.append(torch.stack([r.expert_idx[:, 0].view(len(x), T) for r in routings]).cpu()
                               if routings else torch.zeros(0, len(x), T, dtype=torch.long))  # (L, b, T)
    finally:
        segmenter.train(was_training)
    if not features:                                                                    # N = 0 tiles
        return torch.zeros(0, 4, cfg.embed_dim, h, w), torch.zeros(0, 0, T, dtype=torch.long)
    return torch.cat(features), torch.cat(experts, dim=1)


def cached_features(segmenter, images, batch=16, units=None, unit_stats=None, factors=None):
    """The backbone's 4 feature maps for every tile, as Segmenter.forward computes them (or, with units and
    unit_stats, as model_inputs prepares mixed units), without gradient and in eval mode.
    images: (N, C, H, W) -> (N, 4, D, H/p, W/p) float32 on the CPU; batch tiles a pass."""
    return backbone_pass(segmenter, images, units, unit_stats, batch, factors)[0]


def head_logits_from_cache(head, features, patch_size):
    """Segmenter.forward's logits from cached backbone features: features (B, 4, D, h, w) -> logits
    (B, K, h*p, w*p), the head's (an FPNHead's) output bilinearly upsampled to the input size (p =
    patch_size). Gradients flow into the head only, which is what the DG protocol trains."""
    logits = head(list(features.unbind(dim=1)))                                 # (B, K, 4h, 4w)
    return F.interpolate(logits, size=(features.shape[-2] * patch_size, features.shape[-1] * patch_size),
                         mode="bilinear")


# -----------------------------------------------------------------------------
# 2. The protocol: stage 0, upcycling, pre-training on the corpus, heads on frozen features, routing

HEADLINE_GATE = "straight_through"                          # why: the module docstring
MOE = dict(gate=HEADLINE_GATE, router_z_loss_weight=0.0)   # the paper has no z-loss: no row has one
# SARConfig overrides of the preset per row, in the table's order (the positive control first). "dense" has
# one plain FFN per block of the experts' size, so every row has the same active parameters per token.
ROWS = {
    "oracle": dict(MOE, descriptors="given", descriptor_dim=ORACLE_DIM),
    "dense": dict(n_experts=1),
    "moe_token": dict(MOE, descriptor_dim=0, balance_loss_weight=0.0),
    "moe_token_balance": dict(MOE, descriptor_dim=0),
    "full": dict(MOE, descriptors="paper"),
    "physical": dict(MOE, descriptors="physical"),
    "full_renorm": dict(MOE, descriptors="paper", gate="renorm"),
    "full_softmax": dict(MOE, descriptors="paper", gate="softmax"),
}
ROW_TITLES = {
    "oracle": "oracle router (true domain factors) + balance",
    "dense": "dense ViT, same active size",
    "moe_token": "MoE, token-only router, no auxiliary loss",
    "moe_token_balance": "MoE, token-only router + balance",
    "full": "MoE, physics router (paper's descriptors) + balance",
    "physical": "MoE, physics router (physical variant) + balance",
    "full_renorm": "paper's descriptors + balance, gate renorm",
    "full_softmax": "paper's descriptors + balance, gate softmax",
}
# (row, minus row, what the difference measures), each reported with a t interval over seeds.
COMPARISONS = [
    ("oracle", "moe_token_balance", "positive control: can the testbed see routing by domain?"),
    ("moe_token_balance", "dense", "MoE + balance over dense (paper: +2.8)"),
    ("moe_token_balance", "moe_token", "the balance loss"),
    ("full", "moe_token_balance", "the paper's descriptors on top (paper: +0.2)"),
    ("physical", "moe_token_balance", "the physical descriptors on top"),
    ("full", "dense", "the paper's full model over dense"),
]
# Everything a run depends on. The data sizes are shared, so the CPU variants read one prepared data folder.
DATA = dict(tile=64, corpus_tiles={"cpt": 48, "heldout": 4}, suite_tiles={"train": 128, "test": 64}, data_seed=0)
# The step counts and learning rates are fixed, never chosen on a target. The heads' were compared on held-out
# source-training tiles of one dense backbone (five settings, 37.7-38.5 % validation mIoU) and then sized to
# the budget; the LayerScale start by the FFN share it gives (README, "The routing ablation").
VARIANTS = {
    "full": dict(DATA, seeds=[0, 1, 2, 3, 4], preset="tiny", layerscale_init=1.0, amp=False,
                 stage0_steps=1600, stage0_lr=2e-3, cpt_steps=300, cpt_lr=1e-3, cpt_batch=32, warmup=20,
                 head_steps=200, head_batch=8, head_lr=3e-3),
    "quick": dict(DATA, seeds=[0], preset="tiny", layerscale_init=1.0, amp=False,
                  stage0_steps=400, stage0_lr=2e-3, cpt_steps=100, cpt_lr=1e-3, cpt_batch=32, warmup=20,
                  head_steps=100, head_batch=8, head_lr=3e-3),
    # One H200, estimated at about an hour (not yet measured: no GPU was lent to the session that wrote it):
    # the small preset (22M active parameters) on 256 px tiles, bf16 autocast.
    "gpu": dict(DATA, tile=256, corpus_tiles={"cpt": 16, "heldout": 2}, seeds=[0, 1, 2, 3, 4], preset="small",
                layerscale_init=1.0, amp=True, stage0_steps=2000, stage0_lr=1e-3, cpt_steps=400, cpt_lr=5e-4,
                cpt_batch=64, warmup=100, head_steps=250, head_batch=16, head_lr=3e-3),
}
CKPT_EVERY = 100   # pre-training steps between checkpoints (a killed run loses at most this many)
MICRO_DATA = dict(tile=32, corpus_tiles={"cpt": 1, "heldout": 1}, suite_tiles={"train": 4, "test": 2}, data_seed=0)


def dry_run_settings(variant):
    """A variant shrunk so that every stage runs in seconds (--dry-run, and the tests): its preset, gates and
    precision, on micro data (32 px tiles, one tile per corpus domain), one seed, 2 steps of 2 tiles per stage."""
    settings = variant_settings(variant)
    return dict(settings, **MICRO_DATA, seeds=settings["seeds"][:1], stage0_steps=2, cpt_steps=2, cpt_batch=2,
                warmup=1, head_steps=2, head_batch=2)


@dataclasses.dataclass
class Tiles:
    """Tiles of several prepared domains in memory: images (N, C, H, W) float32 each in its unit, labels
    (N, H, W) int64, and per tile its domain, unit and domain factors (lists of N)."""

    images: torch.Tensor
    labels: torch.Tensor
    domain: list
    units: list
    factors: dict

    def rows(self, idx):
        """The factors of tiles idx (a list of indices): {factor: [values]}."""
        return {f: [values[i] for i in idx] for f, values in self.factors.items()}


def load_tiles(root, domains, split):
    """The `split` tiles of the prepared domains `domains` (dicts with "name", "unit" and the FACTORS) in
    the data folder `root` -> Tiles."""
    images, labels, names, units, factors = [], [], [], [], {f: [] for f in FACTORS}
    for d in domains:
        sp = Split(os.path.join(root, d["name"], split))
        if sp.unit != d["unit"]:
            raise ValueError(f"{sp.path}: unit {sp.unit!r}, but its index says {d['unit']!r}")
        images.append(torch.from_numpy(np.asarray(sp.images, np.float32)))
        labels.append(torch.from_numpy(np.asarray(sp.labels, np.int64)))
        n = len(sp)
        names += [d["name"]] * n
        units += [d["unit"]] * n
        for f in FACTORS:
            factors[f] += [d[f]] * n
    return Tiles(torch.cat(images), torch.cat(labels), names, units, factors)


@dataclasses.dataclass
class AblationData:
    """Everything the runs read, loaded once: the corpus's pre-training and held-out tiles, the
    normalisation statistics per unit (from the pre-training tiles), the suite's benchmarks (dicts with
    code, source, target, group) and its tiles per split ("train", "test")."""

    corpus: Tiles
    heldout: Tiles
    unit_stats: dict
    benchmarks: list
    suite: dict


def sensor_code(name):
    """A sensor's code in sim.SENSORS ("G3") from its code or its full name in meta.json ("GF-3 QPSI")."""
    for code, sensor in sim.SENSORS.items():
        if name in (code, sensor.name):
            return code
    raise ValueError(f"unknown sensor {name!r}: not one of nanosar.sim.SENSORS")


def load_data(data_root):
    """AblationData from <data_root>/corpus (prepare.py corpus) and <data_root>/suite (prepare.py synthetic);
    each must be complete (check_suite_complete)."""
    corpus_root, suite_root = os.path.join(data_root, "corpus"), os.path.join(data_root, "suite")
    corpus_domains = check_suite_complete(corpus_root, "corpus.json")["domains"]
    suite = check_suite_complete(suite_root)
    suite_domains = []
    for name in suite["domains"]:
        meta = Split(os.path.join(suite_root, name, "train")).meta
        suite_domains.append({"name": name, "unit": meta["unit"], **{f: meta[f] for f in FACTORS},
                              "sensor": sensor_code(meta["sensor"])})      # the corpus's vocabulary
    corpus = load_tiles(corpus_root, corpus_domains, "cpt")
    return AblationData(corpus, load_tiles(corpus_root, corpus_domains, "heldout"),
                        unit_statistics(corpus.images, corpus.units), suite["benchmarks"],
                        {split: load_tiles(suite_root, suite_domains, split) for split in ("train", "test")})


def row_config(row, settings, descriptor_stats=None):
    """The SARConfig of an ablation row: the preset, the LayerScale start, the row's overrides, 1 channel, the
    7 classes; descriptor_stats {kind: (mean, std)} standardise the router's descriptor inputs. The
    input_unit is nominal: every pass goes through model_inputs with each tile's own unit."""
    cfg = SARConfig.preset(settings["preset"], img_size=settings["tile"], in_chans=1, input_unit="db",
                           num_classes=len(CLASSES_7), class_names=tuple(CLASSES_7),
                           layerscale_init=settings["layerscale_init"], **ROWS[row])
    if cfg.n_experts > 1 and cfg.descriptor_dim and cfg.descriptors != "given" and descriptor_stats:
        mean, std = descriptor_stats[cfg.descriptors]
        cfg = dataclasses.replace(cfg, descriptor_mean=mean, descriptor_std=std)
    return cfg


def learning_rate(step, steps, peak, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to peak / 100."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak / 100 + (peak - peak / 100) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(module, lr):
    """AdamW with train.py's weight decay (0.05, on matrices and kernels only: model.weight_decay_groups)."""
    return torch.optim.AdamW(weight_decay_groups(module, 0.05), lr=lr)


def autocast(settings, device):
    """bf16 autocast when settings["amp"] (the GPU variant), else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(settings.get("amp")))


def pretrain(model, tiles, unit_stats, settings, steps, peak_lr, position, seed, path, log=print, device="cpu"):
    """Pre-train backbone + head of `model` on Tiles (the corpus) for `steps` steps of settings["cpt_batch"]
    tiles, every tile in its own unit; batch i holds the tiles at stream positions position + i * batch of
    the seed's stream (stage 0 starts at 0, every row continues where stage 0 stopped). Saves the training
    state to `path` every CKPT_EVERY steps and at the end (atomically), and resumes from it.
    -> the model (eval mode, on `device`)."""
    model.to(device)
    optimizer = adamw(model, peak_lr)
    B, start = settings["cpt_batch"], 0
    if os.path.isfile(path):
        state = load_checkpoint(path)
        model.load_state_dict(state["model"])
        start = state["step"]
        if start >= steps:                                         # finished: the optimizer is not needed
            return model.eval()
        optimizer.load_state_dict(state["optimizer"])
        log(f"  resuming {path} at step {start}/{steps}")
    model.train()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, settings["warmup"])
        at = position + step * B
        idx = stream_indices(len(tiles.images), seed, at, B)
        x, y = augment(tiles.images[idx], tiles.labels[idx], seed, at)
        with autocast(settings, device):
            out = model.forward_prepared(*model_inputs(model, x.to(device), [tiles.units[i] for i in idx],
                                                       unit_stats, tiles.rows(idx)))
            loss = F.cross_entropy(out.logits.float(), y.to(device), ignore_index=255) + out.aux_loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"{path}: the pre-training loss became {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % CKPT_EVERY == 0 or step + 1 == steps:
            save_checkpoint(path, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.cfg),
                                   "optimizer": optimizer.state_dict(), "step": step + 1})
    return model.eval()


def stage0(seed, data, settings, path, log=print, device="cpu"):
    """Stage 0: the dense ViT pre-trained from scratch on the corpus (stage0_steps), the stand-in for DINOv2
    that every row of this seed starts from. -> Segmenter (eval mode)."""
    torch.manual_seed(seed)
    model = Segmenter(row_config("dense", settings))
    return pretrain(model, data.corpus, data.unit_stats, settings, settings["stage0_steps"], settings["stage0_lr"],
                    0, seed, path, log, device)


def start_from_stage0(row, seed, dense, settings, descriptor_stats=None):
    """The row's model at the start of its pre-training: the dense row is a copy of stage 0; an MoE row is
    stage 0 upcycled (dinov2.upcycle_from_dinov2: every expert a copy of its block's FFN, everything else
    copied, the router fresh from the seed) with stage 0's head. -> Segmenter on the CPU."""
    cfg = row_config(row, settings, descriptor_stats)
    torch.manual_seed(zlib.crc32(f"{seed}:{row}".encode()))       # the router's initialisation
    model = Segmenter(cfg)
    state = {k: v.cpu() for k, v in dense.state_dict().items()}
    if cfg.n_experts == 1:
        model.load_state_dict(state)
        return model
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    report = upcycle_from_dinov2(model, backbone)
    if report.missing or report.unexpected or report.adapted:
        raise RuntimeError(f"upcycling stage 0 into {row}: {report}")
    model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
    return model


def train_head(features, labels, cfg, settings, seed, name, device="cpu"):
    """Phase dg: a fresh FPN head trained on cached frozen-backbone features (N, 4, D, h, w) and labels
    (N, H, W) of one source; no augmentation (the features are fixed), no selection (last step kept)."""
    torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    head = FPNHead(cfg.embed_dim, cfg.head_dim, cfg.num_classes).to(device)
    optimizer = adamw(head, settings["head_lr"])
    steps, B = settings["head_steps"], settings["head_batch"]
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, settings["head_lr"], min(10, steps // 10))
        idx = stream_indices(len(features), zlib.crc32(f"{seed}:{name}".encode()), step * B, B)
        with autocast(settings, device):
            logits = head_logits_from_cache(head, features[idx].to(device), cfg.patch_size)
            loss = F.cross_entropy(logits.float(), labels[idx].to(device), ignore_index=255)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return head.eval()


def head_miou(model, head, features, labels, batch=64, device="cpu"):
    """mIoU (%) of `head` on cached features (N, 4, D, h, w) of `model`'s backbone against labels (N, H, W),
    through metrics.evaluate, the evaluation loop of train.py and eval.py."""
    batches = ((features[i : i + batch], labels[i : i + batch]) for i in range(0, len(features), batch))
    logits_of = lambda f: head_logits_from_cache(head, f.float(), model.cfg.patch_size)  # noqa: E731
    return 100.0 * evaluate(model, batches, device, logits_of=logits_of)["miou"]


def dg_scores(model, data, settings, seed, device="cpu"):
    """Phase dg for one pre-trained backbone: features of the suite's domains computed once, one head per
    source, scored on the source's own test tiles and on every target of its benchmarks.
    -> {"benchmarks": {code: target mIoU %}, "in_domain": {source: source test mIoU %}}."""
    cache = {}
    for split, tiles in data.suite.items():
        features = cached_features(model, tiles.images, 64, tiles.units, data.unit_stats, tiles.factors)
        for name in sorted(set(tiles.domain)):
            rows = [i for i, d in enumerate(tiles.domain) if d == name]
            cache[name, split] = features[rows], tiles.labels[rows]
    scores, in_domain = {}, {}
    for source in sorted({b["source"] for b in data.benchmarks}):
        head = train_head(*cache[source, "train"], model.cfg, settings, seed, source, device)
        in_domain[source] = head_miou(model, head, *cache[source, "test"], device=device)
        for b in data.benchmarks:
            if b["source"] == source:
                scores[b["code"]] = head_miou(model, head, *cache[b["target"], "test"], device=device)
    return {"benchmarks": scores, "in_domain": in_domain}


def ffn_share(model, tiles, unit_stats, n=256):
    """How much the FFN (or MoE) branch writes into the residual stream: per block, ||ls2(FFN(norm2(x)))||
    / ||x|| (Frobenius norms over every token of n tiles spread evenly over Tiles, x the residual stream
    entering the FFN sub-layer), in eval mode. -> list of L floats (~0: the FFN barely changes the features)."""
    sums = [[0.0, 0.0] for _ in model.backbone.blocks]
    hooks = []
    for i, block in enumerate(model.backbone.blocks):
        hooks.append(block.norm2.register_forward_hook(
            lambda m, inp, out, i=i: sums[i].__setitem__(0, sums[i][0] + inp[0].float().pow(2).sum().item())))
        hooks.append(block.ls2.register_forward_hook(
            lambda m, inp, out, i=i: sums[i].__setitem__(1, sums[i][1] + out.float().pow(2).sum().item())))
    idx = np.unique(np.linspace(0, len(tiles.units) - 1, min(n, len(tiles.units))).astype(int)).tolist()
    try:
        backbone_pass(model, tiles.images[idx], [tiles.units[i] for i in idx], unit_stats, factors=tiles.rows(idx))
    finally:
        for hook in hooks:
            hook.remove()
    return [math.sqrt(branch / max(stream, 1e-30)) for stream, branch in sums]


def patch_classes(labels, patch_size):
    """Majority land-cover class of each patch: labels (N, H, W) -> (N, h*w) int64 (ignored pixels vote for
    no class; a patch of ignored pixels only gets class 0)."""
    one_hot = F.one_hot(labels.clamp_max(len(CLASSES_7)), len(CLASSES_7) + 1)[..., :-1]    # (N, H, W, K)
    counts = F.avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), patch_size)                # (N, K, h, w)
    return counts.argmax(dim=1).flatten(1)


def routing_report(model, experts, heldout):
    """Does routing follow physics? From the top-1 expert ids (L, N, T) of backbone_pass over the held-out
    corpus tiles `heldout` (Tiles), per MoE block: the NMI between the chosen expert of each patch token and
    each domain factor of its tile (and the land-cover class of the patch, for comparison), the chance NMI
    (stats.chance_nmi: experts shuffled within each patch class), and each factor value's share per expert.
    -> {"nmi": {factor: [per block]}, "chance": {factor: [per block]}, "share": {factor: [per block
    {"values": [...], "table": (V, E)}]}} (empty dicts for a dense model)."""
    if experts.shape[0] == 0:
        return {"nmi": {}, "chance": {}, "share": {}}
    prefix = 1 + model.cfg.num_register_tokens
    experts = experts[:, :, prefix:]                                                      # (L, N, h*w)
    per_token = {f: np.repeat(np.asarray(heldout.factors[f]), experts.shape[2]) for f in FACTORS}
    per_token["class"] = patch_classes(heldout.labels, model.cfg.patch_size).reshape(-1).numpy()
    nmi, chance, share = {f: [] for f in per_token}, {f: [] for f in FACTORS}, {f: [] for f in FACTORS}
    for block in experts:
        chosen = block.reshape(-1).numpy()
        for f, values in per_token.items():
            nmi[f].append(normalized_mutual_information(chosen, values))
        for f in FACTORS:
            chance[f].append(chance_nmi(chosen, per_token[f], per_token["class"]))
            table, names = share_of_tokens(chosen, per_token[f], model.cfg.n_experts)
            share[f].append({"values": names, "table": np.round(table, 4).tolist()})
    return {"nmi": nmi, "chance": chance, "share": share}


# -----------------------------------------------------------------------------
# 3. Separability: can a plain classifier tell each domain factor from the descriptors? And the descriptors
#    per sensor and domain of the synthetic suite (descriptor_table; here, not in sim: it needs the model)


def log_intensity_moments(tiles):
    """Per tile, the mean and std of ln(intensity) (model.sar_intensity in its unit; 0 pixels left out):
    brightness and contrast, the plain baseline the descriptors are measured against. -> (N, 2)."""
    out = torch.zeros(len(tiles.images), 2, dtype=torch.float64)
    units = np.asarray(tiles.units)
    for unit in sorted(set(units.tolist())):
        rows = torch.from_numpy(np.flatnonzero(units == unit))
        intensity = sar_intensity(tiles.images[rows].double(), unit).flatten(1)        # (n, H*W)
        valid = intensity > 0
        logs = torch.where(valid, intensity.clamp_min(1e-300).log(), 0.0)
        n = valid.sum(1).clamp_min(1)
        mean = logs.sum(1) / n
        out[rows] = torch.stack([mean, (((logs - mean[:, None]) ** 2 * valid).sum(1) / n).sqrt()], dim=1)
    return out


def descriptor_separability(data, settings):
    """Held-out accuracy of a logistic regression of each domain factor from per-tile features: fit on the
    corpus's pre-training tiles, tested on its held-out tiles (other scenes), for (a) the paper's
    descriptors and (b) the physical variant, both as the router sees them, (c) the mean and std of ln
    intensity, beside (d) the majority rate. -> {factor: {"paper", "physical", "log_moments", "majority"}}."""
    cfg = row_config("full", settings)
    features = {}
    for kind in ("paper", "physical"):
        kind_cfg = dataclasses.replace(cfg, descriptors=kind)
        features[kind] = [router_features(tile_descriptors(kind_cfg, t), kind_cfg).numpy()
                          for t in (data.corpus, data.heldout)]
    features["log_moments"] = [log_intensity_moments(t).numpy() for t in (data.corpus, data.heldout)]
    table = {}
    for f in FACTORS:
        fit, test = data.corpus.factors[f], data.heldout.factors[f]
        table[f] = {kind: separability(a, fit, b, test)[0] for kind, (a, b) in features.items()}
        table[f]["majority"] = separability(features["paper"][0], fit, features["paper"][1], test)[1]
    return table


def format_separability(table, data):
    """The separability table as markdown."""
    lines = [f"Held-out accuracy of a logistic regression of each factor (fit: {len(data.corpus.units)} corpus "
             f"pre-training tiles; test: {len(data.heldout.units)} held-out tiles, other scenes):", "",
             "| factor | paper's descriptors | physical variant | mean, std of ln intensity | majority |",
             "|---|---|---|---|---|"]
    for f, row in table.items():
        lines.append(f"| {f} | {row['paper']:.2f} | {row['physical']:.2f} | {row['log_moments']:.2f} | "
                     f"{row['majority']:.2f} |")
    return "\n".join(lines)


def domain_descriptors(domain, n_tiles=32, size=128, seed=0, roughness_block=16, split="test"):
    """(n_tiles, 3) directional entropy (nats), ENL, local roughness of a sim domain's first n_tiles tiles of
    `split`, as model.sar_descriptors computes them (the paper's: on X' = log(1 + |x|) of the magnitude of
    the tile in the domain's own unit; roughness over roughness_block x roughness_block blocks)."""
    images = np.stack([sim.simulate_tile(domain, split, i, size, seed)[0] for i in range(n_tiles)])  # (N, C, H, W)
    cfg = SARConfig(img_size=size, in_chans=images.shape[1], input_unit=domain.representation,
                    roughness_block=roughness_block)
    return sar_descriptors(torch.from_numpy(images), cfg).numpy().astype(np.float64)


def descriptor_table(n_tiles=32, size=128, seed=0, roughness_block=16):
    """The simulator's descriptors against the physics, as markdown (python -m nanosar.ablation
    --descriptor-table): (1) per sensor preset, the ENL of a homogeneous area in linear intensity against
    the looks (sim.homogeneous_enl); (2) per domain of the suite (and the extra domains), mean and 5-95 %
    range of the three descriptors over n_tiles test tiles of size x size (domain_descriptors)."""
    lines = ["| sensor | looks | ENL, homogeneous 256x256 'other' at 35 deg, linear intensity | expected |",
             "|---|---|---|---|"]
    for code, sensor in sim.SENSORS.items():
        enl, expected = sim.homogeneous_enl(code)
        note = " (noise-removed)" if sensor.noise_removed else ""
        lines.append(f"| {code} ({sensor.name}) | {sensor.looks:g} | {enl:.2f} | {expected:.2f}{note} |")
    caption = (f"Descriptors on X' = log(1 + |x|), {n_tiles} test tiles of {size}x{size} per domain, roughness "
               f"blocks of {roughness_block}: mean [5 %, 95 %]")
    lines += ["", caption, "", "| domain | sensor | unit | entropy (nats) | ENL | roughness |",
              "|---|---|---|---|---|---|"]
    for domain in sim.suite_domains() + sim.EXTRA_DOMAINS:
        d = domain_descriptors(domain, n_tiles, size, seed, roughness_block)
        cells = [f"{m:.3g} [{lo:.3g}, {hi:.3g}]" for m, lo, hi in
                 zip(d.mean(0), np.percentile(d, 5, axis=0), np.percentile(d, 95, axis=0))]
        lines.append(f"| {domain.name} | {domain.sensor} | {domain.representation} | {' | '.join(cells)} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 4. The runner: data, stage 0 and the runs (skipped when finished), the report


def prepare_data(data_root, settings, log):
    """Prepare the corpus and the suite with prepare.py if they are missing or incomplete (it resumes)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tile = str(settings["tile"])
    jobs = {
        "corpus": ["corpus", "--cpt-tiles", str(settings["corpus_tiles"]["cpt"]),
                   "--heldout-tiles", str(settings["corpus_tiles"]["heldout"])],
        "suite": ["synthetic", "--train-tiles", str(settings["suite_tiles"]["train"]),
                  "--test-tiles", str(settings["suite_tiles"]["test"])],
    }
    sizes = {"corpus": settings["corpus_tiles"], "suite": settings["suite_tiles"]}
    for folder, args in jobs.items():
        out = os.path.join(data_root, folder)
        index = os.path.join(out, "corpus.json" if folder == "corpus" else "suite.json")
        try:
            found = check_suite_complete(out, os.path.basename(index))
        except (OSError, ValueError):
            found = None
        if found is not None:
            if found.get("generator_version") != sim.GENERATOR_VERSION:
                raise ValueError(f"{index} was simulated by nanosar.sim generator version "
                                 f"{found.get('generator_version')}, this code's is {sim.GENERATOR_VERSION}: "
                                 f"use another --data folder (or delete {out} to regenerate it)")
            if (found.get("tile"), found.get("tiles"), found.get("seed")) != (settings["tile"], sizes[folder],
                                                                              settings["data_seed"]):
                raise ValueError(f"{index} was prepared with tile {found.get('tile')}, tiles {found.get('tiles')}, "
                                 f"seed {found.get('seed')}; this variant needs tile {settings['tile']}, tiles "
                                 f"{sizes[folder]}, seed {settings['data_seed']}: use another --data folder")
            continue
        if not os.path.isfile(os.path.join(repo, "prepare.py")):
            raise FileNotFoundError(f"{out} is not prepared and prepare.py is not beside the nanosar package "
                                    f"({repo}): run from a clone (pip install -e .) or prepare it there")
        log(f"preparing {out} (python prepare.py {args[0]})")
        command = [sys.executable, os.path.join(repo, "prepare.py"), *args, "--out", out, "--tile", tile,
                   "--seed", str(settings["data_seed"]), "--workers", str(min(8, max(2, os.cpu_count() or 2)))]
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
            raise RuntimeError(f"preparing {out} failed: {' '.join(command)}")


def check_settings(out, settings):
    """Write <out>/settings.json on the first run; refuse a rerun with other settings (its runs would mix)."""
    path = os.path.join(out, "settings.json")
    wanted = json.loads(json.dumps(settings))
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f)
        if found != wanted:
            differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ValueError(f"{path} holds an ablation with other settings ({', '.join(differ)}); "
                             f"use another --out or the same variant")
    else:
        write_text_atomic(path, json.dumps(wanted, indent=1))


def read_json(path):
    """The JSON in `path`, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_stage0(seed, out, data, settings, log, device="cpu"):
    """Stage 0 of a seed, pre-trained or read back from <out>/runs/stage0/seed<seed>/ (cpt.pt and
    result.json: its FFN share per block and held-out corpus mIoU). -> (Segmenter, result dict)."""
    folder = os.path.join(out, "runs", "stage0", f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    t0 = time.time()
    model = stage0(seed, data, settings, os.path.join(folder, "cpt.pt"), log, device)
    result = read_json(os.path.join(folder, "result.json"))
    if result is None:
        features = cached_features(model, data.heldout.images, 64, data.heldout.units, data.unit_stats)
        result = {"seed": seed, "ffn_share": ffn_share(model, data.heldout, data.unit_stats),
                  "heldout_miou": head_miou(model, model.head, features, data.heldout.labels, device=device),
                  "seconds": round(time.time() - t0, 1)}
        write_text_atomic(os.path.join(folder, "result.json"), json.dumps(result))
        log(f"stage 0 seed {seed}: {result['seconds']:.0f} s, held-out corpus mIoU {result['heldout_miou']:.1f}, "
            f"FFN share per block {' '.join(f'{s:.2f}' for s in result['ffn_share'])}")
    return model, result


def run_one(row, seed, out, data, settings, dense, descriptor_stats, log, device="cpu"):
    """Continue pre-training one row from stage 0, score and report it; writes
    <out>/runs/<row>/seed<seed>/result.json."""
    folder = os.path.join(out, "runs", row, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    t0 = time.time()
    model = start_from_stage0(row, seed, dense, settings, descriptor_stats)
    model = pretrain(model, data.corpus, data.unit_stats, settings, settings["cpt_steps"], settings["cpt_lr"],
                     settings["stage0_steps"] * settings["cpt_batch"], seed, os.path.join(folder, "cpt.pt"), log,
                     device)
    t1 = time.time()
    heldout = data.heldout
    features, experts = backbone_pass(model, heldout.images, heldout.units, data.unit_stats, 64, heldout.factors)
    result = {"row": row, "seed": seed, "settings": settings, "unit_stats": data.unit_stats,
              "model_args": dataclasses.asdict(model.cfg),
              "heldout_miou": head_miou(model, model.head, features, heldout.labels, device=device),
              "ffn_share": ffn_share(model, heldout, data.unit_stats),
              **dg_scores(model, data, settings, seed, device),
              "routing": routing_report(model, experts, heldout)}
    result["seconds"] = {"cpt": round(t1 - t0, 1), "dg_and_routing": round(time.time() - t1, 1)}
    write_text_atomic(os.path.join(folder, "result.json"), json.dumps(result))
    return result


def finished(out, row, seed):
    """The result of a finished (row, seed), or None."""
    return read_json(os.path.join(out, "runs", row, f"seed{seed}", "result.json"))


def variant_settings(variant):
    """A variant's settings: a name of VARIANTS or a dict (tests)."""
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose one of {sorted(VARIANTS)}")
        return dict(VARIANTS[variant])
    return dict(variant)


def run_ablation(out, variant="full", data_root=None, rows=tuple(ROWS), log=print, device="cpu"):
    """The whole ablation into `out`: data (prepared if missing), per seed stage 0 and every row not finished
    yet, and <out>/results.md. data_root (default <out>/data) can be shared between variants of one data
    size. -> results.md's text."""
    settings = variant_settings(variant)
    data_root = data_root or os.path.join(out, "data")
    with RunLock(out):
        check_settings(out, settings)
        prepare_data(data_root, settings, log)
        todo = [(r, s) for s in settings["seeds"] for r in rows if finished(out, r, s) is None]
        done = len(rows) * len(settings["seeds"]) - len(todo)
        log(f"{len(todo)} runs to do, {done} finished earlier (skipped)")
        data = load_data(data_root)
        descriptor_stats = {kind: descriptor_statistics(dataclasses.replace(row_config("full", settings),
                                                                            descriptors=kind), data.corpus)
                            for kind in ("paper", "physical")}
        t0, stage0_results = time.time(), {}
        for i, (row, seed) in enumerate(todo):
            if seed not in stage0_results:
                dense, stage0_results[seed] = run_stage0(seed, out, data, settings, log, device)
            result = run_one(row, seed, out, data, settings, dense, descriptor_stats, log, device)
            left = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
            s = result["seconds"]
            log(f"[{done + i + 1}/{done + len(todo)}] {row} seed {seed}: cpt {s['cpt']:.0f} s, dg + routing "
                f"{s['dg_and_routing']:.0f} s | in-domain {np.mean(list(result['in_domain'].values())):.1f}, "
                f"single-gap {average(result, 'single-gap'):.1f}, multi-gap {average(result, 'multi-gap'):.1f} "
                f"mIoU | ~{left / 60:.0f} min left")
        stage0_results = {s: read_json(os.path.join(out, "runs", "stage0", f"seed{s}", "result.json"))
                          or run_stage0(s, out, data, settings, log, device)[1] for s in settings["seeds"]}
        results = {r: [finished(out, r, s) for s in settings["seeds"]] for r in rows}
        separability_table = descriptor_separability(data, settings)
        report = format_report(results, stage0_results, settings, format_separability(separability_table, data))
        write_text_atomic(os.path.join(out, "results.md"), report)
        plot_routing(results, out, log)
    return report


def benchmark_groups():
    """code -> "single-gap" or "multi-gap", for the 22 sub-benchmarks of the synthetic suite."""
    return {code: "multi-gap" if "+" in gap else "single-gap" for code, gap, _, _ in sim.BENCHMARKS}


def average(result, group=None):
    """Mean target mIoU (%) of one run over the sub-benchmarks of `group` (None: all 22)."""
    groups = benchmark_groups()
    return float(np.mean([v for c, v in result["benchmarks"].items() if group in (None, groups[c])]))


def seed_differences(a, b, group=None):
    """Per seed, the difference of two rows' benchmark averages over `group`: a, b are the rows' result lists
    in the same seed order -> (n_seeds,) mIoU points, the units of replication of t_interval."""
    return [average(ra, group) - average(rb, group) for ra, rb in zip(a, b)]


def paired_differences(a, b, group=None):
    """mIoU(a) - mIoU(b) per (sub-benchmark, seed) pair of two rows' result lists (same seeds); only for the
    secondary, pair-level bootstrap (stats.paired_bootstrap_ci)."""
    groups = benchmark_groups()
    return [ra["benchmarks"][c] - rb["benchmarks"][c] for ra, rb in zip(a, b) for c in sorted(ra["benchmarks"])
            if group in (None, groups[c])]


def format_interval(values):
    """Per-seed differences -> "+0.4 [-0.8, +1.6]" (mean and 95 % t interval over seeds), or "+0.4 (1 seed)"."""
    if len(values) < 2:
        return f"{np.mean(values):+.1f} (1 seed)"
    mean, low, high = t_interval(values)
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def format_report(results, stage0_results, settings, separability_md=""):
    """results.md: the table, the seed-level comparisons, NMI against chance, the FFN share, the
    separability of the descriptors, per-block NMI and token shares, per sub-benchmark scores."""
    seeds, rows = settings["seeds"], list(results)
    lines = [f"# Routing ablation ({len(seeds)} seed(s): {seeds}; {settings['preset']} preset, {settings['tile']} px tiles; "
             f"stage 0 {settings['stage0_steps']} steps, then {settings['cpt_steps']} steps per row, x "
             f"{settings['cpt_batch']} tiles; heads {settings['head_steps']} steps x {settings['head_batch']})", "",
             "mIoU (%) on the targets of the 22 synthetic sub-benchmarks, frozen backbone, mean ± std over seeds; "
             "in-domain: each source's head on its own test tiles; held-out corpus: backbone + pre-training head.",
             "", "| row | single-gap (12) | multi-gap (10) | all 22 | in-domain | held-out corpus |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        rs = results[row]
        cells = [format_mean_std([average(r, g) for r in rs]) for g in ("single-gap", "multi-gap", None)]
        cells.append(format_mean_std([np.mean(list(r["in_domain"].values())) for r in rs]))
        cells.append(format_mean_std([r["heldout_miou"] for r in rs]))
        lines.append(f"| {ROW_TITLES[row]} | {' | '.join(cells)} |")
    comparisons = [c for c in COMPARISONS if c[0] in results and c[1] in results]
    if comparisons:
        lines += ["", "Differences (mIoU points): the mean over seeds of each seed's difference of the benchmark "
                      "averages, with a 95 % t interval over seeds (the seed is the unit of replication). Last "
                      "column, secondary: the pair-level bootstrap over (sub-benchmark, seed) pairs, which "
                      "treats pairs that share backbones and heads as independent (too narrow).", "",
                  "| comparison | what it measures | single-gap | multi-gap | all 22 | in-domain | held-out corpus | "
                  "all 22, pair bootstrap |", "|---|---|---|---|---|---|---|---|"]
        for a, b, what in comparisons:
            cells = [format_interval(seed_differences(results[a], results[b], g)) for g in ("single-gap", "multi-gap", None)]
            cells += [format_interval([np.mean(list(ra["in_domain"].values())) - np.mean(list(rb["in_domain"].values()))
                                       for ra, rb in zip(results[a], results[b])]),
                      format_interval([ra["heldout_miou"] - rb["heldout_miou"] for ra, rb in zip(results[a], results[b])])]
            mean, low, high = paired_bootstrap_ci(paired_differences(results[a], results[b]))
            cells.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]")
            lines.append(f"| {a} - {b} | {what} | {' | '.join(cells)} |")
    shares = [np.asarray(r["ffn_share"]) for r in stage0_results.values()]
    lines += ["", "FFN branch's share of the residual stream, ||ls2 * FFN(norm2(x))|| / ||x|| per block, on "
                  "held-out corpus tiles, mean over seeds:", "", "| model | " +
              " | ".join(f"block {i}" for i in range(len(shares[0]))) + " |", "|---|" + "---|" * len(shares[0]),
              "| stage 0 (dense, before the rows) | " + " | ".join(f"{v:.2f}" for v in np.mean(shares, 0)) + " |"]
    for row in rows:
        share = np.mean([r["ffn_share"] for r in results[row]], axis=0)
        lines.append(f"| {row}, after pre-training | " + " | ".join(f"{v:.2f}" for v in share) + " |")
    moe = [row for row in rows if results[row][0]["routing"]["nmi"]]
    if moe:
        factors = list(results[moe[0]][0]["routing"]["nmi"])
        lines += ["", "NMI between the chosen expert and each factor of the token's tile (class: the patch's "
                      "land-cover class), on the held-out corpus tiles; mean over MoE blocks and seeds, and in "
                      "brackets its chance level: the same NMI with the experts shuffled within each land-cover "
                      "class (what the domains' class mixtures explain):", "",
                  f"| row | {' | '.join(factors)} |", "|---|" + "---|" * len(factors)]
        for row in moe:
            cells = []
            for f in factors:
                value = format_mean_std([np.mean(r["routing"]["nmi"][f]) for r in results[row]], 3)
                chance = results[row][0]["routing"]["chance"].get(f)
                if chance is not None:
                    value += f" ({np.mean([np.mean(r['routing']['chance'][f]) for r in results[row]]):.3f})"
                cells.append(value)
            lines.append(f"| {ROW_TITLES[row]} | {' | '.join(cells)} |")
    if separability_md:
        lines += ["", separability_md]
    if moe:
        lines += ["", f"NMI per block (seed {seeds[0]}):", "",
                  f"| row | block | {' | '.join(factors)} |", "|---|---|" + "---|" * len(factors)]
        for row in moe:
            nmi = results[row][0]["routing"]["nmi"]
            for block in range(len(nmi[factors[0]])):
                lines.append(f"| {row} | {block} | {' | '.join(f'{nmi[f][block]:.3f}' for f in factors)} |")
        lines += ["", f"Share of each factor value's tokens per expert (seed {seeds[0]}; rows sum to 1):"]
        for row in moe:
            share = results[row][0]["routing"]["share"]
            for block in range(len(share[FACTORS[0]])):
                E = len(share[FACTORS[0]][block]["table"][0])
                lines += ["", f"{row}, block {block}:", "", "| factor | value | " +
                          " | ".join(f"e{e}" for e in range(E)) + " |", "|---|---|" + "---|" * E]
                for f in FACTORS:
                    entry = share[f][block]
                    for value, row_shares in zip(entry["values"], entry["table"]):
                        lines.append(f"| {f} | {value} | {' | '.join(f'{v:.2f}' for v in row_shares)} |")
    lines += ["", "Per sub-benchmark (mean over seeds):", "",
              "| code | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for code in results[rows[0]][0]["benchmarks"]:
        lines.append(f"| {code} | " + " | ".join(f"{np.mean([r['benchmarks'][code] for r in results[row]]):.1f}"
                                                 for row in rows) + " |")
    minutes = (sum(sum(r["seconds"].values()) for rs in results.values() for r in rs)
               + sum(r["seconds"] for r in stage0_results.values())) / 60
    lines += ["", f"Compute: {minutes:.1f} min of stage 0, pre-training, heads and routing over all runs."]
    return "\n".join(lines) + "\n"


def plot_routing(results, out, log):
    """routing_<row>.png heat-maps (factor value x expert per block, seed 0) if matplotlib is installed; it
    is an optional extra, never a dependency."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no heat-maps (pip install matplotlib for routing_<row>.png)")
        return
    for row, rs in results.items():
        share = rs[0]["routing"]["share"]
        if not share:
            continue
        blocks = len(share[FACTORS[0]])
        fig, axes = plt.subplots(len(FACTORS), blocks, figsize=(3 * blocks, 2.2 * len(FACTORS)), squeeze=False)
        for i, f in enumerate(FACTORS):
            for b in range(blocks):
                entry, ax = share[f][b], axes[i][b]
                ax.imshow(np.asarray(entry["table"]), vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_yticks(range(len(entry["values"])), entry["values"], fontsize=6)
                ax.set_xticks(range(len(entry["table"][0])))
                ax.set_title(f"{f}, block {b}", fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, f"routing_{row}.png")
        fig.savefig(path + ".tmp.png", dpi=100)
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        log(f"wrote {path}")


def run_curve(out, steps_list, variant="full", data_root=None, log=print, device="cpu"):
    """The dense row's signal against pre-training: for each total of stage-0 steps (a run of its own, with
    its own schedule; seed of the variant's first seed), in-domain, single-gap and multi-gap target mIoU.
    Writes <out>/curve.md and returns its text."""
    settings = variant_settings(variant)
    data_root = data_root or os.path.join(out, "data")
    seed = settings["seeds"][0]
    with RunLock(out):
        prepare_data(data_root, settings, log)
        data = load_data(data_root)
        lines = [f"Dense row, seed {seed}: mIoU (%) against stage-0 pre-training steps (x {settings['cpt_batch']} "
                 f"tiles), heads {settings['head_steps']} steps x {settings['head_batch']}", "",
                 "| steps | held-out corpus | in-domain | single-gap | multi-gap | FFN share per block | minutes |",
                 "|---|---|---|---|---|---|---|"]
        for steps in steps_list:
            t0 = time.time()
            path = os.path.join(out, f"dense_{steps}.json")
            result = read_json(path)
            if result is None:
                s = dict(settings, stage0_steps=steps)
                model = stage0(seed, data, s, os.path.join(out, f"dense_{steps}.pt"), log, device)
                features = cached_features(model, data.heldout.images, 64, data.heldout.units, data.unit_stats)
                result = {"steps": steps, **dg_scores(model, data, s, seed, device),
                          "heldout_miou": head_miou(model, model.head, features, data.heldout.labels, device=device),
                          "ffn_share": ffn_share(model, data.heldout, data.unit_stats), "minutes": (time.time() - t0) / 60}
                write_text_atomic(path, json.dumps(result))
            lines.append(f"| {steps} | {result['heldout_miou']:.1f} | {np.mean(list(result['in_domain'].values())):.1f} | "
                         f"{average(result, 'single-gap'):.1f} | {average(result, 'multi-gap'):.1f} | "
                         f"{' '.join(f'{v:.2f}' for v in result['ffn_share'])} | {result['minutes']:.1f} |")
            log(lines[-1])
        text = "\n".join(lines) + "\n"
        write_text_atomic(os.path.join(out, "curve.md"), text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=None, help="full (default), quick or gpu")
    parser.add_argument("--quick", action="store_true", help="the quick variant (same as --variant quick)")
    parser.add_argument("--out", default=None, help="output folder (default runs/ablation_<variant>, "
                                                     "runs/ablation for full)")
    parser.add_argument("--data", default=None, help="data folder of corpus/ and suite/ (default <out>/data)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--separability", action="store_true",
                        help="only print the descriptors' separability table over the variant's corpus")
    parser.add_argument("--descriptor-table", action="store_true",
                        help="only print the ENL against the looks per sensor and the descriptors per domain of the "
                             "synthetic suite (32 test tiles of 128 px each; with --dry-run 2 of 64 px)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the variant (VALUE in JSON), e.g. --set preset='\"small\"' "
                             "--set stage0_steps=3200; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="the variant's every stage for 2 steps on micro "
                                                                  "data (checks a variant before a long run)")
    parser.add_argument("--curve", default=None, help="comma-separated stage-0 step counts: the dense row's "
                                                      "mIoU against pre-training steps (<out>/curve.md)")
    args = parser.parse_args(argv)
    name = "quick" if args.quick else args.variant or "full"
    out = args.out or ("runs/ablation" if name == "full" else f"runs/ablation_{name}")
    variant = variant_settings(name)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in variant:
            parser.error(f"--set {item}: unknown setting {key!r}; the {name} variant has {', '.join(variant)}")
        try:
            variant[key] = json.loads(value)
        except ValueError:
            parser.error(f"--set {item}: {value!r} is not a JSON value (strings need quotes: '\"small\"')")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA GPU (use --device cpu)")
    t0 = time.time()
    try:
        if args.descriptor_table:
            print(descriptor_table(2, 64) if args.dry_run else descriptor_table())
            return 0
        if args.separability:
            settings = dry_run_settings(variant) if args.dry_run else variant_settings(variant)
            data_root = args.data or os.path.join(out, "data")
            prepare_data(data_root, settings, lambda m: print(m, flush=True))
            data = load_data(data_root)
            print(format_separability(descriptor_separability(data, settings), data))
            return 0
        if args.curve:
            steps = [int(s) for s in args.curve.split(",")]
            print(run_curve(out, steps, variant, args.data, lambda m: print(m, flush=True), args.device))
            return 0
        settings = dry_run_settings(variant) if args.dry_run else variant
        if args.dry_run and args.out is None:
            out += "_dry_run"
        report = run_ablation(out, settings, args.data, log=lambda m: print(m, flush=True), device=args.device)
    except (OSError, ValueError, RuntimeError, RunLockedError) as e:
        print(f"nanosar.ablation: error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {out}/results.md ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
