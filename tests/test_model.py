"""Tests of nanosar/model.py: presets, parameter arithmetic, routing and dispatch, descriptors, upcycling."""

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanosar.model import (
    PRESETS,
    Mlp,
    MoEFFN,
    SARConfig,
    Segmenter,
    balance_loss_over_blocks,
    directional_entropy,
    dispatch_reference,
    dispatch_sorted,
    equivalent_number_of_looks,
    gating,
    local_roughness,
    physical_descriptors,
    resize_pos_embed,
    router_features,
    route,
    sar_descriptors,
    sar_magnitude,
    switch_balance_loss,
)
from nanosar.dinov2 import POS_EMBED_INTERPOLATION, adapt_patch_embed, upcycle_from_dinov2

# -----------------------------------------------------------------------------
# config and presets


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(top_k=7), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(input_unit="complex", in_chans=1), "complex"),
        (dict(input_unit="sigma0"), "input_unit"),
        (dict(img_size=500), "patch"),
        (dict(moe_dispatch="grouped"), "moe_dispatch"),
        (dict(balance_loss_weight=-1.0), "loss weights"),
        (dict(feature_layers=(0, 1, 2, 12)), "feature_layers"),
        (dict(channels=("VV", "VH")), "channels"),
        (dict(pixel_std=(0.0,)), "pixel_std"),
        (dict(descriptor_dim=2), "descriptor_dim must be 0"),
        (dict(descriptors="learned"), "descriptors must be"),
        (dict(descriptors="given", descriptor_dim=0), "needs descriptor_dim >= 1"),
        (dict(descriptor_mean=(0.0, 1.0)), "descriptor_mean and descriptor_std"),
        (dict(descriptor_mean=(0.0,) * 3, descriptor_std=(1.0, 0.0, 1.0)), "descriptor_std must be positive"),
        (dict(multilook=0), "multilook"),
    ],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        SARConfig.preset("small", **overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="tiny"):
        SARConfig.preset("huge")


def test_default_feature_layers():
    assert SARConfig.preset("small").feature_layers == (2, 5, 8, 11)
    assert SARConfig.preset("large").feature_layers == (5, 11, 17, 23)


# -----------------------------------------------------------------------------
# forward and backward of every preset


