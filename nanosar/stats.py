"""
The statistics of the routing ablation (nanosar/ablation.py), in plain numpy, each a pure function with a
golden-value test (tests/test_stats.py):

    1. routing against labels: normalised mutual information, its chance level, token shares per expert
    2. intervals: the Student t interval over seeds (the unit of replication), the pair-level bootstrap
    3. separability: how well a plain classifier tells a domain factor from a few per-tile features
"""

import math

import numpy as np

# -----------------------------------------------------------------------------
# 1. Routing against labels


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


def shuffle_within(values, strata, rng):
    """values: (T,) permuted among the positions of each stratum (strata: (T,) labels): whatever values
    say about the strata is kept, everything else is destroyed. -> (T,) a new array."""
    values, (_, codes) = np.asarray(values), _codes(strata, "strata")
    if len(values) != len(codes):
        raise ValueError(f"values and strata need the same length, got {len(values)} and {len(codes)}")
    out = values.copy()
    for c in range(codes.max() + 1 if len(codes) else 0):
        where = np.flatnonzero(codes == c)
        out[where] = values[rng.permutation(where)]
    return out


def chance_nmi(expert, factor, strata, n_shuffles=5, seed=0):
    """The NMI between expert (T,) and factor (T,) that routing by the strata alone would give: the mean
    over n_shuffles of NMI(expert shuffled within each stratum, factor). With strata = the land-cover class of
    each patch this is what the domains' different class mixtures explain, plus finite-sample chance; an NMI
    above it is routing that follows the factor beyond the land cover."""
    rng = np.random.default_rng(seed)
    return float(np.mean([normalized_mutual_information(shuffle_within(expert, strata, rng), factor)
                          for _ in range(n_shuffles)]))


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
# 2. Intervals. The unit of replication of the ablation is the seed: the 22 sub-benchmark scores of one
#    seed come from the same two backbones (and sources share heads), so they are not independent draws.


def student_t_quantile(p, df):
    """The p-quantile of Student's t distribution with df > 0 degrees of freedom (p in (0, 1)), by bisection
    on its CDF, 0.5 + the integral of the density from 0 (Simpson's rule, 4000 intervals): 1e-6 accurate."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t):
        x = np.linspace(0.0, t, 4001)
        f = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
        return 0.5 + (t / 12000) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def t_interval(values, level=0.95):
    """Mean of values (n,) (e.g. one difference per seed) with its Student t confidence interval,
    mean +- t_{(1+level)/2, n-1} s / sqrt(n), s the sample std -> (mean, low, high). Needs n >= 2."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) < 2 or not np.isfinite(values).all():
        raise ValueError(f"need at least 2 finite values, got {values.tolist()}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean, half = values.mean(), student_t_quantile((1 + level) / 2, len(values) - 1) * values.std(ddof=1)
    half /= math.sqrt(len(values))
    return float(mean), float(mean - half), float(mean + half)


def paired_bootstrap_ci(diffs, n_boot=10000, level=0.95, seed=0):
    """Percentile bootstrap interval of the mean of paired differences diffs: (n,) -> (mean, low, high).

    Resamples the n pairs with replacement n_boot times and takes the (1 - level)/2 and (1 + level)/2
    quantiles of the resampled means; deterministic for a given seed. It treats the pairs as independent:
    for (sub-benchmark, seed) pairs that share backbones and heads that is too narrow, so the ablation
    reports it only as a secondary figure beside t_interval over seeds.
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
# 3. Separability: held-out accuracy of a plain classifier of a domain factor from per-tile features


def fit_logistic_regression(features, labels, n_classes, steps=500, lr=0.5, l2=1e-4):
    """Multinomial logistic regression by full-batch gradient descent (deterministic, no dependencies).
    features: (N, F) float, labels: (N,) ints in [0, n_classes) -> predict(features (M, F)) -> (M,) labels.
    Features are standardised with the fit set's mean and std (a constant feature is left at 0)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y) or not np.isfinite(x).all():
        raise ValueError(f"need finite features (N, F) and labels (N,), got {x.shape} and {y.shape}")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)            # (N, F + 1) with a bias
    target = np.eye(n_classes)[y]                                                  # (N, K) one-hot
    w = np.zeros((z.shape[1], n_classes))
    for _ in range(steps):
        logits = z @ w
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)                                          # (N, K)
        w -= lr * (z.T @ (p - target) / len(z) + l2 * w)

    def predict(test):
        t = (np.asarray(test, dtype=np.float64) - mean) / std
        return (np.concatenate([t, np.ones((len(t), 1))], axis=1) @ w).argmax(axis=1)

    return predict


def separability(fit_features, fit_labels, test_features, test_labels):
    """Held-out accuracy of fit_logistic_regression from (fit_features (N, F), fit_labels (N,)) on
    (test_features (M, F), test_labels (M,)), and the majority rate: the test share of the fit set's most
    common label. Labels may be any hashable values. -> (accuracy, majority) in [0, 1]."""
    names, codes = _codes(np.concatenate([np.asarray(fit_labels), np.asarray(test_labels)]), "labels")
    fit, test = codes[: len(fit_labels)], codes[len(fit_labels):]
    predict = fit_logistic_regression(fit_features, fit, len(names))
    majority = np.bincount(fit, minlength=len(names)).argmax()
    return float((predict(test_features) == test).mean()), float((test == majority).mean())
