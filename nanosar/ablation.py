"""
The routing ablation (the paper's Sec. 4.4) under the paper's protocol, at laptop scale, in one command:

    python -m nanosar.ablation --out runs/ablation                 # full: 6 rows x 3 seeds (49 min, 2 CPU cores)
    python -m nanosar.ablation --out runs/ablation_quick --quick   # 6 rows x 1 seed, fewer steps (9 min)

For every row (ROWS: dense ViT of the same active size, MoE with a token-only router without and with the
balance loss, the physics router with the balance loss = the full model, and the full model under each
gate mode) and seed:
  1. cpt: pre-train backbone + head on the simulated corpus (prepare.py corpus: every sensor, polarization,
     representation and region, scenes disjoint from the benchmarks'), each tile in its own unit;
  2. dg: freeze the backbone, compute its features once for the 13 domains of the synthetic suite, train a
     fresh head on each of the 12 sources of the 22 sub-benchmarks, score it (mIoU) on its targets;
  3. routing: on held-out corpus tiles, the normalised mutual information between each block's chosen
     expert and each domain factor (sensor, band, polarization, representation, region; the land-cover
     class of the patch for comparison), and each factor value's share of tokens per expert.
Then results.md: the table (mean +- std over seeds), the paired differences of the full model with 95 %
bootstrap intervals, the routing tables. Finished runs are skipped, an interrupted pre-training resumes
from its checkpoint; a progress line per run gives the time left. Nothing is tuned on a target: the
steps and learning rates are fixed below, and no run or checkpoint is selected.

Mixed units. The corpus mixes dB, linear amplitude and the real and imaginary parts of the SLC, which one
SARConfig.input_unit cannot describe. Each tile is therefore normalised with the corpus statistics of its
own unit (unit_statistics: a mean and std per unit, from pre-training tiles only) and its descriptors
are computed in its own unit (model_inputs); the unit is product metadata, known at test time too.

Sections: 1. routing vs domain factors; 2. numbers of the table; 3. inputs of mixed units and the feature
cache; 4. the protocol (pre-training, heads, scores, routing); 5. the runner and its report.
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
from nanosar.files import RunLock, RunLockedError, remove_stale_temporaries, write_text_atomic
from nanosar.metrics import evaluate
from nanosar.model import (FPNHead, SARConfig, Segmenter, check_input, router_features, sar_descriptors,
                           weight_decay_groups)

# -----------------------------------------------------------------------------
# 1. Routing vs domain factors


def _codes(labels, name):
    """Any 1-D labels (ints, strings) -> (unique labels in first-appearance order, (T,) int64 codes into them)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {labels.shape}")
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")                 # unique labels sorted by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse.reshape(-1)]


def normalized_mutual_information(a, b):
    """NMI(A; B) = I(A; B) / sqrt(H(A) H(B)) of two label arrays a, b: (T,) (e.g. chosen expert per token and
    its sensor), entropies and information in nats from the empirical joint distribution; in [0, 1].

    0 for independent labels, 1 when one is a relabelling of the other. When H(A) = 0 or H(B) = 0 (a constant
    array: nothing to explain or nothing explained) the ratio is 0/0 and this returns 0.0 (scikit-learn's
    normalized_mutual_info_score would return 1.0 when both are constant).
    """
    (_, ca), (_, cb) = _codes(a, "a"), _codes(b, "b")
    if len(ca) != len(cb) or len(ca) == 0:
        raise ValueError(f"a and b need the same non-zero length, got {len(ca)} and {len(cb)}")
    joint = np.zeros((ca.max() + 1, cb.max() + 1))
    np.add.at(joint, (ca, cb), 1.0)
    p = joint / len(ca)                                       # (|A|, |B|) joint probabilities
    pa, pb = p.sum(axis=1), p.sum(axis=0)                     # (|A|,), (|B|,) marginals, all > 0
    h_a, h_b = -(pa * np.log(pa)).sum(), -(pb * np.log(pb)).sum()
    if h_a <= 0 or h_b <= 0:
        return 0.0
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    return float(np.clip(mi / math.sqrt(h_a * h_b), 0.0, 1.0))  # clip: rounding around exact 0 and 1