@pytest.mark.parametrize("name, size", [("tiny", 64), ("small", 112)])
def test_forward_backward_cpu(name, size):
    torch.manual_seed(0)
    cfg = SARConfig.preset(name, input_unit="intensity")
    model = Segmenter(cfg)
    x = torch.rand(2, 1, size, size) * 0.1                       # linear intensity
    out = model(x)
    assert out.logits.shape == (2, cfg.num_classes, size, size)
    assert out.expert_load.shape == (cfg.depth, cfg.n_experts)
    tokens = 2 * (1 + (size // cfg.patch_size) ** 2)
    assert (out.expert_load.sum(dim=1) == tokens * cfg.top_k).all()
    (F.cross_entropy(out.logits, torch.randint(0, 7, (2, size, size))) + out.aux_loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert grads["backbone.blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["backbone.blocks.0.mlp.router.linear.weight"].abs().sum() > 0  # through the aux losses
    assert grads["head.classifier.weight"].abs().sum() > 0


def test_dense_variant_and_registers_and_drop_path():
    cfg = SARConfig.preset("tiny", n_experts=1, num_register_tokens=4, drop_path_rate=0.2)
    model = Segmenter(cfg).train()
    out = model(torch.randn(2, 1, 64, 64))
    assert isinstance(model.backbone.blocks[0].mlp, Mlp)
    assert out.aux_loss.item() == 0.0 and out.expert_load.shape == (0, 1)
    out.logits.sum().backward()
    assert model.backbone.register_tokens.grad.abs().sum() > 0


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = Segmenter(SARConfig.preset("tiny")).eval()
    x = torch.randn(2, 1, 64, 64) * 3 - 12                    # dB
    with torch.no_grad():
        ref = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


# -----------------------------------------------------------------------------
# parameter counts against the arithmetic of the architecture


def architecture_arithmetic(cfg):
    """Parameter counts from the formulas (independent of the modules): (backbone total, backbone active)."""
    D, Dh, E, k, C, p = cfg.embed_dim, cfg.hidden_dim, cfg.n_experts, cfg.top_k, cfg.in_chans, cfg.patch_size
    grid = cfg.img_size // p
    embed = C * p * p * D + D + D + (1 + grid * grid) * D + cfg.num_register_tokens * D  # patch, cls, pos, reg
    attention = 3 * D * D + 3 * D + D * D + D
    norms_and_scales = 2 * 2 * D + 2 * D
    expert = D * Dh + Dh + Dh * D + D
    router = (D + cfg.descriptor_dim) * E + E
    block_total = attention + norms_and_scales + E * expert + router
    block_active = block_total - (E - k) * expert
    final_norm = 2 * D
    return (embed + cfg.depth * block_total + final_norm, embed + cfg.depth * block_active + final_norm)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_match_arithmetic(name):
    cfg = SARConfig.preset(name)
    with torch.device("meta"):
        counts = Segmenter(cfg).parameter_counts()
    total, active = architecture_arithmetic(cfg)
    print(f"{name}: backbone {counts['backbone_total'] / 1e6:.1f}M total, "
          f"{counts['backbone_active'] / 1e6:.1f}M active, head {counts['head'] / 1e6:.2f}M")
    assert counts["backbone_total"] == total
    assert counts["backbone_active"] == active
    assert counts["total"] == counts["backbone_total"] + counts["head"]


@pytest.mark.parametrize("name, paper_total, paper_active", [("small", 90e6, 20e6), ("large", 1.3e9, 300e6)])
def test_parameter_counts_near_paper(name, paper_total, paper_active):
    with torch.device("meta"):
        counts = Segmenter(SARConfig.preset(name)).parameter_counts()
    assert abs(counts["backbone_total"] / paper_total - 1) < 0.10
    assert abs(counts["backbone_active"] / paper_active - 1) < 0.10


def test_base_is_370M_not_300M():
    """6 full-size experts on ViT-B: ~370M total (the paper quotes 300M), active = dense ViT-B ~86M."""
    with torch.device("meta"):
        counts = Segmenter(SARConfig.preset("base")).parameter_counts()
    assert 360e6 < counts["backbone_total"] < 380e6
    assert 84e6 < counts["backbone_active"] < 88e6


def conv_macs_of_a_forward(module, run):
    """Multiply-accumulates of every convolution in module during run(), counted by forward hooks from the
    shapes it really ran at: Conv2d out pixels x Cout x Cin x kh x kw, ConvTranspose2d in pixels x the same."""
    macs = []

    def hook(m, inputs, out):
        c_in, c_out, kernel = inputs[0].shape[1], out.shape[1], m.kernel_size[0] * m.kernel_size[1]
        pixels = inputs[0].shape[-2:] if isinstance(m, torch.nn.ConvTranspose2d) else out.shape[-2:]
        macs.append(out.shape[0] * pixels[0] * pixels[1] * c_out * c_in // m.groups * kernel)

    convs = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return sum(macs)


@pytest.mark.parametrize("h, w", [(8, 8), (6, 5)])
def test_head_macs_count_each_layer_at_its_resolution(h, w):
    """FPNHead.macs equals what its convolutions compute in a real forward (the fuse conv at stride p/4,
    16x the patch grid, is most of it), and flops_per_tile = backbone + attention + 6 x the head's."""
    cfg = SARConfig.preset("tiny")
    model = Segmenter(cfg)
    features = [torch.randn(2, cfg.embed_dim, h, w) for _ in range(4)]
    counted = conv_macs_of_a_forward(model.head, lambda: model.head(features)) // 2   # per tile
    assert model.head.macs(h, w) == counted
    fuse = sum(p.numel() for p in model.head.fuse.parameters() if p.ndim == 4) * 16 * h * w
    assert 0.5 < fuse / counted < 1
    grid = cfg.img_size // cfg.patch_size
    tokens, active = 1 + grid**2, model.parameter_counts()["backbone_active"]
    attention = 3 * 4 * cfg.depth * cfg.embed_dim * tokens**2
    head = conv_macs_of_a_forward(model.head, lambda: model(torch.randn(1, 1, cfg.img_size, cfg.img_size)))
    assert model.flops_per_tile() == 6 * active * tokens + attention + 6 * head


# -----------------------------------------------------------------------------
# routing, losses, dispatch


def test_gates_sum_to_one_and_top1_gate_is_one():
    logits = torch.randn(100, 6)
    for k in (1, 2, 3):
        r = route(logits, k)
        assert r.expert_idx.shape == (100, k) and torch.allclose(r.gates.sum(-1), torch.ones(100))
        assert (r.expert_idx[:, 0] == logits.argmax(-1)).all()
        assert r.tokens_per_expert.sum() == 100 * k
    assert (route(logits, 1).gates == 1.0).all()


def test_balance_loss_uniform_is_one_and_grows_under_collapse():
    E, T = 6, 600
    preferred = torch.arange(T) % E
    losses = []
    for margin in (1e-4, 1.0, 3.0, 10.0):
        logits = torch.zeros(T, E)
        logits[torch.arange(T), preferred] = 1e-4              # each expert gets T/E tokens, p ~ 1/E
        logits[:, 0] += margin - 1e-4 if margin > 1e-4 else 0  # then push everything towards expert 0
        losses.append(route(logits, 1).balance_loss.item())
    assert losses[0] == pytest.approx(1.0, abs=1e-3)
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert losses[-1] == pytest.approx(E, rel=1e-3)             # f_0 = 1, p_0 ~ 1: loss -> E


def test_z_loss_golden():
    assert route(torch.zeros(10, 6), 1).z_loss.item() == pytest.approx(math.log(6) ** 2, rel=1e-6)


def test_balance_loss_from_outputs_equals_the_models_and_trains_the_router():
    """train.py's DDP recipe on one process: balance_loss_over_blocks(expert_load, router_prob) = balance_loss."""
    torch.manual_seed(0)
    cfg = SARConfig.preset("tiny", top_k=2)
    model = Segmenter(cfg)
    out = model(torch.randn(2, 1, 64, 64) * 3 - 12)
    assert out.router_prob.shape == (cfg.depth, cfg.n_experts) and out.router_prob.dtype == torch.float32
    torch.testing.assert_close(out.router_prob.sum(dim=1), torch.ones(cfg.depth))  # mean of softmax rows
    loss = balance_loss_over_blocks(out.expert_load, out.router_prob)
    torch.testing.assert_close(loss, out.balance_loss)
    router = model.backbone.blocks[1].mlp.router.linear.weight
    (grad,) = torch.autograd.grad(loss, router, retain_graph=True)
    (expected,) = torch.autograd.grad(out.balance_loss, router)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected)
    dense = Segmenter(SARConfig.preset("tiny", n_experts=1))(torch.randn(1, 1, 64, 64))
    assert dense.router_prob.shape == (0, 1)
    assert balance_loss_over_blocks(dense.expert_load, dense.router_prob).item() == 0.0


def test_switch_balance_loss_is_batched_over_blocks():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (4, 6), generator=g)
    mean_prob = torch.rand(4, 6, generator=g).softmax(dim=1)
    per_block = torch.stack([switch_balance_loss(c, p) for c, p in zip(counts, mean_prob)])
    torch.testing.assert_close(switch_balance_loss(counts, mean_prob), per_block)
    torch.testing.assert_close(balance_loss_over_blocks(counts, mean_prob), per_block.mean())
    uniform = torch.full((3, 6), 10), torch.full((3, 6), 1 / 6)
    assert balance_loss_over_blocks(*uniform).item() == pytest.approx(1.0)


def test_forward_issues_no_collective(monkeypatch):
    """Counts are all-reduced by the training script, never inside the forward (DDP evaluation hung on it)."""
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("the model's forward called a torch.distributed collective")

    for name in ("all_reduce", "all_gather", "broadcast", "reduce"):
        monkeypatch.setattr(dist, name, forbidden)
    model = Segmenter(SARConfig.preset("tiny", top_k=2))
    assert not hasattr(model.backbone.blocks[0].mlp, "count_group")
    out = model(torch.randn(1, 1, 64, 64))
    (out.logits.mean() + out.aux_loss).backward()


def test_reference_gating_non_finite_rule():
    """The documented rule (the kernels are held to it in test_ops.py): stable descending order with NaN
    counted as +inf, ids always valid, NaN surfaces in gates, mean_prob and z-loss instead of being masked."""
    inf, nan = float("inf"), float("nan")
    idx, gates, counts, mean_prob, z = gating(torch.tensor([[0.0, -inf, -inf]]), 2)
    assert idx.tolist() == [[0, 1]] and gates.tolist() == [[1.0, 0.0]] and counts.tolist() == [1, 1, 0]
    assert torch.isfinite(mean_prob).all() and torch.isfinite(z)
    idx, gates, counts, mean_prob, z = gating(torch.tensor([[1.0, nan, 3.0, nan], [1.0, inf, -inf, 2.0]]), 2)
    assert idx.tolist() == [[1, 3], [1, 3]] and counts.tolist() == [0, 2, 0, 2]
    assert gates.isnan().all() and mean_prob.isnan().all() and z.isnan()
    idx, gates, counts, _, z = gating(torch.tensor([[-inf, -inf, -inf]]), 2)
    assert idx.tolist() == [[0, 1]] and gates.isnan().all() and z.item() == inf  # logsumexp = -inf
    idx, gates, _, _, z = gating(torch.tensor([[1.0, inf, 0.0]]), 1)
    assert idx.tolist() == [[1]] and gates.isnan().all() and z.item() == inf
    nan_of_both_signs = torch.tensor([[2.0, nan, inf, -nan]])
    assert gating(nan_of_both_signs, 3)[0].tolist() == [[1, 2, 3]]   # NaN = +inf, ties by id, sign ignored


def random_experts(E, D, Dh, dtype=torch.float64):
    g = torch.Generator().manual_seed(E)
    return [(torch.randn(*shape, generator=g, dtype=dtype) * 0.3).requires_grad_()
            for shape in ((E, D, Dh), (E, Dh), (E, Dh, D), (E, D))]


@pytest.mark.parametrize("E, k, T", [(1, 1, 7), (6, 1, 33), (6, 2, 33), (64, 2, 50), (16, 1, 5)])
def test_sorted_dispatch_equals_reference(E, k, T):
    """Values and gradients (x, gates, all expert weights) agree; includes experts that receive no tokens."""
    torch.manual_seed(0)
    D, Dh = 8, 12
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    r = route(torch.randn(T, E), k)
    gates = r.gates.double().requires_grad_()
    weights = random_experts(E, D, Dh)
    outputs, grads = [], []
    for dispatch in (dispatch_reference, dispatch_sorted):
        y = dispatch(x, r.expert_idx, gates, *weights)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, D, dtype=y.dtype)).sum(), [x, gates, *weights],
                                allow_unused=False)
        outputs.append(y)
        grads.append(g)
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    if E > T:
        assert (r.tokens_per_expert == 0).any()


