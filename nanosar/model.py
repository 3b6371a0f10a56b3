"""
The CrossEarth-SAR segmentation model in one file, read top to bottom as the data flows:

    1. SARConfig and the presets tiny / small / base / large
    2. the three SAR physical descriptors (directional entropy, ENL, local roughness)
    3. attention, the dense FFN, LayerScale, drop path
    4. the physics-guided router (token || descriptors -> softmax -> top-k)
    5. the sparse MoE FFN: a reference dispatch and a fast one (permute, grouped FFN, combine)
    6. the transformer block and the DINOv2-layout ViT backbone
    7. the segmentation head (UperNet-style FPN) and the Segmenter

Reference: CrossEarth-SAR (arXiv 2603.12008); the physics behind sections 2 and 4 is in the README.
Notation: B batch, C input channels, H W image size, N tokens per image, T = B*N tokens in a batch,
D width, Dh expert hidden width, E experts, k experts per token, K classes, L transformer blocks.
Upcycling from DINOv2 checkpoints lives in nanosar/dinov2.py, the MoE kernels in nanosar/moe_ops.py.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanosar import moe_ops
from nanosar.units import UNITS

# -----------------------------------------------------------------------------
# 1. Configuration


@dataclass
class SARConfig:
    """Hyper-parameters of the whole segmenter, plus its input contract (channels, unit, scaling)."""

    # input contract: what a pixel is
    img_size: int = 512               # training tile size in pixels (position embedding grid = img_size // patch_size)
    in_chans: int = 1                 # polarizations (1, 2 or 4), or 2 for complex (real, imag)
    input_unit: str = "db"            # one of nanosar.units.UNITS: intensity, amplitude, dn, db, complex, real, imag
    channels: tuple = ()              # optional channel names in order, e.g. ("VV", "VH") or ("re", "im")
    pixel_mean: tuple = ()            # per-channel mean subtracted before the ViT (in input_unit); () = 0
    pixel_std: tuple = ()             # per-channel std the ViT input is divided by; () = 1
    # ViT (DINOv2 layout)
    patch_size: int = 16              # DINOv2 ships 14; the paper's mmseg stack converts to 16 at 512x512
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-5     # 0 disables LayerScale
    num_register_tokens: int = 0      # DINOv2 "with registers" checkpoints have 4
    drop_path_rate: float = 0.0       # stochastic depth, linearly increasing over blocks
    # physics-guided sparse MoE (n_experts = 1 gives the dense ViT with plain FFNs)
    n_experts: int = 6
    top_k: int = 1
    descriptor_dim: int = 3           # 3 = physics router on [token || descriptors]; 0 = router sees tokens only
    descriptors: str = "paper"        # "paper": on log(1 + |x|), as the paper writes them; "physical": the documented
                                      # variant on linear intensity (section 2); "given": the caller passes the
                                      # router's descriptor_dim inputs (forward_prepared; the ablation's oracle)
    descriptor_mean: tuple = ()       # standardisation of the router's descriptor inputs (corpus statistics); () = none
    descriptor_std: tuple = ()
    entropy_bins: int = 18            # orientation bins over [0, pi) for the directional entropy (10 degrees each)
    roughness_block: int = 16         # block size in pixels for the local roughness (and "physical": the local ENL)
    multilook: int = 4                # "physical": H_DE on the intensity averaged over multilook x multilook pixels
    balance_loss_weight: float = 0.005  # Switch load-balance loss weight (paper: 0.005)
    router_z_loss_weight: float = 0.001  # ST-MoE router z-loss weight (not in the paper; 0 disables)
    moe_dispatch: str = "fast"        # "fast": csrc/ kernels where built, else grouped PyTorch; "reference": a loop
    gate: str = "renorm"              # "renorm" (paper), "softmax" (Switch) or "straight_through": see route()
    # segmentation head
    num_classes: int = 7
    class_names: tuple = ()           # optional names of the classes, in id order (part of the contract)
    head_dim: int = 256
    feature_layers: tuple = ()        # 4 block indices whose outputs feed the head; () = evenly spaced

    def __post_init__(self):
        """Checks of the values that would otherwise go wrong silently; lists from JSON become tuples."""
        for name in ("channels", "pixel_mean", "pixel_std", "class_names", "feature_layers", "descriptor_mean",
                     "descriptor_std"):
            setattr(self, name, tuple(getattr(self, name)))
        self.feature_layers = self.feature_layers or tuple(self.depth * (i + 1) // 4 - 1 for i in range(4))
        problems = [
            (self.input_unit not in UNITS, f"input_unit must be one of {UNITS}, got {self.input_unit!r}"),
            (self.input_unit == "complex" and self.in_chans != 2, "complex input needs in_chans=2 (real, imag)"),
            (any(len(v) not in (0, self.in_chans) for v in (self.channels, self.pixel_mean, self.pixel_std)),
             f"channels, pixel_mean and pixel_std need in_chans={self.in_chans} entries (or none)"),
            (any(s <= 0 for s in self.pixel_std), f"pixel_std must be positive, got {self.pixel_std}"),
            (len(self.class_names) not in (0, self.num_classes),
             f"class_names has {len(self.class_names)} entries for num_classes={self.num_classes}"),
            (self.img_size % self.patch_size, f"img_size {self.img_size} is not a multiple of patch {self.patch_size}"),
            (self.descriptors not in ("paper", "physical", "given"),
             f"descriptors must be paper, physical or given, got {self.descriptors!r}"),
            (self.descriptors != "given" and self.descriptor_dim not in (0, 3),
             f"descriptor_dim must be 0 (token-only router) or 3 (the three descriptors), got {self.descriptor_dim}; "
             f"other sizes need descriptors='given'"),
            (self.descriptors == "given" and self.descriptor_dim < 1, "descriptors='given' needs descriptor_dim >= 1"),
            (any(len(v) not in (0, self.descriptor_dim) for v in (self.descriptor_mean, self.descriptor_std)),
             f"descriptor_mean and descriptor_std need descriptor_dim={self.descriptor_dim} entries (or none)"),
            (any(s <= 0 for s in self.descriptor_std), f"descriptor_std must be positive, got {self.descriptor_std}"),
            (self.multilook < 1, f"multilook must be >= 1, got {self.multilook}"),
            (not 1 <= self.top_k <= self.n_experts, f"top_k must be in [1, n_experts={self.n_experts}]"),
            (min(self.balance_loss_weight, self.router_z_loss_weight) < 0, "the loss weights must be >= 0"),
            (self.moe_dispatch not in ("fast", "reference"), f"moe_dispatch must be fast or reference, "
                                                              f"got {self.moe_dispatch!r}"),
            (self.gate not in ("renorm", "softmax", "straight_through"), f"gate must be renorm, softmax or "
                                                                         f"straight_through, got {self.gate!r}"),
            (len(self.feature_layers) != 4 or not all(0 <= i < self.depth for i in self.feature_layers),
             f"feature_layers must be 4 block indices in [0, {self.depth}), got {self.feature_layers}"),
        ]
        for wrong, message in problems:
            if wrong:
                raise ValueError(f"SARConfig: {message}")

    @property
    def hidden_dim(self):
        return int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def preset(cls, name, **overrides):
        """A named preset (tiny, small, base, large) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The paper's S/B/L are DINOv2 ViT-S/B/L with each FFN upcycled into 6 full-size experts, top-1.