def share_of_tokens(expert, domain, n_experts):
    """Each domain's share of its tokens per expert. expert: (T,) ids in [0, n_experts), domain: (T,) labels
    -> (table (n_domains, n_experts) float64 whose rows sum to 1, domain names in first-appearance order).

    With top_k > 1, flatten expert_idx (T, k) to (T*k,) and repeat each domain label k times.
    """
    expert = np.asarray(expert).reshape(-1)
    names, codes = _codes(domain, "domain")
    if len(expert) != len(codes):
        raise ValueError(f"expert and domain need the same length, got {len(expert)} and {len(codes)}")
    if len(expert) and (expert.min() < 0 or expert.max() >= n_experts):
        raise ValueError(f"expert ids must be in [0, {n_experts}), found [{expert.min()}, {expert.max()}]")
    counts = np.zeros((len(names), n_experts))
    np.add.at(counts, (codes, expert.astype(np.int64)), 1.0)
    return counts / counts.sum(axis=1, keepdims=True), names.tolist()


# -----------------------------------------------------------------------------
# 2. Numbers of the ablation table


def paired_bootstrap_ci(diffs, n_boot=10000, level=0.95, seed=0):
    """Percentile bootstrap interval of the mean of paired differences, e.g. diffs: (n,) = mIoU(full) -
    mIoU(dense) per (sub-benchmark, seed) pair -> (mean, low, high) in the units of diffs.

    Resamples the n pairs with replacement n_boot times (one (n_boot, n) index draw, vectorised) and takes
    the (1 - level)/2 and (1 + level)/2 quantiles of the resampled means. Deterministic for a given seed.
    """
    diffs = np.asarray(diffs, dtype=np.float64).reshape(-1)
    if len(diffs) < 2 or not np.isfinite(diffs).all():
        raise ValueError(f"need at least 2 finite differences, got {len(diffs)} values: {diffs[:5]}...")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    idx = np.random.default_rng(seed).integers(0, len(diffs), size=(n_boot, len(diffs)))  # (n_boot, n)
    means = diffs[idx].mean(axis=1)                                                      # (n_boot,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(diffs.mean()), float(low), float(high)


def mean_std(values):
    """values: (n,) e.g. one row's score per seed -> (mean, sample std with ddof=1); std is nan when n = 1."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def format_mean_std(values, digits=1):
    """values: (n,) -> "18.2 ± 0.7" (mean ± sample std over seeds); just "18.2" for a single value."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# -----------------------------------------------------------------------------
# 3. Inputs of mixed units, and the frozen backbone's features computed once


def unit_statistics(images, units):
    """Mean and std of the pixels of each unit. images: (N, C, H, W), units: N unit names -> {unit: (mean,
    std)} (floats, in that unit: dB, linear amplitude, ...), the normalisation model_inputs applies."""
    units = np.asarray(units)
    stats = {}
    for unit in sorted(set(units.tolist())):
        pixels = images[torch.from_numpy(np.flatnonzero(units == unit))].double()
        stats[unit] = (float(pixels.mean()), float(max(pixels.std(correction=0).item(), 1e-6)))
    return stats


def model_inputs(segmenter, x, units=None, unit_stats=None):
    """What Segmenter.forward feeds its backbone: normalised pixels (B, C, H, W) and raw descriptors (B, 3).

    units None: the model's own contract (cfg.input_unit, pixel_mean, pixel_std): exactly Segmenter.forward.
    Else units: B unit names, one per tile, and unit_stats {unit: (mean, std)}: each tile is normalised with
    its unit's statistics and its descriptors computed in its unit (a batch mixing dB, amplitude and SLC
    parts). segmenter.forward_prepared(*model_inputs(...)) is then the forward pass.
    """
    cfg = segmenter.cfg
    check_input(x, cfg)
    if units is None:
        return (x - segmenter.pixel_mean) / segmenter.pixel_std, sar_descriptors(x, cfg)
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
    return x_norm, s_raw