def test_dispatch_golden_value():
    """Two experts that scale by 2 and 3 (identity FFN weights through GELU on positive inputs)."""
    D = 2
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w1 = torch.stack([torch.eye(D), torch.eye(D)]) * 10         # gelu(10 x) ~ 10 x for x >= 1
    w2 = torch.stack([torch.eye(D) * 0.2, torch.eye(D) * 0.3])
    b1, b2 = torch.zeros(2, D), torch.zeros(2, D)
    idx, gates = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    for dispatch in (dispatch_reference, dispatch_sorted):
        y = dispatch(x, idx, gates, w1, b1, w2, b2)
        torch.testing.assert_close(y, torch.tensor([[2.75, 5.5], [9.0, 12.0]]))


def test_moe_with_one_expert_equals_dense_ffn():
    torch.manual_seed(0)
    D, Dh = 16, 64
    dense = Mlp(D, Dh)
    for dispatch in ("reference", "fast"):
        moe = MoEFFN(D, Dh, n_experts=1, top_k=1, descriptor_dim=3, dispatch=dispatch)
        with torch.no_grad():
            moe.w1.copy_(dense.fc1.weight.t()[None])
            moe.b1.copy_(dense.fc1.bias[None])
            moe.w2.copy_(dense.fc2.weight.t()[None])
            moe.b2.copy_(dense.fc2.bias[None])
        z = torch.randn(2, 10, D)
        y, routing = moe(z, torch.randn(2, 3))
        torch.testing.assert_close(y, dense(z))
        assert routing.balance_loss.item() == pytest.approx(1.0)