# tiny is for CPU tests and the embedded synthetic default: 64x64 tiles, 8x8 patches.
PRESETS = {
    "tiny": dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, head_dim=32, roughness_block=8),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}

# -----------------------------------------------------------------------------
# 2. SAR physical descriptors (paper Sec. 3, "Physical Mechanism Router")
#
# Three scalars per image, over its valid pixels (a pixel whose magnitude is exactly 0 is no-data, the
# zero-filled border of a real scene, never a measurement). Where they enter the model: Segmenter.forward
# (section 7) computes s_raw = sar_descriptors(x) once per image, forward_prepared s = router_features(s_raw);
# SARViT passes s to every block, and PhysicsRouter.forward (section 4) adds W_s s to each token's logits.
# Two definitions (SARConfig.descriptors):
#   "paper":    on X' = log(1 + |X|) of the magnitude image, as the paper writes them: directional entropy
#               of Sobel gradients, ENL = (mean / std)^2 of the whole image, variance of block means.
#   "physical": the same three quantities where they carry physics, on the linear intensity I (so all
#               three are scale-free: dB, amplitude, intensity and DN views of one image give the same):
#               H_DE on ln of the multilooked I (structure, not pixel speckle, sets the orientations), the
#               local ENL (median over blocks of (mean / std)^2 of I: the looks, where the scene is
#               homogeneous) and the coefficient of variation of the block means of I.


def sar_magnitude(x, input_unit):
    """(B, C, H, W) pixels in `input_unit` -> (B, H, W) one non-negative magnitude image per sample.

    intensity / amplitude / dn / real / imag: channel mean of |x| (linear, as given); db: channel mean
    of the linear intensity 10^(x/10); complex: amplitude sqrt(re^2 + im^2) of the (re, im) pair.
    """
    if input_unit == "complex":
        return torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2)  # (B, H, W) linear amplitude
    if input_unit == "db":
        return (10.0 ** (x / 10.0)).mean(dim=1)         # (B, H, W) linear intensity
    return x.abs().mean(dim=1)                          # (B, H, W) as given


SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def directional_entropy(img, n_bins=18, valid=None):
    """Entropy (nats) of the Sobel gradient-orientation histogram. img, valid (or None: all): (B, H, W) -> (B,).

    Orientations are undirected (theta mod pi), split into n_bins bins over [0, pi), and each pixel whose
    3x3 neighbourhood is valid votes with its gradient magnitude (flat areas do not vote). Range [0, ln
    n_bins]: ~0 for one straight edge, ln n_bins for isotropic speckle; 0 with no gradient at all; NaN
    for a NaN or inf pixel (never an out-of-range bin).
    """
    kx = SOBEL_X.to(img)[None, None]                    # (1, 1, 3, 3)
    gx = F.conv2d(img[:, None], kx)[:, 0]               # (B, H-2, W-2), "valid": no padding artefacts
    gy = F.conv2d(img[:, None], kx.transpose(2, 3))[:, 0]  # Sobel y = transpose of Sobel x
    magnitude = torch.sqrt(gx**2 + gy**2)                               # (B, H-2, W-2)
    if valid is not None:                                               # only pixels whose 3x3 are all valid
        magnitude = magnitude * -F.max_pool2d(-valid[:, None].to(img), 3, stride=1)[:, 0]
    magnitude = magnitude.flatten(1)                                    # (B, P)
    theta = torch.remainder(torch.atan2(gy, gx), math.pi).flatten(1)   # (B, P) in [0, pi)
    bins = torch.nan_to_num(theta * (n_bins / math.pi), nan=0.0).long().clamp_(0, n_bins - 1)
    hist = img.new_zeros(img.shape[0], n_bins).scatter_add_(1, bins, magnitude)  # (B, n_bins)
    p = hist / hist.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)  # 0 log 0 = 0


def equivalent_number_of_looks(img, valid=None):
    """ENL = (mean / std)^2 over each image's valid pixels. img, valid (or None: all): (B, H, W) -> (B,).

    On the linear intensity of a homogeneous area this is the physical ENL (= L for L-look speckle); on
    X' it is a texture statistic. A constant image gives a large finite value (variance floored at 1e-12).
    """
    w = torch.ones_like(img) if valid is None else valid.to(img)
    n = w.sum(dim=(1, 2)).clamp_min(1)
    mean = (img * w).sum(dim=(1, 2)) / n
    var = (((img - mean[:, None, None]) ** 2) * w).sum(dim=(1, 2)) / n
    return mean**2 / var.clamp_min(1e-12)