def backbone_pass(segmenter, images, units=None, unit_stats=None, batch=64):
    """The frozen backbone over N tiles, in eval mode without gradient (the module's mode is restored).
    images: (N, C, H, W) -> features (N, 4, D, H/p, W/p) float32 (the maps of cfg.feature_layers in order)
    and expert ids (L, N, T) int64 of the top-1 expert per token and MoE block ((0, N, T) when dense)."""
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
                x_norm, s_raw = model_inputs(segmenter, x, None if units is None else units[i : i + batch],
                                             unit_stats)
                s = router_features(s_raw, cfg.entropy_bins) if cfg.descriptor_dim else None
                maps, routings = segmenter.backbone(x_norm, s)
                features.append(torch.stack(maps, dim=1).float().cpu())                # (b, 4, D, h, w)
                experts.append(torch.stack([r.expert_idx[:, 0].view(len(x), T) for r in routings]).cpu()
                               if routings else torch.zeros(0, len(x), T, dtype=torch.long))  # (L, b, T)
    finally:
        segmenter.train(was_training)
    if not features:                                                                    # N = 0 tiles
        return torch.zeros(0, 4, cfg.embed_dim, h, w), torch.zeros(0, 0, T, dtype=torch.long)
    return torch.cat(features), torch.cat(experts, dim=1)


def cached_features(segmenter, images, batch=16, units=None, unit_stats=None):
    """The backbone's 4 feature maps for every tile, as Segmenter.forward computes them (or, with units and
    unit_stats, as model_inputs prepares mixed units), without gradient and in eval mode.
    images: (N, C, H, W) -> (N, 4, D, H/p, W/p) float32 on the CPU; batch tiles a pass."""
    return backbone_pass(segmenter, images, units, unit_stats, batch)[0]


def head_logits_from_cache(head, features, patch_size):
    """Segmenter.forward's logits from cached backbone features: features (B, 4, D, h, w) -> logits
    (B, K, h*p, w*p), the head's (an FPNHead's) output bilinearly upsampled to the input size (p =
    patch_size). Gradients flow into the head only, which is what the DG protocol trains."""
    logits = head(list(features.unbind(dim=1)))                                 # (B, K, 4h, 4w)
    return F.interpolate(logits, size=(features.shape[-2] * patch_size, features.shape[-1] * patch_size),
                         mode="bilinear")


# -----------------------------------------------------------------------------
# 4. The protocol: pre-training on the corpus, heads on frozen features, scores, routing

FACTORS = ("sensor", "band", "polarization", "representation", "region")   # what a domain gap can change
# The rows of the paper's Table 5-style ablation: SARConfig overrides of the tiny preset. "dense" has one
# plain FFN per block of the experts' size, so every row has the same active parameters per token.
ROWS = {
    "dense": dict(n_experts=1),
    "moe_token": dict(descriptor_dim=0, balance_loss_weight=0.0),
    "moe_token_balance": dict(descriptor_dim=0),
    "full": dict(),                                               # physics router + balance, gate renorm
    "full_softmax": dict(gate="softmax"),
    "full_straight_through": dict(gate="straight_through"),
}
ROW_TITLES = {
    "dense": "dense ViT, same active size",
    "moe_token": "MoE, token-only router, no balance loss",
    "moe_token_balance": "MoE, token-only router + balance",
    "full": "MoE, physics router + balance (full, gate renorm)",
    "full_softmax": "full, gate softmax",
    "full_straight_through": "full, gate straight_through",
}
# Everything a run depends on. The data sizes are shared, so both variants read one prepared data folder.
DATA = dict(tile=64, corpus_tiles={"cpt": 8, "heldout": 2}, suite_tiles={"train": 128, "test": 64}, data_seed=0)
# The learning rates and step counts are fixed, never chosen on a target. The one choice made on data:
# cpt_lr 2e-3 over 1e-3, by the held-out corpus mIoU of the full row, seed 0, 400 steps (20.7 vs 19.7 %).
VARIANTS = {
    "full": dict(DATA, seeds=[0, 1, 2], cpt_steps=400, cpt_batch=32, cpt_lr=2e-3, warmup=20, head_steps=100,
                 head_batch=16, head_lr=1e-3, preset="tiny"),
    "quick": dict(DATA, seeds=[0], cpt_steps=150, cpt_batch=32, cpt_lr=2e-3, warmup=20, head_steps=50,
                  head_batch=16, head_lr=1e-3, preset="tiny"),
}