def test_router_uses_descriptors():
    """Same tokens, different descriptors -> different routing (the physics term reaches the logits)."""
    torch.manual_seed(0)
    moe = MoEFFN(8, 16, n_experts=6, top_k=1, descriptor_dim=3)
    with torch.no_grad():
        moe.router.linear.weight[:, 8:] = torch.randn(6, 3) * 10
    z = torch.randn(1, 50, 8).expand(2, -1, -1)
    _, routing = moe(z, torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]]))
    idx = routing.expert_idx.view(2, 50)
    assert (idx[0] != idx[1]).any()


# -----------------------------------------------------------------------------
# descriptors: golden values


def test_db_to_linear_magnitude():
    x = torch.full((1, 1, 4, 4), -20.0)
    assert torch.allclose(sar_magnitude(x, "db"), torch.full((1, 4, 4), 0.01))
    c = torch.stack([torch.full((4, 4), 3.0), torch.full((4, 4), 4.0)])[None]
    assert torch.allclose(sar_magnitude(c, "complex"), torch.full((1, 4, 4), 5.0))


@pytest.mark.parametrize("looks", [1, 4, 10])
def test_enl_of_gamma_speckle_is_the_number_of_looks(looks):
    """L-look intensity speckle ~ Gamma(L, mean/L): ENL on linear intensity ~ L."""
    gamma = torch.distributions.Gamma(torch.tensor(float(looks)), torch.tensor(float(looks)))
    torch.manual_seed(looks)
    intensity = 0.01 * gamma.sample((4, 256, 256))             # (B, H, W), mean sigma0 = 0.01 (-20 dB)
    enl = equivalent_number_of_looks(intensity)
    assert torch.allclose(enl, torch.full((4,), float(looks)), rtol=0.05)
    # the paper computes it after log(1+|x|): for small linear intensities log1p ~ identity, ENL stays ~ L
    # (+2% at a mean of 0.01 and 1 look, +9% at 0.05: the log shrinks the bright tail)
    assert torch.allclose(equivalent_number_of_looks(torch.log1p(intensity)), enl, rtol=0.05)
    # for DN-scale values (x ~ 1000) log compresses the spread: a texture statistic far above L
    assert (equivalent_number_of_looks(torch.log1p(1e4 * intensity)) > 10 * looks).all()


def test_directional_entropy_isotropic_noise_is_maximal():
    torch.manual_seed(0)
    noise = torch.log1p(torch.distributions.Exponential(1.0).sample((2, 128, 128)))
    h = directional_entropy(noise, 18)
    assert (h > 0.99 * math.log(18)).all() and (h <= math.log(18) + 1e-6).all()


@pytest.mark.parametrize("angle_deg", [0, 45, 90])
def test_directional_entropy_straight_edge_is_small(angle_deg):
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    a = math.radians(angle_deg)
    edge = ((xx - 32) * math.cos(a) + (yy - 32) * math.sin(a) > 0).float()[None]  # one straight edge
    assert directional_entropy(edge, 18).item() < 0.1 * math.log(18)
    assert directional_entropy(torch.zeros(1, 16, 16), 18).item() == 0.0


def test_local_roughness_golden_values():
    assert local_roughness(torch.full((2, 32, 32), 3.7), 8).abs().max().item() < 1e-10
    halves = torch.zeros(1, 4, 4)
    halves[:, :, 2:] = 1.0                                      # 2x2 blocks with means 0, 1, 0, 1
    assert local_roughness(halves, 2).item() == pytest.approx(0.25)
    torch.manual_seed(0)
    speckle = torch.distributions.Exponential(1.0).sample((1, 64, 64))
    blocks = torch.where(torch.rand(1, 4, 4) > 0.5, 4.0, 0.25)                     # one level per 16x16 block
    patchy = speckle * blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    assert local_roughness(patchy, 16).item() > 10 * local_roughness(speckle, 16).item()


def test_directional_entropy_of_a_non_finite_pixel_is_nan_not_a_bad_index():
    img = torch.rand(2, 32, 32)
    img[0, 5, 7] = float("nan")                                # NaN.long() would be a garbage bin index
    img[1, 9, 9] = float("inf")
    h = directional_entropy(img, 18)
    assert h.isnan().all()


def test_sar_descriptors_batched_and_per_image():
    cfg = SARConfig.preset("tiny", input_unit="intensity")
    x = torch.rand(3, 1, 64, 64)
    s = sar_descriptors(x, cfg)
    assert s.shape == (3, 3)
    torch.testing.assert_close(s[1:2], sar_descriptors(x[1:2], cfg))  # no leakage across the batch


# -----------------------------------------------------------------------------
# the "physical" descriptor variant: golden images


def physical(x, unit="intensity", **overrides):
    return physical_descriptors(x, SARConfig(descriptors="physical", input_unit=unit, **overrides))


def gamma_speckle(looks, shape, seed):
    torch.manual_seed(seed)
    return torch.distributions.Gamma(torch.tensor(float(looks)), torch.tensor(float(looks))).sample(shape)


@pytest.mark.parametrize("looks", [1, 2, 4.4])
def test_physical_enl_of_a_homogeneous_area_is_the_number_of_looks(looks):
    """L-look speckle over one homogeneous area: the local ENL of the linear intensity is L within 5 %,
    whatever the sigma0 (scale-free), and the block means barely vary (coefficient of variation ~ 1 /
    sqrt(L * 256) for 16 x 16 blocks)."""
    intensity = 0.01 * gamma_speckle(looks, (2, 1, 256, 256), seed=int(10 * looks))   # sigma0 -20 dB
    entropy, enl, variation = physical(intensity).unbind(dim=1)
    torch.testing.assert_close(enl, torch.full((2,), float(looks)), rtol=0.05, atol=0)
    torch.testing.assert_close(physical(1e3 * intensity)[:, 1], enl, rtol=1e-5, atol=0)
    assert (variation < 2.0 / math.sqrt(looks * 256)).all()