def local_roughness(img, block=16, valid=None):
    """Variance of the means of non-overlapping block x block pixel blocks. img, valid: (B, H, W) -> (B,).

    Units of img squared: 0 for a constant image, large when the scene changes at the block scale. Blocks
    less than half valid are left out; rows and columns beyond the last whole block are ignored.
    """
    w = (torch.ones_like(img) if valid is None else valid.to(img))[:, None]   # (B, 1, H, W)
    share = F.avg_pool2d(w, block).flatten(1)                                   # (B, nb) valid share per block
    means = F.avg_pool2d(img[:, None] * w, block).flatten(1) / share.clamp_min(1e-12)
    used = (share >= 0.5).to(img)
    n = used.sum(dim=1).clamp_min(1)
    mean = (means * used).sum(dim=1, keepdim=True) / n[:, None]
    return (((means - mean) ** 2) * used).sum(dim=1) / n


def sar_intensity(x, input_unit):
    """(B, C, H, W) pixels in `input_unit` -> (B, H, W) linear intensity (power), up to a constant factor.

    Channel mean of: 10^(x/10) (db), |x| (intensity), x^2 (amplitude; dn: DN^2, the intensity times
    dn_scale^2; real, imag: the power of that part of the SLC, on average half the intensity); complex:
    re^2 + im^2.
    """
    if input_unit == "complex":
        return x[:, 0] ** 2 + x[:, 1] ** 2              # (B, H, W)
    if input_unit == "db":
        return (10.0 ** (x / 10.0)).mean(dim=1)
    if input_unit == "intensity":
        return x.abs().mean(dim=1)
    return (x**2).mean(dim=1)


def image_blocks(img, block):
    """(B, H, W) -> (B, nb, block * block): the non-overlapping block x block blocks, row-major; rows and
    columns beyond the last whole block are dropped."""
    B, H, W = img.shape
    h, w = H // block, W // block
    blocks = img[:, : h * block, : w * block].reshape(B, h, block, w, block)   # (B, h, b, w, b)
    return blocks.transpose(2, 3).reshape(B, h * w, block * block)