CKPT_EVERY = 50   # pre-training steps between checkpoints (a killed run loses at most this many)


@dataclasses.dataclass
class Tiles:
    """Tiles of several prepared domains in memory: images (N, C, H, W) float32 each in its unit, labels
    (N, H, W) int64, and per tile its domain, unit and domain factors (lists of N)."""

    images: torch.Tensor
    labels: torch.Tensor
    domain: list
    units: list
    factors: dict


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


def load_data(data_root):
    """AblationData from <data_root>/corpus (prepare.py corpus) and <data_root>/suite (prepare.py synthetic);
    each must be complete (check_suite_complete)."""
    corpus_root, suite_root = os.path.join(data_root, "corpus"), os.path.join(data_root, "suite")
    corpus_domains = check_suite_complete(corpus_root, "corpus.json")["domains"]
    suite = check_suite_complete(suite_root)
    suite_domains = []
    for name in suite["domains"]:
        meta = Split(os.path.join(suite_root, name, "train")).meta
        suite_domains.append({"name": name, "unit": meta["unit"], **{f: meta[f] for f in FACTORS}})
    corpus = load_tiles(corpus_root, corpus_domains, "cpt")
    return AblationData(corpus, load_tiles(corpus_root, corpus_domains, "heldout"),
                        unit_statistics(corpus.images, corpus.units), suite["benchmarks"],
                        {split: load_tiles(suite_root, suite_domains, split) for split in ("train", "test")})


def row_config(row, settings):
    """The SARConfig of an ablation row: the preset, the row's overrides, 1 channel, the 7 classes. The
    input_unit is nominal: every pass goes through model_inputs with each tile's own unit."""
    return SARConfig.preset(settings["preset"], img_size=settings["tile"], in_chans=1, input_unit="db",
                            num_classes=len(CLASSES_7), class_names=tuple(CLASSES_7), **ROWS[row])


def learning_rate(step, steps, peak, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to peak / 100."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak / 100 + (peak - peak / 100) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(module, lr):
    """AdamW with train.py's weight decay (0.05, on matrices and kernels only: model.weight_decay_groups)."""
    return torch.optim.AdamW(weight_decay_groups(module, 0.05), lr=lr)


def pretrain(row, seed, corpus, unit_stats, settings, path, log=print):
    """Phase cpt: backbone + head on the corpus (Tiles), every tile in its own unit. Saves the training
    state to `path` every CKPT_EVERY steps and at the end (atomically), and resumes from it.
    -> Segmenter (eval mode)."""
    torch.manual_seed(seed)                                        # the seed sets the initialisation ...
    model = Segmenter(row_config(row, settings))
    optimizer = adamw(model, settings["cpt_lr"])
    steps, B, start = settings["cpt_steps"], settings["cpt_batch"], 0
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
            group["lr"] = learning_rate(step, steps, settings["cpt_lr"], settings["warmup"])
        idx = stream_indices(len(corpus.images), seed, step * B, B)      # ... and the data order
        x, y = augment(corpus.images[idx], corpus.labels[idx], seed, step * B)
        out = model.forward_prepared(*model_inputs(model, x, [corpus.units[i] for i in idx], unit_stats))
        loss = F.cross_entropy(out.logits, y, ignore_index=255) + out.aux_loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"{row} seed {seed}: the pre-training loss became {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % CKPT_EVERY == 0 or step + 1 == steps:
            save_checkpoint(path, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.cfg),
                                   "optimizer": optimizer.state_dict(), "step": step + 1})
    return model.eval()