def test_physical_enl_of_one_slc_part_is_one_half():
    """The real (or imaginary) part of a single-look complex image is Gaussian: its power x^2 has ENL 1/2,
    the amplitude of the same pixels ENL 1: the descriptor tells the representations apart by physics."""
    torch.manual_seed(1)
    re, im = torch.randn(2, 1, 1, 256, 256) * math.sqrt(0.01 / 2)
    assert physical(re, "real")[0, 1].item() == pytest.approx(0.5, rel=0.05)
    assert physical(torch.sqrt(re**2 + im**2), "amplitude")[0, 1].item() == pytest.approx(1.0, rel=0.05)


def test_physical_descriptors_of_a_constant_image_and_of_a_straight_edge():
    constant = torch.full((1, 1, 64, 64), 0.3)
    entropy, enl, variation = physical(constant)[0]
    assert entropy.item() == 0.0 and enl.item() == pytest.approx(1e8) and variation.item() == 0.0
    edge = torch.ones(1, 1, 128, 128)
    edge[..., 64:] = 10.0                                       # one straight edge, +10 dB
    assert physical(edge)[0, 0].item() < 0.1 * math.log(18)


def test_physical_entropy_sees_structure_not_speckle():
    """Isotropic speckle: orientations uniform (H_DE ~ ln 18) after multilooking too; a field of straight
    parallel stripes under the same 1-look speckle: the multilooked log intensity shows their one
    orientation, which the paper's definition on pixel-scale speckle misses."""
    speckle = gamma_speckle(1, (1, 1, 128, 128), seed=2)
    assert physical(speckle)[0, 0].item() > 0.97 * math.log(18)
    stripes = 1 + 9 * ((torch.arange(128) // 16) % 2).float()   # vertical stripes 16 px wide, 10 dB apart
    striped = speckle * stripes[None, None, None, :]
    assert physical(striped)[0, 0].item() < 0.5 * math.log(18)
    paper = sar_descriptors(striped, SARConfig(input_unit="intensity"))[0, 0].item()
    assert paper > 0.9 * math.log(18)


def test_physical_descriptors_are_the_same_in_every_detected_unit():
    """All three are scale-free: dB, intensity, amplitude and DN views of one image give the same values."""
    torch.manual_seed(3)
    db = torch.randn(2, 1, 64, 64) * 4 - 12
    views = {"db": db, "intensity": 10 ** (db / 10), "amplitude": 10 ** (db / 20), "dn": 316 * 10 ** (db / 20)}
    expected = physical(views["intensity"])
    for unit, x in views.items():
        torch.testing.assert_close(physical(x, unit), expected, rtol=1e-4, atol=1e-5)


def test_physical_descriptors_skip_no_data_and_show_nan():
    torch.manual_seed(4)
    image = gamma_speckle(1, (2, 1, 64, 64), seed=4) * 0.05
    bordered = image.clone()
    bordered[..., :16] = 0.0                                    # no-data: whole blocks and windows
    torch.testing.assert_close(physical(bordered), physical(image[..., 16:]), rtol=1e-5, atol=1e-6)
    broken = image.clone()
    broken[0, 0, 5, 7] = float("nan")
    broken[1, 0, 40, 3] = float("inf")
    assert physical(broken).isnan().all()


def test_router_features_standardise_with_the_stored_statistics():
    s = torch.tensor([[math.log(18) / 2, math.e, 1.0 - 1e-3]])  # H_DE = half of ln 18, ENL = e, R + 1e-3 = 1
    cfg = SARConfig(descriptors="physical")
    torch.testing.assert_close(router_features(s, cfg), torch.tensor([[0.5, 1.0, 0.0]]))
    cfg = SARConfig(descriptors="physical", descriptor_mean=(0.5, 2.0, -1.0), descriptor_std=(0.25, 0.5, 2.0))
    torch.testing.assert_close(router_features(s, cfg), torch.tensor([[0.0, -2.0, 0.5]]))


def test_a_given_router_input_is_required_and_checked():
    torch.manual_seed(0)
    model = Segmenter(SARConfig.preset("tiny", descriptors="given", descriptor_dim=5)).eval()
    x = torch.randn(2, 1, 64, 64)
    with pytest.raises(ValueError, match="forward_prepared"):
        model(x)
    s_raw = sar_descriptors(x, model.cfg)
    with pytest.raises(ValueError, match="router_input is for models"):
        model.forward_prepared(x, s_raw)
    with pytest.raises(ValueError, match=r"must be \(B, descriptor_dim\) = \(2, 5\)"):
        model.forward_prepared(x, s_raw, torch.zeros(2, 3))
    with torch.no_grad():
        a = model.forward_prepared(x, s_raw, torch.zeros(2, 5)).logits
        b = model.forward_prepared(x, s_raw * 7, torch.zeros(2, 5)).logits   # the descriptors are not read
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="router_input is for models"):
        Segmenter(SARConfig.preset("tiny")).forward_prepared(x, s_raw, torch.zeros(2, 5))


# -----------------------------------------------------------------------------
# upcycling from DINOv2


def fake_dinov2_state_dict(D=64, depth=2, Dh=256, patch=14, grid=37, registers=0, seed=0):
    """A state dict with facebookresearch/dinov2 key names and shapes (vit_* with ffn_layer='mlp')."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + grid * grid, D),
        "mask_token": r(1, D),
        "patch_embed.proj.weight": r(D, 3, patch, patch),
        "patch_embed.proj.bias": r(D),
        "norm.weight": 1 + r(D),
        "norm.bias": r(D),
    }
    if registers:
        sd["register_tokens"] = r(1, registers, D)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
            b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
            b + "ls1.gamma": 0.5 + r(D),
            b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
            b + "mlp.fc1.weight": r(Dh, D) * 10, b + "mlp.fc1.bias": r(Dh),
            b + "mlp.fc2.weight": r(D, Dh) * 10, b + "mlp.fc2.bias": r(D),
            b + "ls2.gamma": 0.5 + r(D),
        })
    return sd


def tiny_dinov2_config(**overrides):
    return SARConfig(**{**dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2, head_dim=32,
                               roughness_block=8, feature_layers=(0, 1, 1, 1)), **overrides})


def test_upcycle_loads_dinov2_keys_and_reports():
    sd = fake_dinov2_state_dict()
    model = Segmenter(tiny_dinov2_config())
    report = upcycle_from_dinov2(model, sd)
    assert report.missing == []
    assert report.unexpected == ["mask_token"]
    assert any(a.startswith("pos_embed") for a in report.adapted)              # 37x37 -> 4x4 grid
    assert any(a.startswith("patch_embed.proj.weight") for a in report.adapted)  # 3 -> 1 channel
    assert any("router" in n for n in report.fresh) and any(n.startswith("head.") for n in report.fresh)
    blk = model.backbone.blocks[1]
    for e in range(6):
        torch.testing.assert_close(blk.mlp.w1[e], sd["blocks.1.mlp.fc1.weight"].t())
        torch.testing.assert_close(blk.mlp.w2[e], sd["blocks.1.mlp.fc2.weight"].t())
        torch.testing.assert_close(blk.mlp.b2[e], sd["blocks.1.mlp.fc2.bias"])
    torch.testing.assert_close(blk.attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(blk.ls2.gamma, sd["blocks.1.ls2.gamma"])
    assert "mask_token" in str(report)


def test_upcycle_accepts_chunked_and_prefixed_keys():
    sd = fake_dinov2_state_dict()

    def chunked_key(k):  # block-chunked training checkpoints: here chunk i holds block i -> blocks.i.i.*
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        return f"backbone.blocks.{m[1]}.{m[1]}.{m[2]}" if m else "backbone." + k

    chunked = {"teacher": {chunked_key(k): v for k, v in sd.items()}}
    model = Segmenter(tiny_dinov2_config())
    report = upcycle_from_dinov2(model, chunked)
    assert report.missing == [] and report.unexpected == ["mask_token"]
    torch.testing.assert_close(model.backbone.blocks[1].attn.proj.weight, sd["blocks.1.attn.proj.weight"])


def test_upcycle_wrong_size_is_a_clear_error():
    with pytest.raises(ValueError, match="embed_dim"):
        upcycle_from_dinov2(Segmenter(tiny_dinov2_config(embed_dim=96, num_heads=3)), fake_dinov2_state_dict())


@pytest.mark.parametrize("gate", ["renorm", "straight_through"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_moe_equals_dense_dinov2_vit(top_k, gate):
    """Every expert is the DINOv2 FFN, so any routing gives the output of the dense DINOv2-layout ViT, with
    the gates that sum to 1 over the chosen experts (renorm, straight_through; softmax: see below)."""
    torch.manual_seed(0)
    sd = fake_dinov2_state_dict(registers=4)
    moe = Segmenter(tiny_dinov2_config(top_k=top_k, num_register_tokens=4, input_unit="intensity", gate=gate)).eval()
    dense = Segmenter(tiny_dinov2_config(n_experts=1, num_register_tokens=4, input_unit="intensity")).eval()
    report = upcycle_from_dinov2(moe, sd)
    assert report.missing == [] and report.unexpected == ["mask_token"]
    upcycle_from_dinov2(dense, sd)
    dense.head.load_state_dict(moe.head.state_dict())
    with torch.no_grad():
        for block in moe.backbone.blocks:                      # any routing: large random router weights
            block.mlp.router.linear.weight.normal_(std=5.0)
    x = torch.rand(3, 1, 56, 56) * 0.2
    with torch.no_grad():
        out = moe(x)
        ref = dense(x)
    assert (out.expert_load > 0).sum(dim=1).min() >= 2           # tokens really went to several experts
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_chans", [1, 2, 4])
def test_adapted_patch_embed_equals_rgb_model_on_replicated_band(in_chans):
    """The paper feeds one SAR band replicated to RGB; the adapted kernel on C equal bands gives the same."""
    torch.manual_seed(0)
    w, band = torch.randn(8, 3, 14, 14), torch.randn(2, 1, 28, 28)
    rgb = F.conv2d(band.repeat(1, 3, 1, 1), w, stride=14)
    sar = F.conv2d(band.repeat(1, in_chans, 1, 1), adapt_patch_embed(w, in_chans, 14), stride=14)
    torch.testing.assert_close(sar, rgb, rtol=1e-4, atol=1e-4)


def test_adapt_patch_embed_resize_keeps_the_response_to_a_constant_input():
    torch.manual_seed(0)
    w = F.interpolate(torch.randn(8, 3, 4, 4), size=(14, 14), mode="bilinear")  # smooth, like trained kernels
    w16 = adapt_patch_embed(w, 2, 16)
    assert w16.shape == (8, 2, 16, 16)
    # a constant image of value 1 on all channels: the RGB response is sum(w); the adapted one ~ the same
    torch.testing.assert_close(w16.sum(dim=(1, 2, 3)), w.sum(dim=(1, 2, 3)), rtol=0.03, atol=0.03)


def test_resize_pos_embed_identity_and_shape():
    pos = torch.randn(1, 1 + 16, 8)
    for kind in POS_EMBED_INTERPOLATION.values():
        assert resize_pos_embed(pos, 4, 4, **kind) is pos                       # the native grid
        assert resize_pos_embed(pos, 6, 3, **kind).shape == (1, 1 + 18, 8)


def keys_cubic(x, a):
    """The cubic convolution kernel of Keys (1981) with parameter a."""
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def bicubic_matrix(n_in, n_out, scale, antialias):
    """(n_out, n_in) weights of a 1-D bicubic resize whose output pixel i samples the input at (i + 0.5) / scale
    - 0.5: without antialiasing Keys' kernel with a = -0.75 and edge pixels repeated; with antialiasing the
    kernel (a = -0.5) stretched by 1 / scale when shrinking, over the input pixels in reach, normalised."""
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        if not antialias:
            src = (i + 0.5) / scale - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                W[i, min(max(base + k, 0), n_in - 1)] += keys_cubic(np.array(src - base - k), -0.75)
            continue
        centre, reach = (i + 0.5) / scale, 2.0 * max(1.0, 1.0 / scale)
        j = np.arange(max(int(centre - reach + 0.5), 0), min(int(centre + reach + 0.5), n_in))
        w = keys_cubic((j - centre + 0.5) * min(1.0, scale), -0.5)
        W[i, j] = w / w.sum()
    return W


@pytest.mark.parametrize("kind", ["original", "registers"])
@pytest.mark.parametrize("size", [32, 16, 46, 4])               # 512 px / 16, 256 / 16, 644 / 14, 56 / 14
def test_resize_pos_embed_is_dinov2s_interpolation(kind, size):
    """Off the native 37 x 37 grid, the resized position field equals DINOv2's formula computed independently
    (a separable resampling matrix: scale (size + 0.1) / 37 for the original checkpoints, size / 37 with
    antialiasing for the register ones) on a smooth field; and the two kinds differ, so the choice matters."""
    g = 37
    yy, xx = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    field = np.stack([np.sin(yy / 5.0) + np.cos(xx / 7.0), yy * xx / 400.0, np.cos((yy + 2 * xx) / 9.0)])
    pos = torch.cat([torch.ones(1, 1, 3, dtype=torch.float64),
                     torch.tensor(field).flatten(1).t()[None]], dim=1)            # (1, 1 + g*g, 3): cls, grid
    how = POS_EMBED_INTERPOLATION[kind]
    out = resize_pos_embed(pos, size, size, **how)
    W = bicubic_matrix(g, size, (size + how["offset"]) / g, how["antialias"])
    expected = np.einsum("ij,djk,lk->ild", W, field, W).reshape(-1, 3)              # (size*size, 3)
    np.testing.assert_allclose(out[0, 1:].numpy(), expected, rtol=1e-6, atol=1e-6)   # DINOv2 works in float32
    assert torch.equal(out[0, 0], pos[0, 0])                                        # the cls position is kept
    other = resize_pos_embed(pos, size, size, **POS_EMBED_INTERPOLATION[{"original": "registers",
                                                                       "registers": "original"}[kind]])
    assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("registers, model_registers", [(4, 0), (0, 4), (4, 2)])
def test_a_checkpoint_with_another_register_count_is_refused_unless_asked(registers, model_registers):
    sd = fake_dinov2_state_dict(registers=registers)
    model = Segmenter(tiny_dinov2_config(num_register_tokens=model_registers))
    with pytest.raises(ValueError, match=f"has {registers} register tokens and the model "
                                         f"num_register_tokens={model_registers}"):
        upcycle_from_dinov2(model, sd)
    report = upcycle_from_dinov2(model, sd, allow_register_mismatch=True)
    assert ("register_tokens" in report.unexpected) == bool(registers)       # the checkpoint's: unused
    assert ("register_tokens" in report.missing) == bool(model_registers)     # the model's: left fresh


def test_upcycling_interpolates_positions_as_dinov2_for_each_kind():
    for registers, kind in ((0, "original"), (4, "registers")):
        sd = fake_dinov2_state_dict(registers=registers)
        model = Segmenter(tiny_dinov2_config(num_register_tokens=registers))
        report = upcycle_from_dinov2(model, sd)
        assert any(a.startswith("pos_embed") and f"DINOv2 {kind}" in a for a in report.adapted)
        torch.testing.assert_close(model.backbone.pos_embed,
                                   resize_pos_embed(sd["pos_embed"], 4, 4, **POS_EMBED_INTERPOLATION[kind]))


# -----------------------------------------------------------------------------
# bad input


def test_bad_input_gives_clear_errors():
    model = Segmenter(SARConfig.preset("tiny", in_chans=2, channels=("VV", "VH")))
    with pytest.raises(ValueError, match=r"2 channel\(s\) \['VV', 'VH'\].*got shape \(1, 1, 64, 64\)"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.zeros(1, 2, 60, 64))
    with pytest.raises(ValueError, match="roughness blocks"):
        model(torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("dispatch", ["reference", "fast"])
def test_non_finite_pixels_give_nan_outputs_not_a_crash(dispatch):
    """The model does not check values (no sync per forward): a NaN pixel surfaces as NaN in that image's
    descriptors and logits and in the losses; an inf from 10^(x/10) overflow does the same. No crash."""
    torch.manual_seed(0)
    model = Segmenter(SARConfig.preset("tiny", top_k=2, moe_dispatch=dispatch)).eval()
    x = torch.randn(3, 1, 64, 64) * 3 - 12                    # sigma0 in dB
    x[0, 0, 10, 20] = float("nan")
    x[1, 0, 30, 30] = 1000.0                                   # 10^100: inf in float32
    with torch.no_grad():
        out = model(x)
    assert out.descriptors[:2].isnan().all() and torch.isfinite(out.descriptors[2]).all()
    assert out.logits[:2].isnan().any() and torch.isfinite(out.logits[2]).all()
    assert out.aux_loss.isnan()                                # the training script's non-finite check fires
    assert (out.expert_load.sum(dim=1) == 3 * 65 * 2).all()     # every token routed to valid experts


def test_no_data_is_left_out_of_the_descriptors():
    """A zero-filled border (a real scene's no-data) changes none of the three descriptors: they equal
    those of the valid part alone (the border is two whole roughness blocks wide)."""
    torch.manual_seed(0)
    cfg = SARConfig.preset("tiny", input_unit="amplitude")         # roughness blocks of 8 pixels
    image = torch.rand(2, 1, 64, 64) + 0.5
    bordered = image.clone()
    bordered[..., :16] = 0.0                                       # no-data: exactly 0
    torch.testing.assert_close(sar_descriptors(bordered, cfg), sar_descriptors(image[..., 16:], cfg))
    unmasked = torch.log1p(bordered[:, 0])
    assert (equivalent_number_of_looks(unmasked) < 0.5 * sar_descriptors(bordered, cfg)[:, 1]).all()


def test_softmax_gates_break_the_upcycling_equivalence():
    """Switch's gate scales each expert's output by its probability (< 1): no longer the dense ViT."""
    torch.manual_seed(0)
    sd = fake_dinov2_state_dict(registers=0)
    moe = Segmenter(tiny_dinov2_config(input_unit="intensity", gate="softmax")).eval()
    dense = Segmenter(tiny_dinov2_config(n_experts=1, input_unit="intensity")).eval()
    upcycle_from_dinov2(moe, sd), upcycle_from_dinov2(dense, sd)
    dense.head.load_state_dict(moe.head.state_dict())
    x = torch.rand(2, 1, 56, 56) * 0.2
    with torch.no_grad():
        assert (moe(x).logits - dense(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("gate", ["renorm", "softmax", "straight_through"])
def test_the_task_loss_trains_the_router_unless_gates_are_renormalised_top1(gate):
    """Balance and z losses off: with renorm (k = 1) every gate is p / p = 1 and the segmentation loss gives
    the router weight zero gradient (up to float32 rounding of p / p, ~1e-10 here); softmax and
    straight_through gates pass it through (> 1e-4)."""
    torch.manual_seed(0)
    cfg = SARConfig.preset("tiny", gate=gate, balance_loss_weight=0.0, router_z_loss_weight=0.0, layerscale_init=1.0)
    model = Segmenter(cfg)
    out = model(torch.randn(2, 1, 64, 64) * 3 - 12)
    loss = F.cross_entropy(out.logits, torch.randint(0, 7, (2, 64, 64))) + out.aux_loss
    router = model.backbone.blocks[1].mlp.router.linear.weight
    (grad,) = torch.autograd.grad(loss, router)
    assert (grad.abs().sum() < 1e-7) if gate == "renorm" else (grad.abs().sum() > 1e-4), grad.abs().sum()


@pytest.mark.parametrize("gate", ["renorm", "softmax", "straight_through"])
@pytest.mark.parametrize("k", [1, 2])
def test_gate_modes_agree_across_dispatch_paths(gate, k):
    """reference loop, fast path without kernels, fast path with the C++ kernels (when built): the same
    outputs and gradients (input and router) in every gate mode."""
    torch.manual_seed(0)
    layers = [MoEFFN(16, 32, n_experts=6, top_k=k, descriptor_dim=3, dispatch=d, gate=gate)
              for d in ("reference", "fast", "fast")]
    layers[1].kernel_devices = frozenset()                         # the grouped PyTorch path
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    z, s = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    results = []
    for layer in layers:
        layer.double()
        zz = z.clone().requires_grad_()
        y, _ = layer(zz, s)
        weighted = (y * torch.linspace(-1, 1, 16, dtype=y.dtype)).sum()
        grads = torch.autograd.grad(weighted, [zz, layer.router.linear.weight])
        results.append((y, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a)


# -----------------------------------------------------------------------------
# torch.compile


def test_the_fast_path_compiles_whole_and_equals_eager():
    """fullgraph=True: no graph break anywhere in the Segmenter's forward and backward (the kernels are
    custom ops, group sizes stay on the device, input checks look at shapes only). aot_eager traces
    forward and backward as inductor does, without its code generation (minutes on 2 cores)."""
    torch.manual_seed(0)
    model = Segmenter(SARConfig.preset("tiny", top_k=2))
    x, target = torch.randn(2, 1, 64, 64) * 3 - 12, torch.randint(0, 7, (2, 64, 64))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for m in (model, compiled):
        out = m(x)
        loss = F.cross_entropy(out.logits, target) + out.aux_loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        results.append((out.logits, loss, *grads))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)   # fp32, different op order at most


def test_the_reference_path_breaks_the_graph_twice_per_moe_block():
    """dispatch_reference's per-expert torch.where has a data-dependent size: the number the README states,
    2 per MoE block, plus 1 where forward resumes after its call into forward_prepared (which breaks).
    In a fresh process: dynamo's recompile state after other compiles moves the count."""
    import subprocess
    import sys

    code = """
import torch
from nanosar.model import SARConfig, Segmenter
torch.manual_seed(0)
model = Segmenter(SARConfig.preset("tiny", moe_dispatch="reference")).eval()
print(torch._dynamo.explain(model)(torch.randn(2, 1, 64, 64)).graph_break_count)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == 2 * SARConfig.preset("tiny").depth + 1