def multilook(img, window, valid):
    """Boxcar multilook: the means of non-overlapping window x window blocks (window^2 looks averaged, the
    speckle's std falls by window). img, valid: (B, H, W) -> (B, H // window, W // window) means and
    validity (a block is valid when all its pixels are)."""
    pixels, ok = image_blocks(img, window), image_blocks(valid.to(img), window)    # (B, nb, w*w)
    shape = (img.shape[0], img.shape[1] // window, img.shape[2] // window)
    return pixels.mean(dim=2).view(shape), (ok.amin(dim=2) > 0).view(shape)


def block_enl(intensity, block, valid):
    """Local ENL: the lower median over block x block blocks of (mean / std)^2 of the linear intensity,
    unbiased std, blocks at least half valid. intensity, valid: (B, H, W) -> (B,).

    For L-look speckle over a homogeneous area every block estimates L (within ~2 % for 16 x 16 blocks);
    blocks with edges or texture estimate less and the median passes over them while most blocks are
    homogeneous. A constant image gives 1e8 (variance floored at 1e-8 mean^2), an image without a usable
    block 0, and a NaN or inf pixel NaN.
    """
    x, w = image_blocks(intensity, block), image_blocks(valid.to(intensity), block)   # (B, nb, b*b)
    n = w.sum(dim=2)                                                               # (B, nb) valid pixels
    mean = (x * w).sum(dim=2) / n.clamp_min(1)
    var = (((x - mean[..., None]) ** 2) * w).sum(dim=2) / (n - 1).clamp_min(1)
    enl = mean**2 / var.clamp_min(1e-8 * mean**2).clamp_min(1e-30)                  # (B, nb)
    used = n >= 0.5 * block * block
    median = torch.where(used, enl, math.nan).nanmedian(dim=1).values                 # NaN when none is used
    broken = (used & enl.isnan()).any(dim=1)                                          # nanmedian skips NaN
    return torch.where(broken, math.nan, torch.nan_to_num(median, nan=0.0))


def block_mean_variation(intensity, block, valid):
    """Coefficient of variation std / mean of the block x block block means of the linear intensity (blocks
    at least half valid; std over blocks). intensity, valid: (B, H, W) -> (B,), dimensionless: 0 for a
    constant image, ~0 for homogeneous speckle, large for a scene that changes at the block scale."""
    x, w = image_blocks(intensity, block), image_blocks(valid.to(intensity), block)
    n = w.sum(dim=2)
    used = (n >= 0.5 * block * block).to(intensity)
    means = (x * w).sum(dim=2) / n.clamp_min(1)                                    # (B, nb)
    count = used.sum(dim=1).clamp_min(1)
    mean = (means * used).sum(dim=1) / count
    std = ((((means - mean[:, None]) ** 2) * used).sum(dim=1) / count).sqrt()
    return std / mean.clamp_min(1e-30)


def physical_descriptors(x, cfg):
    """The "physical" variant of s = [H_DE, ENL, R]. x: (B, C, H, W) in cfg.input_unit -> (B, 3): the directional
    entropy (nats) of ln(multilooked intensity), the local ENL of the intensity (block_enl, blocks of
    cfg.roughness_block) and the coefficient of variation of its block means (block_mean_variation)."""
    intensity = sar_intensity(x, cfg.input_unit)                                   # (B, H, W) linear power
    valid = intensity != 0                                                         # NaN stays valid: it shows
    looked, looked_valid = multilook(intensity, cfg.multilook, valid)              # (B, H/m, W/m)
    log_looked = torch.where(looked_valid, torch.log(looked.clamp_min(1e-30)), 0.0)
    return torch.stack([directional_entropy(log_looked, cfg.entropy_bins, looked_valid),
                        block_enl(intensity, cfg.roughness_block, valid),
                        block_mean_variation(intensity, cfg.roughness_block, valid)], dim=1)


def sar_descriptors(x, cfg):
    """The descriptors s = [H_DE, ENL, R] per image, as cfg.descriptors defines them ("given" computes the
    paper's, for the report: its router reads what the caller passes). x: (B, C, H, W) in cfg.input_unit ->
    (B, 3) raw values in float32, without gradient."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        if cfg.descriptors == "physical":
            return physical_descriptors(x.float(), cfg)
        magnitude = sar_magnitude(x.float(), cfg.input_unit)                   # (B, H, W)
        img, valid = torch.log1p(magnitude), magnitude != 0                    # X', no-data = exactly 0
        return torch.stack([directional_entropy(img, cfg.entropy_bins, valid), equivalent_number_of_looks(img, valid),
                            local_roughness(img, cfg.roughness_block, valid)], dim=1)


def router_features(s, cfg):
    """Raw descriptors (B, 3) -> router inputs (B, 3) of order one: H / ln(bins) in [0, 1], ln ENL clamped to
    [-6.9, 9.2], and ln(R + 1e-6) ("paper") or ln(R + 1e-3) ("physical": R is a coefficient of variation),
    since ENL and roughness span orders of magnitude across sensors; then standardised with
    cfg.descriptor_mean and descriptor_std when they are set."""
    entropy, enl, roughness = s.unbind(dim=1)
    floor = 1e-3 if cfg.descriptors == "physical" else 1e-6
    features = torch.stack([entropy / math.log(cfg.entropy_bins), torch.log(enl.clamp(1e-3, 1e4)),
                            torch.log(roughness + floor)], dim=1)                  # (B, 3)
    return standardise_router_input(features, cfg)


def standardise_router_input(features, cfg):
    """(B, descriptor_dim) -> (features - descriptor_mean) / descriptor_std, or as given when they are unset."""
    if not cfg.descriptor_mean:
        return features
    mean, std = features.new_tensor(cfg.descriptor_mean), features.new_tensor(cfg.descriptor_std)
    return (features - mean) / std


# -----------------------------------------------------------------------------
# 3. Attention, dense FFN, LayerScale, drop path (DINOv2 layers, same parameter names)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                        # 3 x (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)                             # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))                    # (B, N, D)


class Mlp(nn.Module):
    """The dense DINOv2 FFN: fc1 -> GELU -> fc2. (..., D) -> (..., D)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples. x: (B, ...)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


# -----------------------------------------------------------------------------
# 4. The physics-guided router


@dataclass
class Routing:
    """What the router decides for T tokens, and the statistics the losses and logs need."""

    expert_idx: torch.Tensor      # (T, k) int64 chosen experts, best first
    gates: torch.Tensor           # (T, k) float32 top-k probabilities renormalised to sum to 1
    balance_loss: torch.Tensor    # () Switch loss E * sum_e f_e p_e of these T tokens, unweighted; 1.0 when uniform
    z_loss: torch.Tensor          # () mean logsumexp(logits)^2, unweighted
    tokens_per_expert: torch.Tensor  # (E,) int64 number of (token, slot) assignments per expert
    mean_prob: torch.Tensor       # (E,) float32 mean router probability per expert, p_e (with gradient)


def tokens_per_expert(expert_idx, n_experts):
    """Histogram of expert ids. expert_idx: (T, k) int64 -> (E,) int64."""
    flat = expert_idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def gating(logits, top_k):
    """Reference gating (csrc/gating*.c* are its kernels). logits: (T, E) -> expert_idx (T, k) int64,
    gates (T, k), tokens per expert (E,) int64, mean probability per expert (E,), z-loss ().

    Softmax and everything after it run in float32 (float64 for float64 logits). The top k are the
    largest logits, ties going to the lower expert id (a stable sort), and the gates are their
    probabilities renormalised over the k. With k = 1 every gate is exactly 1 (so an upcycled model
    reproduces the dense FFN whatever the routing) and the router learns only through the balance and
    z losses, as in the paper.

    Non-finite logits (the kernels follow the same rule, csrc/moe_ops.h):
      * selection is a stable descending sort with NaN counted as +inf: +inf and NaN first, then finite
        values, then -inf, equal keys by expert id. (Not torch.sort's own NaN order: on CUDA it can
        depend on the NaN's sign bit, pytorch/pytorch#117617.) The ids are always k distinct experts in
        [0, E), also when fewer than k logits are finite: [0, -inf, -inf] with k = 2 gives experts
        [0, 1] with gates [1, 0], and counts that include expert 1.
      * nothing is masked: a row with a NaN or +inf logit, or with only -inf logits, has NaN
        probabilities (torch.softmax), hence NaN gates and a NaN mean_prob; its logsumexp is NaN, +inf
        or -inf (torch.logsumexp), so the z-loss is NaN or inf. The loss turns non-finite and training
        stops, instead of silently routing the token to some finite expert.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = logits.softmax(dim=-1)                                                  # (T, E)
    key = torch.where(logits.isnan(), math.inf, logits)                            # NaN counts as +inf
    expert_idx = key.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]  # (T, k)
    top_probs = probs.gather(1, expert_idx)                                         # (T, k)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True)                         # rows sum to 1
    counts = tokens_per_expert(expert_idx, logits.shape[1])                         # (E,)
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return expert_idx, gates, counts, probs.mean(dim=0), z_loss


def switch_balance_loss(counts, mean_prob):
    """Switch Transformer load-balance loss E * sum_e f_e p_e. counts (..., E), mean_prob (..., E) -> (...).

    f_e = share of the assignments that went to expert e (no gradient), p_e = mean router probability.
    Equals 1 when routing is uniform and E when every token goes to one expert with probability 1.
    Batched over leading dimensions, e.g. (L, E) -> (L,) for the L MoE blocks.
    """
    fraction_routed = counts.to(mean_prob.dtype) / counts.sum(dim=-1, keepdim=True)
    return mean_prob.shape[-1] * (fraction_routed * mean_prob).sum(dim=-1)


def balance_loss_over_blocks(counts, mean_prob):
    """Mean over MoE blocks of the Switch loss. counts (L, E) int64, mean_prob (L, E) -> (). 0 when L = 0.

    With SegmenterOutput.expert_load and .router_prob of one process it equals SegmenterOutput.balance_loss.
    Under DDP, the loss of the micro-batch of all processes: sum expert_load over the processes (all_reduce,
    outside the model: every process must issue it, once per micro-step, whose backward needs these counts),
    then call this with the local router_prob;
    DDP's gradient averaging turns the local p_e into the global mean (same number of tokens per process).
    """
    if counts.shape[0] == 0:
        return mean_prob.new_zeros(())
    return switch_balance_loss(counts, mean_prob).mean()


def route(logits, top_k, gating_fn=gating, gate="renorm"):
    """Router logits (T, E) -> Routing, with gating_fn the reference above or the extension's kernel.

    gate: "renorm" (the top-k probabilities renormalised: 1 for k = 1, so the task loss sends the router no
    gradient), "softmax" (Switch: the raw probability of each chosen expert), "straight_through" (renorm's
    values, with the gradient of the chosen probabilities: g + (p - p.detach()), which unlike g p / p.detach()
    stays finite when a probability underflows to 0). The balance loss uses this
    call's own counts: no collective here (a forward that all-reduces hangs as soon as the processes do not
    all run it, e.g. in evaluation); see balance_loss_over_blocks.
    """
    expert_idx, gates, counts, mean_prob, z_loss = gating_fn(logits, top_k)
    if gate != "renorm":
        chosen = logits.float().softmax(dim=-1).gather(1, expert_idx)                 # (T, k) probabilities
        gates = chosen if gate == "softmax" else gates.detach() + (chosen - chosen.detach())  # + exactly 0
    return Routing(expert_idx, gates, switch_balance_loss(counts, mean_prob), z_loss, counts, mean_prob)


class PhysicsRouter(nn.Module):
    """pi = softmax(W_r [z || s] + b_r): one linear layer over each token and its image's descriptors s
    (section 2: router_features(sar_descriptors(x)), computed once per image in Segmenter.forward)."""

    def __init__(self, dim, descriptor_dim, n_experts):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim + descriptor_dim, n_experts)

    def forward(self, z, s):
        """z: (B, N, D) tokens, s: (B, 3) router features or None -> logits (B*N, E) float32."""
        with torch.autocast(z.device.type, enabled=False):
            W, b = self.linear.weight.float(), self.linear.bias.float()
            logits = F.linear(z.float(), W[:, : self.dim], b)                  # (B, N, E)
            if s is not None:
                # W [z || s] = W_z z + W_s s: add the per-image descriptor term without tiling s over tokens
                logits = logits + F.linear(s.float(), W[:, self.dim :])[:, None]  # (B, 1, E) broadcast
        return logits.flatten(0, 1)                                            # (T, E)


# -----------------------------------------------------------------------------
# 5. The sparse MoE FFN
#
# Experts are stored stacked: w1 (E, D, Dh), b1 (E, Dh), w2 (E, Dh, D), b2 (E, D); expert e computes
# gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e], the same function as the dense Mlp with fc1.weight = w1[e].T.
# A dispatch sends each token to its k experts and sums the gated outputs:
#   y[t] = sum_j gates[t, j] * expert_{expert_idx[t, j]}(x[t])
# dispatch_reference loops over the experts (obviously correct); dispatch_sorted is the fast path
# (megablocks' decomposition): permute the tokens so each expert's rows are contiguous, run all
# experts as one grouped matmul, combine back. permute / combine / gating below are the references of
# the csrc/ kernels, which the fast path uses on the devices where the extension runs.


def expert_ffn(x, w1, b1, w2, b2):
    """One expert on a block of tokens. x: (n, D), w1: (D, Dh), b1: (Dh,), w2: (Dh, D), b2: (D,) -> (n, D)."""
    return torch.addmm(b2, F.gelu(torch.addmm(b1, x, w1)), w2)


def dispatch_reference(x, expert_idx, gates, w1, b1, w2, b2):
    """For each expert, gather its tokens, run it, scatter-add the gated output.
    x: (T, D), expert_idx: (T, k) int64, gates: (T, k) -> (T, D)."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(expert_idx == e)            # (n_e,), (n_e,)
        out = expert_ffn(x[token], w1[e], b1[e], w2[e], b2[e])  # (n_e, D)
        y = y.index_add(0, token, out * gates[token, slot, None].to(out.dtype))
    return y