def train_head(features, labels, cfg, settings, seed, name):
    """Phase dg: a fresh FPN head trained on cached frozen-backbone features (N, 4, D, h, w) and labels
    (N, H, W) of one source; no augmentation (the features are fixed), no selection (last step kept)."""
    torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    head = FPNHead(cfg.embed_dim, cfg.head_dim, cfg.num_classes)
    optimizer = adamw(head, settings["head_lr"])
    steps, B = settings["head_steps"], settings["head_batch"]
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, settings["head_lr"], min(10, steps // 10))
        idx = stream_indices(len(features), zlib.crc32(f"{seed}:{name}".encode()), step * B, B)
        logits = head_logits_from_cache(head, features[idx], cfg.patch_size)
        loss = F.cross_entropy(logits, labels[idx], ignore_index=255)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return head.eval()


def head_miou(model, head, features, labels, batch=64):
    """mIoU (%) of `head` on cached features (N, 4, D, h, w) of `model`'s backbone against labels (N, H, W),
    through metrics.evaluate, the evaluation loop of train.py and eval.py."""
    batches = ((features[i : i + batch], labels[i : i + batch]) for i in range(0, len(features), batch))
    scores = evaluate(model, batches, "cpu", logits_of=lambda f: head_logits_from_cache(head, f, model.cfg.patch_size))
    return 100.0 * scores["miou"]


def dg_scores(model, data, settings, seed):
    """Phase dg for one pre-trained backbone: features of the suite's domains computed once, one head per
    source, scored on the source's own test tiles and on every target of its benchmarks.
    -> {"benchmarks": {code: target mIoU %}, "in_domain": {source: source test mIoU %}}."""
    cache = {}
    for split, tiles in data.suite.items():
        features = cached_features(model, tiles.images, batch=64, units=tiles.units, unit_stats=data.unit_stats)
        for name in sorted(set(tiles.domain)):
            rows = [i for i, d in enumerate(tiles.domain) if d == name]
            cache[name, split] = features[rows], tiles.labels[rows]
    scores, in_domain = {}, {}
    for source in sorted({b["source"] for b in data.benchmarks}):
        head = train_head(*cache[source, "train"], model.cfg, settings, seed, source)
        in_domain[source] = head_miou(model, head, *cache[source, "test"])
        for b in data.benchmarks:
            if b["source"] == source:
                scores[b["code"]] = head_miou(model, head, *cache[b["target"], "test"])
    return {"benchmarks": scores, "in_domain": in_domain}


def patch_classes(labels, patch_size):
    """Majority land-cover class of each patch: labels (N, H, W) -> (N, h*w) int64 (ignored pixels vote for
    no class; a patch of ignored pixels only gets class 0)."""
    one_hot = F.one_hot(labels.clamp_max(len(CLASSES_7)), len(CLASSES_7) + 1)[..., :-1]    # (N, H, W, K)
    counts = F.avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), patch_size)                # (N, K, h, w)
    return counts.argmax(dim=1).flatten(1)


def routing_report(model, experts, heldout):
    """Does routing follow physics? From the top-1 expert ids (L, N, T) of backbone_pass over the held-out
    corpus tiles `heldout` (Tiles), per MoE block: the NMI between the chosen expert of each patch token
    and each domain factor of its tile, and the land-cover class of the patch for comparison; and each
    factor value's share of tokens per expert.
    -> {"nmi": {factor: [per block]}, "share": {factor: [per block {"values": [...], "table": (V, E)}]}}
    (empty dicts for a dense model)."""
    if experts.shape[0] == 0:
        return {"nmi": {}, "share": {}}
    prefix = 1 + model.cfg.num_register_tokens
    experts = experts[:, :, prefix:]                                                      # (L, N, h*w)
    per_token = {f: np.repeat(np.asarray(heldout.factors[f]), experts.shape[2]) for f in FACTORS}
    per_token["class"] = patch_classes(heldout.labels, model.cfg.patch_size).reshape(-1).numpy()
    nmi = {f: [] for f in per_token}
    share = {f: [] for f in FACTORS}
    for block in experts:
        chosen = block.reshape(-1).numpy()
        for f, values in per_token.items():
            nmi[f].append(normalized_mutual_information(chosen, values))
        for f in FACTORS:
            table, names = share_of_tokens(chosen, per_token[f], model.cfg.n_experts)
            share[f].append({"values": names, "table": np.round(table, 4).tolist()})
    return {"nmi": nmi, "share": share}


