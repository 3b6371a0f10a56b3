"""
Building blocks of the routing ablation (issue 12): how much routing follows physics, confidence intervals,
and the frozen-backbone feature cache that makes many heads and seeds affordable.

    1. normalized_mutual_information, share_of_tokens: does the chosen expert follow a domain factor?
    2. paired_bootstrap_ci, mean_std, format_mean_std: the numbers of the ablation table
    3. cached_features, head_logits_from_cache: the DG protocol's frozen backbone, computed once

Pure functions over numpy arrays and torch modules; no state, no plotting, no files.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from nanosar.model import check_input, router_features, sar_descriptors

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
# 3. The frozen backbone's features, computed once


def cached_features(segmenter, images, batch=16):
    """The backbone's 4 feature maps for every tile, as Segmenter.forward computes them, without gradient
    and in eval mode (the module's mode is restored after). images: (N, C, H, W) in cfg.input_unit ->
    (N, 4, D, H/p, W/p) float32 on images' device, the maps of cfg.feature_layers in order; batch tiles a pass.
    """
    cfg, device = segmenter.cfg, segmenter.pixel_mean.device
    images = torch.as_tensor(images)
    check_input(images, cfg)
    was_training, out = segmenter.training, []
    segmenter.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = images[i : i + batch].to(device)                                 # (b, C, H, W)
                s = router_features(sar_descriptors(x, cfg), cfg.entropy_bins) if cfg.descriptor_dim else None
                features, _ = segmenter.backbone((x - segmenter.pixel_mean) / segmenter.pixel_std, s)
                out.append(torch.stack(features, dim=1).float().to(images.device))  # (b, 4, D, h, w)
    finally:
        segmenter.train(was_training)
    if not out:                                                                      # N = 0 tiles
        h, w = images.shape[-2] // cfg.patch_size, images.shape[-1] // cfg.patch_size
        return torch.zeros(0, 4, cfg.embed_dim, h, w, device=images.device)
    return torch.cat(out)


def head_logits_from_cache(segmenter, features):
    """Segmenter.forward's logits from cached backbone features: features (B, 4, D, h, w) -> logits
    (B, K, h*p, w*p), the head's output bilinearly upsampled to the input size (p = cfg.patch_size).
    Gradients flow into segmenter.head only, which is what the DG protocol trains."""
    p, features = segmenter.cfg.patch_size, features.to(segmenter.pixel_mean.device)
    logits = segmenter.head(list(features.unbind(dim=1)))                        # (B, K, 4h, 4w)
    return F.interpolate(logits, size=(features.shape[-2] * p, features.shape[-1] * p), mode="bilinear")