def permute(x, expert_idx, n_experts):
    """Reference permute (csrc/permute*): copy token rows into an expert-contiguous buffer.

    x: (T, D), expert_idx: (T, k) int64 -> x_sorted (T*k, D), order (T*k,) int64, counts (E,) int64.
    Assignment a = t*k + j is token t's j-th expert; sorted row r holds assignment order[r], rows of
    expert e are counts[:e].sum() ... counts[:e+1].sum() - 1, in token order within an expert (stable).

    Example, 5 tokens, k = 1, 3 experts: expert 0 gets tokens 1 and 4 (rows 0-1), expert 1 token 3 (row 2),
    expert 2 tokens 0 and 2 (rows 3-4); offsets = counts.cumsum(0), the end rows grouped_linear takes:

    >>> x_sorted, order, counts = permute(torch.arange(5.0)[:, None], torch.tensor([[2], [0], [2], [1], [0]]), 3)
    >>> order.tolist(), counts.tolist(), counts.cumsum(0).tolist(), x_sorted[:, 0].tolist()
    ([1, 4, 3, 0, 2], [2, 1, 2], [2, 3, 5], [1.0, 4.0, 3.0, 0.0, 2.0])
    """
    k = expert_idx.shape[1]
    order = torch.argsort(expert_idx.reshape(-1), stable=True)     # (T*k,) assignments grouped by expert
    return x[order // k], order, tokens_per_expert(expert_idx, n_experts)


def combine(expert_out, gates, order):
    """Reference combine (csrc/combine*): gated sum of each token's k expert outputs, in token order.
    expert_out: (T*k, D) sorted rows, gates: (T, k), order: (T*k,) -> y (T, D), y[t] = sum_j g[t, j] out[t*k+j]."""
    T, k = gates.shape
    weighted = expert_out * gates.reshape(-1)[order, None].to(expert_out.dtype)  # (T*k, D)
    return expert_out.new_zeros(T, expert_out.shape[1]).index_add(0, order // k, weighted)


def dispatch_sorted(x, expert_idx, gates, w1, b1, w2, b2, kernels=False):
    """permute -> all experts as grouped matmuls -> combine; with kernels, permute and combine are the
    extension's. x: (T, D), expert_idx: (T, k) int64, gates: (T, k) -> (T, D), as dispatch_reference.

    Every host read (on CUDA, a sync) is inside an operator, so torch.compile takes this function whole,
    with no graph break. On CUDA, per call: with kernels, 1 in the forward (permute's check of the expert
    ids; combine skips its check of order, which permute made); off the torch._grouped_mm path (bf16 on
    sm90+), grouped_linear's segment sizes, 2 more in the forward and 4 in the backward (test_ops.py).
    """
    permute_fn = moe_ops.permute if kernels else permute
    # order comes from permute, a permutation: the kernel need not check it (on CUDA, a host read saved)
    combine_fn = functools.partial(moe_ops.combine, check_order=False) if kernels else combine
    x_sorted, order, counts = permute_fn(x, expert_idx, w1.shape[0])            # (T*k, D), (T*k,), (E,)
    offsets = counts.cumsum(0)                                                   # (E,) end row of each expert
    h = F.gelu(moe_ops.grouped_linear(x_sorted, w1, b1, offsets))                # (T*k, Dh)
    return combine_fn(moe_ops.grouped_linear(h, w2, b2, offsets), gates, order)  # (T, D)


class MoEFFN(nn.Module):
    """Physics-guided sparse MoE that replaces a block's FFN. (B, N, D), (B, 3) -> (B, N, D), Routing.

    The kernels' devices are chosen once, here (kernel_devices: where the extension runs for this E and
    k); forward only asks whether the input's device is one of them.
    """

    def __init__(self, dim, hidden_dim, n_experts, top_k, descriptor_dim, dispatch="fast", gate="renorm"):
        super().__init__()
        self.top_k, self.gate = top_k, gate
        self.reference = dispatch == "reference"
        self.kernel_devices = frozenset() if self.reference else moe_ops.kernel_devices(n_experts, top_k)
        self.router = PhysicsRouter(dim, descriptor_dim, n_experts)
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(n_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(n_experts, dim))
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def forward(self, z, s=None):
        B, N, D = z.shape
        kernels = z.device.type in self.kernel_devices
        routing = route(self.router(z, s), self.top_k, moe_ops.gating if kernels else gating, self.gate)  # (T, k)
        x, weights = z.reshape(B * N, D), (self.w1, self.b1, self.w2, self.b2)  # (T, D)
        if torch.is_autocast_enabled(z.device.type):    # raw matmuls below: cast as autocast would
            dtype = torch.get_autocast_dtype(z.device.type)
            x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        if self.reference:
            y = dispatch_reference(x, routing.expert_idx, routing.gates, *weights)
        else:
            y = dispatch_sorted(x, routing.expert_idx, routing.gates, *weights, kernels=kernels)
        return y.view(B, N, D), routing


# -----------------------------------------------------------------------------
# 6. Transformer block and the DINOv2-layout ViT backbone


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x), s)); ffn is MoE or dense."""

    def __init__(self, cfg, drop_path_rate):
        super().__init__()
        D = cfg.embed_dim
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads)
        self.ls1 = LayerScale(D, cfg.layerscale_init) if cfg.layerscale_init > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        if cfg.n_experts > 1:
            self.mlp = MoEFFN(D, cfg.hidden_dim, cfg.n_experts, cfg.top_k, cfg.descriptor_dim, cfg.moe_dispatch,
                              cfg.gate)
        else:
            self.mlp = Mlp(D, cfg.hidden_dim)
        self.ls2 = LayerScale(D, cfg.layerscale_init) if cfg.layerscale_init > 0 else nn.Identity()

    def forward(self, x, s=None):
        """x: (B, N, D), s: (B, 3) router features or None -> (B, N, D), Routing or None (dense)."""
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        if isinstance(self.mlp, MoEFFN):
            y, routing = self.mlp(self.norm2(x), s)
        else:
            y, routing = self.mlp(self.norm2(x)), None
        return x + drop_path(self.ls2(y), self.drop_path_rate, self.training), routing


def resize_pos_embed(pos_embed, h, w, offset=0.0, antialias=False):
    """(1, 1 + g*g, D) position embedding -> (1, 1 + h*w, D): the cls position kept, the g x g grid resized
    bicubically, the way facebookresearch/dinov2 interpolates (interpolate_pos_encoding). offset > 0: by the
    scale factors ((h + offset) / g, (w + offset) / g), which sets where the output samples the grid (its
    original checkpoints: offset 0.1); offset 0: to the size (h, w) (its register checkpoints, antialias
    True). The native grid returns pos_embed itself. nanosar's own models use offset 0, no antialias."""
    g = int(math.sqrt(pos_embed.shape[1] - 1))
    if (h, w) == (g, g):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()         # (1, D, g, g)
    if offset:
        grid = F.interpolate(grid, scale_factor=((h + offset) / g, (w + offset) / g), mode="bicubic",
                             antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)  # align_corners False
    if grid.shape[-2:] != (h, w):
        raise ValueError(f"resizing a {g}x{g} position grid to {h}x{w} with offset {offset} gave {tuple(grid.shape[-2:])}")
    return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)], dim=1)