# -----------------------------------------------------------------------------
# 5. The runner: data, runs (skipped when finished), report


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
    for folder, args in jobs.items():
        out = os.path.join(data_root, folder)
        try:
            check_suite_complete(out, "corpus.json" if folder == "corpus" else "suite.json")
            continue
        except (OSError, ValueError):
            pass
        if not os.path.isfile(os.path.join(repo, "prepare.py")):
            raise FileNotFoundError(f"{out} is not prepared and prepare.py is not beside the nanosar package "
                                    f"({repo}): run from a clone (pip install -e .) or prepare it there")
        log(f"preparing {out} (python prepare.py {args[0]})")
        command = [sys.executable, os.path.join(repo, "prepare.py"), *args, "--out", out, "--tile", tile,
                   "--seed", str(settings["data_seed"])]
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


def run_one(row, seed, out, data, settings, log):
    """Pre-train, score and report one (row, seed); writes <out>/runs/<row>/seed<seed>/result.json."""
    folder = os.path.join(out, "runs", row, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    t0 = time.time()
    model = pretrain(row, seed, data.corpus, data.unit_stats, settings, os.path.join(folder, "cpt.pt"), log)
    t1 = time.time()
    heldout = data.heldout
    features, experts = backbone_pass(model, heldout.images, heldout.units, data.unit_stats)  # for both below
    result = {"row": row, "seed": seed, "settings": settings, "unit_stats": data.unit_stats,
              "heldout_miou": head_miou(model, model.head, features, heldout.labels),
              **dg_scores(model, data, settings, seed),
              "routing": routing_report(model, experts, heldout)}
    result["seconds"] = {"cpt": round(t1 - t0, 1), "dg_and_routing": round(time.time() - t1, 1)}
    write_text_atomic(os.path.join(folder, "result.json"), json.dumps(result))
    return result


def finished(out, row, seed):
    """The result of a finished (row, seed), or None."""
    path = os.path.join(out, "runs", row, f"seed{seed}", "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_ablation(out, variant="full", data_root=None, rows=tuple(ROWS), log=print):
    """The whole ablation into `out`: data (prepared if missing), every (row, seed) not finished yet, and
    <out>/results.md. data_root (default <out>/data) can be shared between variants. -> results.md's text."""
    settings = dict(VARIANTS[variant]) if isinstance(variant, str) else dict(variant)
    data_root = data_root or os.path.join(out, "data")
    with RunLock(out):
        check_settings(out, settings)
        prepare_data(data_root, settings, log)
        todo = [(r, s) for s in settings["seeds"] for r in rows if finished(out, r, s) is None]
        done = len(rows) * len(settings["seeds"]) - len(todo)
        log(f"{len(todo)} runs to do, {done} finished earlier (skipped)")
        data = load_data(data_root) if todo else None
        t0 = time.time()
        for i, (row, seed) in enumerate(todo):
            result = run_one(row, seed, out, data, settings, log)
            left = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
            s = result["seconds"]
            log(f"[{done + i + 1}/{done + len(todo)}] {row} seed {seed}: cpt {s['cpt']:.0f} s, dg + routing "
                f"{s['dg_and_routing']:.0f} s | single-gap {average(result, 'single-gap'):.1f}, multi-gap "
                f"{average(result, 'multi-gap'):.1f} mIoU | ~{left / 60:.0f} min left")
        results = {r: [finished(out, r, s) for s in settings["seeds"]] for r in rows}
        report = format_report(results, settings)
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


def paired_differences(a, b, group=None):
    """mIoU(a) - mIoU(b) per (sub-benchmark, seed) pair of two rows' result lists (same seeds)."""
    groups = benchmark_groups()
    return [ra["benchmarks"][c] - rb["benchmarks"][c] for ra, rb in zip(a, b) for c in sorted(ra["benchmarks"])
            if group in (None, groups[c])]


def format_report(results, settings):
    """results.md: the ablation table, the paired differences, NMI per row and block, shares per expert."""
    seeds, rows = settings["seeds"], list(results)
    lines = [f"# Routing ablation ({len(seeds)} seed(s): {seeds}; pre-training {settings['cpt_steps']} steps x "
             f"{settings['cpt_batch']} tiles, heads {settings['head_steps']} steps x {settings['head_batch']})", "",
             "mIoU (%) on the targets of the 22 synthetic sub-benchmarks, frozen backbone, mean ± std over seeds.", "",
             "| row | single-gap (12) | multi-gap (10) | all 22 | sources in-domain | held-out corpus |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        rs = results[row]
        cells = [format_mean_std([average(r, g) for r in rs]) for g in ("single-gap", "multi-gap", None)]
        cells.append(format_mean_std([np.mean(list(r["in_domain"].values())) for r in rs]))
        cells.append(format_mean_std([r["heldout_miou"] for r in rs]))
        lines.append(f"| {ROW_TITLES[row]} | {' | '.join(cells)} |")
    if "full" in results:
        lines += ["", "Paired differences of the full model (mIoU points, mean over (sub-benchmark, seed) pairs, "
                      "95 % percentile bootstrap interval, 10000 resamples):", "",
                  "| full minus | single-gap | multi-gap | all 22 |", "|---|---|---|---|"]
        for other in ("dense", "moe_token_balance"):
            if other in results:
                cells = []
                for g in ("single-gap", "multi-gap", None):
                    mean, low, high = paired_bootstrap_ci(paired_differences(results["full"], results[other], g))
                    cells.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]")
                lines.append(f"| {ROW_TITLES[other]} | {' | '.join(cells)} |")
    moe = [row for row in rows if results[row][0]["routing"]["nmi"]]
    if moe:
        factors = list(results[moe[0]][0]["routing"]["nmi"])
        lines += ["", "Normalised mutual information between the chosen expert and each factor of the token's "
                      "tile (class: the patch's land-cover class), on the held-out corpus tiles; mean over the "
                      "MoE blocks, mean ± std over seeds (0 = independent, 1 = the expert determines the factor):",
                  "", f"| row | {' | '.join(factors)} |", "|---|" + "---|" * len(factors)]
        for row in moe:
            cells = [format_mean_std([np.mean(r["routing"]["nmi"][f]) for r in results[row]], 3) for f in factors]
            lines.append(f"| {ROW_TITLES[row]} | {' | '.join(cells)} |")
        lines += ["", "Per block (seed " + str(seeds[0]) + "):", "",
                  f"| row | block | {' | '.join(factors)} |", "|---|---|" + "---|" * len(factors)]
        for row in moe:
            nmi = results[row][0]["routing"]["nmi"]
            for block in range(len(nmi[factors[0]])):
                lines.append(f"| {row} | {block} | {' | '.join(f'{nmi[f][block]:.3f}' for f in factors)} |")
        lines += ["", "Share of each factor value's tokens per expert (seed " + str(seeds[0]) + "; rows sum to 1):"]
        for row in moe:
            share = results[row][0]["routing"]["share"]
            for block in range(len(share[FACTORS[0]])):
                E = len(share[FACTORS[0]][block]["table"][0])
                lines += ["", f"{row}, block {block}:", "", "| factor | value | " +
                          " | ".join(f"e{e}" for e in range(E)) + " |", "|---|---|" + "---|" * E]
                for f in FACTORS:
                    entry = share[f][block]
                    for value, shares in zip(entry["values"], entry["table"]):
                        lines.append(f"| {f} | {value} | {' | '.join(f'{v:.2f}' for v in shares)} |")
    lines += ["", "Per sub-benchmark (mean over seeds):", "",
              "| code | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for code in results[rows[0]][0]["benchmarks"]:
        lines.append(f"| {code} | " + " | ".join(f"{np.mean([r['benchmarks'][code] for r in results[row]]):.1f}"
                                                 for row in rows) + " |")
    minutes = sum(sum(r["seconds"].values()) for rs in results.values() for r in rs) / 60
    lines += ["", f"Compute: {minutes:.1f} min of pre-training, heads and routing over all runs."]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default runs/ablation, runs/ablation_quick)")
    parser.add_argument("--quick", action="store_true", help="1 seed and fewer steps (the quick variant)")
    parser.add_argument("--data", default=None, help="data folder of corpus/ and suite/ (default <out>/data)")
    args = parser.parse_args(argv)
    variant = "quick" if args.quick else "full"
    out = args.out or f"runs/ablation{'_quick' if args.quick else ''}"
    t0 = time.time()
    try:
        report = run_ablation(out, variant, args.data, log=lambda m: print(m, flush=True))
    except (OSError, ValueError, RuntimeError, RunLockedError) as e:
        print(f"nanosar.ablation: error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {out}/results.md ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