class SARViT(nn.Module):
    """DINOv2-layout ViT with physics-guided MoE FFNs. Parameter names follow facebookresearch/dinov2."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, D, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))  # cls + grid x grid patches
        R = cfg.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, R, D)) if R else None
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.grad_checkpointing = False  # recompute each block in the backward pass (train.py act_ckpt)
        self.apply(_init_linear)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def forward(self, x, s=None):
        """x: (B, C, H, W) normalised pixels, s: (B, 3) router features or None.

        Returns the 4 feature maps of cfg.feature_layers after the final norm, each (B, D, H/p, W/p),
        and the list of per-block Routing (empty for the dense ViT).
        """
        B, _, H, W = x.shape
        h, w = H // self.cfg.patch_size, W // self.cfg.patch_size
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)              # (B, h*w, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)          # (B, 1 + h*w, D)
        x = x + resize_pos_embed(self.pos_embed, h, w)                       # DINOv2 interpolation
        if self.register_tokens is not None:                                 # registers sit after cls, no pos
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        n_prefix = 1 + self.cfg.num_register_tokens
        taps, routings = {}, []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x, routing = torch.utils.checkpoint.checkpoint(block, x, s, use_reentrant=False)
            else:
                x, routing = block(x, s)
            if routing is not None:
                routings.append(routing)
            if i in self.cfg.feature_layers:
                patches = self.norm(x)[:, n_prefix:]                         # (B, h*w, D)
                taps[i] = patches.transpose(1, 2).reshape(B, -1, h, w)       # (B, D, h, w)
        return [taps[i] for i in self.cfg.feature_layers], routings


def _init_linear(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# 7. Segmentation head and the Segmenter
#
# The paper uses Mask2Former (MSDeformAttn pixel decoder, 9 decoder layers, Hungarian matching). nanosar
# uses a compact UperNet-style FPN instead: a few hundred thousand to a few million parameters, no custom
# deformable-attention kernels or matching, per-pixel cross-entropy, and it reads in one screen. The DG
# protocol freezes the backbone, so the head only has to be a fair, identical probe for every backbone.


def conv_gn_relu(c_in, c_out, k):
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
    return nn.Sequential(conv, nn.GroupNorm(8, c_out), nn.ReLU(inplace=True))


class FPNHead(nn.Module):
    """4 ViT maps at stride p -> pyramid at strides p/4, p/2, p, 2p -> FPN -> fused logits at stride p/4."""

    def __init__(self, in_dim, dim, num_classes):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(in_dim, dim, 1) for _ in range(4))
        up2 = lambda: nn.ConvTranspose2d(dim, dim, 2, stride=2)  # noqa: E731
        # ViTDet-style simple pyramid from a plain ViT: x4, x2, x1, /2
        self.resample = nn.ModuleList(
            [nn.Sequential(up2(), nn.GroupNorm(8, dim), nn.GELU(), up2()), up2(), nn.Identity(), nn.MaxPool2d(2)]
        )
        self.smooth = nn.ModuleList(conv_gn_relu(dim, dim, 3) for _ in range(4))
        self.fuse = conv_gn_relu(4 * dim, dim, 3)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features):
        """features: 4 x (B, D, h, w) -> logits (B, K, 4h, 4w)."""
        levels = [res(lat(f)) for f, lat, res in zip(features, self.lateral, self.resample)]  # strides p/4..2p
        for i in range(len(levels) - 1, 0, -1):                         # top-down: coarse adds into fine
            finer = levels[i - 1]
            levels[i - 1] = finer + F.interpolate(levels[i], size=finer.shape[-2:], mode="bilinear")
        size = levels[0].shape[-2:]
        levels = [F.interpolate(sm(lv), size=size, mode="bilinear") for sm, lv in zip(self.smooth, levels)]
        return self.classifier(self.fuse(torch.cat(levels, dim=1)))    # (B, K, 4h, 4w)

    def macs(self, h, w):
        """Multiply-accumulates of one forward on 4 maps of h x w, each convolution at its own resolution:
        its kernel's weights times its output pixels (the x2 transposed convolutions: their input pixels)."""
        weights = lambda m: sum(p.numel() for p in m.parameters() if p.ndim == 4)  # noqa: E731  conv kernels
        pixels = [4 * h * 4 * w, 2 * h * 2 * w, h * w, (h // 2) * (w // 2)]      # the pyramid, strides p/4..2p
        up_x4, up_x2 = self.resample[0], self.resample[1]
        return (weights(self.lateral) * h * w                                    # 1x1, at stride p
                + weights(up_x4[0]) * h * w + weights(up_x4[3]) * pixels[1] + weights(up_x2) * h * w
                + sum(weights(sm) * n for sm, n in zip(self.smooth, pixels))    # 3x3, at each level's stride
                + (weights(self.fuse) + weights(self.classifier)) * pixels[0])  # 3x3 and 1x1, at stride p/4


@dataclass
class SegmenterOutput:
    logits: torch.Tensor          # (B, K, H, W) class scores at input resolution
    aux_loss: torch.Tensor        # () balance_loss_weight * balance_loss + router_z_loss_weight * z_loss
    balance_loss: torch.Tensor    # () Switch balance loss, mean over MoE blocks (1.0 = uniform)
    z_loss: torch.Tensor          # () router z-loss, mean over MoE blocks
    expert_load: torch.Tensor     # (L, E) int64 assignments per expert in each MoE block; (0, 1) when dense
    descriptors: torch.Tensor     # (B, 3) raw [H_DE (nats), ENL, R_LR] per image
    router_prob: torch.Tensor     # (L, E) float32 mean router probability per expert in each MoE block (with
                                  # gradient); (0, 1) when dense. balance_loss_over_blocks(expert_load, router_prob)


def check_input(x, cfg):
    """Raise ValueError with a clear message unless x: (B, cfg.in_chans, H, W), H and W multiples of p.

    Shapes only, no look at the values (that would cost a host-device sync every forward): a NaN or inf
    pixel gives NaN outputs and losses, never a crash; values are checked where data enters from files.
    """
    names = f" {list(cfg.channels)}" if cfg.channels else ""
    what = f"{cfg.in_chans} channel(s){names} in unit {cfg.input_unit!r}"
    if x.ndim != 4 or x.shape[1] != cfg.in_chans:
        raise ValueError(f"model expects input (B, C, H, W) with {what}; got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % cfg.patch_size or W % cfg.patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {cfg.patch_size}; pad or crop it")
    if min(H, W) < 2 * cfg.roughness_block:
        raise ValueError(f"image size {H}x{W} is smaller than 2x2 roughness blocks of {cfg.roughness_block} pixels")
    if cfg.descriptors == "physical" and min(H, W) < 3 * cfg.multilook:
        raise ValueError(f"image size {H}x{W} is smaller than 3x3 multilook windows of {cfg.multilook} pixels")


class Segmenter(nn.Module):
    """Descriptors -> physics-guided MoE ViT -> FPN head. (B, C, H, W) in cfg.input_unit -> SegmenterOutput."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = SARViT(cfg)
        self.head = FPNHead(cfg.embed_dim, cfg.head_dim, cfg.num_classes)
        mean = torch.tensor(cfg.pixel_mean or [0.0] * cfg.in_chans).view(1, -1, 1, 1)
        std = torch.tensor(cfg.pixel_std or [1.0] * cfg.in_chans).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def forward(self, x):
        check_input(x, self.cfg)
        if self.cfg.descriptors == "given" and self.cfg.descriptor_dim:
            raise ValueError("this model's router reads inputs its caller supplies (descriptors='given'): call "
                             "forward_prepared(x_norm, s_raw, router_input)")
        s_raw = sar_descriptors(x, self.cfg)                                   # (B, 3)
        return self.forward_prepared((x - self.pixel_mean) / self.pixel_std, s_raw)

    def forward_prepared(self, x, s_raw, router_input=None):
        """The rest of forward, for pixels x (B, C, H, W) already normalised and descriptors s_raw (B, 3)
        already computed: for batches mixing units, whose normalisation and descriptors depend on each
        tile's unit (nanosar/ablation.py's pre-training corpus). router_input (B, descriptor_dim): what
        the router reads beside each token when cfg.descriptors is "given" (the ablation's oracle: the
        tile's true domain factors), instead of router_features(s_raw). -> SegmenterOutput."""
        cfg = self.cfg
        if (router_input is not None) != (cfg.descriptors == "given" and cfg.descriptor_dim > 0):
            raise ValueError("router_input is for models with descriptors='given' (and descriptor_dim > 0), "
                             f"which need it; this one has descriptors={cfg.descriptors!r}, "
                             f"descriptor_dim={cfg.descriptor_dim}")
        if router_input is not None and router_input.shape != (x.shape[0], cfg.descriptor_dim):
            raise ValueError(f"router_input must be (B, descriptor_dim) = ({x.shape[0]}, {cfg.descriptor_dim}), "
                             f"got {tuple(router_input.shape)}")
        s = router_input if router_input is not None else router_features(s_raw, cfg) if cfg.descriptor_dim else None
        features, routings = self.backbone(x, s)
        logits = self.head(features)                                           # (B, K, 4H/p, 4W/p)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear")     # (B, K, H, W)
        if routings:
            balance = torch.stack([r.balance_loss for r in routings]).mean()
            z_loss = torch.stack([r.z_loss for r in routings]).mean()
            load = torch.stack([r.tokens_per_expert for r in routings])        # (L, E)
            router_prob = torch.stack([r.mean_prob for r in routings])         # (L, E)
        else:
            balance = z_loss = logits.new_zeros(())
            load = torch.zeros(0, 1, dtype=torch.long, device=x.device)
            router_prob = torch.zeros(0, 1, device=x.device)
        aux = cfg.balance_loss_weight * balance + cfg.router_z_loss_weight * z_loss
        return SegmenterOutput(logits, aux, balance, z_loss, load, s_raw, router_prob)

    def flops_per_tile(self, trainable_backbone=True):
        """Approximate training FLOPs per tile, for train.py's MFU estimate: the backbone's 6 x active parameters
        x tokens (2x for a frozen backbone) plus attention scores, and the head's 6 x its multiply-accumulates,
        each convolution at its own resolution (FPNHead.macs: the fuse conv at stride p/4 dominates)."""
        cfg, counts = self.cfg, self.parameter_counts()
        grid = cfg.img_size // cfg.patch_size
        tokens = 1 + cfg.num_register_tokens + grid**2
        backbone = (6 if trainable_backbone else 2) * counts["backbone_active"] * tokens
        attention = (3 if trainable_backbone else 1) * 4 * cfg.depth * cfg.embed_dim * tokens**2
        return backbone + attention + 6 * self.head.macs(grid, grid)

    def parameter_counts(self):
        """Parameters: total, active per token (top_k of n_experts experts), backbone and head split."""
        total = sum(p.numel() for p in self.parameters())
        head = sum(p.numel() for p in self.head.parameters())
        inactive = 0
        for block in self.backbone.blocks:
            if isinstance(block.mlp, MoEFFN):
                expert_params = sum(p.numel() for p in (block.mlp.w1, block.mlp.b1, block.mlp.w2, block.mlp.b2))
                E = block.mlp.w1.shape[0]
                inactive += expert_params * (E - block.mlp.top_k) // E
        return dict(
            total=total,
            active=total - inactive,
            backbone_total=total - head,
            backbone_active=total - head - inactive,
            head=head,
        )


def weight_decay_groups(module, weight_decay):
    """AdamW parameter groups of a module's trainable parameters: weight decay on matrices and conv kernels,
    none on norms, biases, LayerScale and the embeddings (pos_embed, cls_token, register_tokens)."""
    decay, no_decay, embeddings = [], [], ("pos_embed", "cls_token", "register_tokens")
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(embeddings) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
