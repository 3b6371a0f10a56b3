"""The C++ (CPU) and CUDA kernels of csrc/ against the pure-PyTorch references in nanosar/model.py.

CPU tests need the extension (pip install --no-build-isolation -e .); they are skipped without it, except
that NANOSAR_REQUIRE_EXT=1 (set by CI) turns a missing extension into a failure. GPU tests are marked
`gpu` and skipped without CUDA.
"""

import os

import pytest
import torch

from nanosar import model as M
from nanosar import moe_ops

EXT = moe_ops.load_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="nanosar._C not built")
HAS_CUDA_OPS = EXT is not None and EXT.with_cuda and torch.cuda.is_available()


def gpu_test(f):
    """A GPU-only test: marked `gpu`, skipped without CUDA and an extension built with CUDA."""
    skip = pytest.mark.skipif(not HAS_CUDA_OPS, reason="needs CUDA and the extension built with CUDA")
    return pytest.mark.gpu(skip(f))


# (T, E, k): T not a multiple of the 256-token blocks, k = 1 and 2, E from 1 to 64, experts without tokens
CASES = [(1, 1, 1), (7, 2, 2), (257, 6, 1), (257, 6, 2), (1000, 16, 1), (300, 64, 2), (5, 64, 1), (513, 6, 2)]


def test_extension_is_built_when_required():
    if os.environ.get("NANOSAR_REQUIRE_EXT") == "1":
        assert EXT is not None, "NANOSAR_REQUIRE_EXT=1 but nanosar._C is not importable"
        assert moe_ops.extension_for(torch.zeros(1)) is EXT
    assert moe_ops.extension_for(torch.zeros(1, device="meta")) is None  # meta always takes the reference


def make_logits(T, E, ties, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: most rows have equal logits, which must go to the lower expert id
        return torch.randint(-2, 2, (T, E), generator=g).to(dtype=dtype, device=device)
    return torch.randn(T, E, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def assert_gating_equal(ref, ker, rtol=1e-5, atol=1e-6):
    (ref_idx, ref_gates, ref_counts, ref_mp, ref_z), (idx, gates, counts, mp, z) = ref, ker
    assert torch.equal(idx, ref_idx)
    assert torch.equal(counts, ref_counts)
    assert gates.dtype == ref_gates.dtype and mp.dtype == ref_mp.dtype
    torch.testing.assert_close(gates, ref_gates, rtol=rtol, atol=atol)
    torch.testing.assert_close(mp, ref_mp, rtol=rtol, atol=atol)
    torch.testing.assert_close(z, ref_z, rtol=rtol, atol=atol)


# -----------------------------------------------------------------------------
# CPU: C++ ops = references


@needs_ext
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("T, E, k", CASES)
def test_gating_cpu_matches_reference(T, E, k, ties):
    logits = make_logits(T, E, ties)
    assert_gating_equal(M.gating(logits, k), moe_ops.gating(logits, k))
    if ties and E > 2:  # the case really has rows whose largest logit is shared by several experts
        assert ((logits == logits.max(dim=1, keepdim=True).values).sum(dim=1) > 1).any()


@needs_ext
@pytest.mark.parametrize("T, E, k", CASES)
def test_gating_cpu_gradients_match_reference(T, E, k):
    grads = []
    for gating in (M.gating, moe_ops.gating):
        logits = make_logits(T, E, ties=False, dtype=torch.float64).requires_grad_()
        _, gates, _, mean_prob, z_loss = gating(logits, k)
        g = torch.Generator().manual_seed(1)
        loss = ((gates * torch.randn(gates.shape, generator=g, dtype=gates.dtype)).sum()
                + (mean_prob * torch.randn(E, generator=g, dtype=gates.dtype)).sum() + 0.3 * z_loss)
        grads.append(torch.autograd.grad(loss, logits)[0])
    torch.testing.assert_close(grads[1], grads[0])


@needs_ext
@pytest.mark.parametrize("T, E, k", [(5, 3, 1), (9, 4, 2), (3, 1, 1)])
def test_gating_cpu_gradcheck(T, E, k):
    logits = make_logits(T, E, ties=False, dtype=torch.float64).requires_grad_()

    def differentiable_outputs(logits):
        _, gates, _, mean_prob, z_loss = moe_ops.gating(logits, k)
        return gates, mean_prob, z_loss

    assert torch.autograd.gradcheck(differentiable_outputs, (logits,))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("D", [5, 64])
@pytest.mark.parametrize("T, E, k", CASES)
def test_permute_cpu_matches_reference(T, E, k, D, dtype):
    expert_idx = M.gating(make_logits(T, E, ties=True), k)[0]
    x = torch.randn(T, D).to(dtype)
    for a, b in zip(M.permute(x, expert_idx, E), moe_ops.permute(x, expert_idx, E)):
        assert torch.equal(a, b)                                   # a pure copy and a stable sort: exact


@needs_ext
@pytest.mark.parametrize("D", [5, 64])
@pytest.mark.parametrize("T, E, k", CASES)
def test_combine_cpu_matches_reference(T, E, k, D):
    expert_idx, gates = M.gating(make_logits(T, E, ties=False), k)[:2]
    order = M.permute(torch.zeros(T, 1), expert_idx, E)[1]
    out = torch.randn(T * k, D)
    torch.testing.assert_close(moe_ops.combine(out, gates, order), M.combine(out, gates, order))


@needs_ext
@pytest.mark.parametrize("T, E, k", [(6, 3, 1), (7, 4, 2), (2, 5, 2)])
def test_permute_and_combine_cpu_gradcheck(T, E, k):
    expert_idx, gates = M.gating(make_logits(T, E, ties=False, dtype=torch.float64), k)[:2]
    x = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moe_ops.permute(x, expert_idx, E)[0], (x,))
    order = M.permute(x.detach(), expert_idx, E)[1]
    out = torch.randn(T * k, 3, dtype=torch.float64, requires_grad=True)
    gates = gates.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda o, g: moe_ops.combine(o, g, order), (out, gates))


@needs_ext
@pytest.mark.parametrize("E, k", [(6, 1), (6, 2), (16, 1), (1, 1)])
def test_moe_layer_cpu_kernels_equal_reference(E, k):
    """The whole MoE layer: same output and same gradients for input, router and expert weights."""
    results = []
    for dispatch in ("grouped", "kernels"):
        torch.manual_seed(0)
        layer = M.MoEFFN(24, 48, E, k, descriptor_dim=3, dispatch=dispatch)
        z = torch.randn(3, 37, 24, requires_grad=True)
        y, routing = layer(z, torch.randn(3, 3))
        loss = (y * torch.linspace(-1, 1, 24)).sum() + routing.balance_loss + routing.z_loss
        loss.backward()
        results.append((y, routing.tokens_per_expert, z.grad, [p.grad for p in layer.parameters()]))
    (y0, c0, gz0, gp0), (y1, c1, gz1, gp1) = results
    torch.testing.assert_close(y1, y0)
    assert torch.equal(c0, c1)
    torch.testing.assert_close(gz1, gz0)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(b, a)


@needs_ext
def test_segmenter_auto_uses_the_extension_and_agrees():
    torch.manual_seed(0)
    auto = M.Segmenter(M.SARConfig.preset("tiny", top_k=2))
    ref = M.Segmenter(M.SARConfig.preset("tiny", top_k=2, moe_dispatch="grouped"))
    ref.load_state_dict(auto.state_dict())
    assert M.moe_functions("auto", torch.zeros(1))[0] is moe_ops.gating
    x = torch.randn(2, 1, 64, 64) * 3 - 12
    torch.testing.assert_close(auto(x).logits, ref(x).logits)


def test_kernels_on_meta_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no meta ops"):
        M.moe_functions("kernels", torch.zeros(1, device="meta"))
    assert M.moe_functions("auto", torch.zeros(1, device="meta"))[1] is M.dispatch_grouped


@needs_ext
def test_cpu_results_do_not_depend_on_the_thread_count():
    logits, x = make_logits(3000, 16, ties=False), torch.randn(3000, 32)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            idx, gates, counts, mp, z = moe_ops.gating(logits, 2)
            y = moe_ops.combine(moe_ops.permute(x, idx, 16)[0], gates, moe_ops.permute(x, idx, 16)[1])
            runs.append((gates, mp, z, y))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_ext
def test_extension_rejects_bad_input():
    with pytest.raises(RuntimeError, match="top_k"):
        EXT.gating_forward(torch.randn(4, 3), 4)
    with pytest.raises(RuntimeError, match="outside"):
        EXT.permute_forward(torch.randn(2, 4), torch.tensor([[0], [7]]), 6)
    with pytest.raises(RuntimeError, match="rows"):
        EXT.combine_forward(torch.randn(3, 4), torch.ones(2, 1), torch.arange(2))
    with pytest.raises(RuntimeError, match="contiguous"):
        EXT.gating_forward(torch.randn(3, 4).t(), 1)


# -----------------------------------------------------------------------------
# GPU: CUDA ops = references (fp32 and bf16), = C++ ops, deterministic


GPU_CASES = CASES + [(40000, 64, 2), (32768, 6, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, E, k", GPU_CASES)
@pytest.mark.parametrize("ties", [False, True])
@gpu_test
def test_gating_cuda_matches_reference(T, E, k, ties, dtype):
    logits = make_logits(T, E, ties, dtype=dtype, device="cuda")
    ref, ker = M.gating(logits, k), moe_ops.gating(logits, k)
    assert_gating_equal(ref, ker, rtol=1e-5, atol=1e-6)        # both compute in float32 after the load
    grads = []
    for gating in (M.gating, moe_ops.gating):
        leaf = logits.detach().clone().requires_grad_()
        _, gates, _, mean_prob, z_loss = gating(leaf, k)
        (gates.square().sum() + mean_prob.square().sum() * 7 + z_loss).backward()
        grads.append(leaf.grad.float())
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [5, 6, 64, 1024])
@pytest.mark.parametrize("T, E, k", GPU_CASES)
@gpu_test
def test_permute_and_combine_cuda_match_reference(T, E, k, D, dtype):
    if T * D > 5_000_000:
        pytest.skip("large case covered at smaller D")
    expert_idx, gates = M.gating(make_logits(T, E, ties=True, device="cuda"), k)[:2]
    x = torch.randn(T, D, device="cuda").to(dtype)
    ref, ker = M.permute(x, expert_idx, E), moe_ops.permute(x, expert_idx, E)
    for a, b in zip(ref, ker):
        assert torch.equal(a, b)
    out = torch.randn(T * k, D, device="cuda").to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(moe_ops.combine(out, gates, ref[1]), M.combine(out, gates, ref[1]), **tol)
    grads = []
    for combine in (M.combine, moe_ops.combine):
        o, g = out.detach().clone().requires_grad_(), gates.detach().clone().requires_grad_()
        combine(o, g, ref[1]).float().mul(torch.linspace(-1, 1, D, device="cuda")).sum().backward()
        grads.append((o.grad.float(), g.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("T, E, k", [(257, 6, 2), (40000, 64, 2)])
@gpu_test
def test_cuda_ops_equal_cpu_ops(T, E, k):
    logits, x = make_logits(T, E, ties=True), torch.randn(T, 48)
    cpu, cuda = moe_ops.gating(logits, k), moe_ops.gating(logits.cuda(), k)
    assert_gating_equal(cpu, [t.cpu() for t in cuda])
    for a, b in zip(moe_ops.permute(x, cpu[0], E), moe_ops.permute(x.cuda(), cuda[0], E)):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@gpu_test
def test_cuda_ops_are_deterministic(dtype):
    T, E, k, D = 40000, 64, 2, 256
    logits = make_logits(T, E, ties=True, dtype=dtype, device="cuda")
    x = torch.randn(T, D, device="cuda").to(dtype)

    def run():
        leaf = logits.detach().clone().requires_grad_()
        xx = x.detach().clone().requires_grad_()
        idx, gates, counts, mp, z = moe_ops.gating(leaf, k)
        xs, order, _ = moe_ops.permute(xx, idx, E)
        y = moe_ops.combine(xs * 1.5, gates, order)
        (y.float().square().mean() + mp.square().sum() + z).backward()
        return [idx, gates, counts, mp, z, xs, order, y, leaf.grad, xx.grad]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def assert_relative_error(actual, expected, tol):
    """||actual - expected|| <= tol * ||expected||: for bf16 results, where elementwise tolerances either
    pass trivially (tiny values under atol) or fail on near-zero elements."""
    error = (actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)
    assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("E, k", [(6, 1), (6, 2), (64, 2)])
@gpu_test
def test_moe_layer_cuda_kernels_equal_reference(E, k):
    results = []
    for dispatch in ("grouped", "kernels"):
        torch.manual_seed(0)
        layer = M.MoEFFN(64, 256, E, k, descriptor_dim=3, dispatch=dispatch).cuda()
        z = torch.randn(4, 300, 64, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, routing = layer(z, torch.randn(4, 3, device="cuda"))
            loss = y.float().square().sum() + routing.balance_loss
        loss.backward()
        results.append((y, routing.tokens_per_expert, z.grad, [p.grad for p in layer.parameters()]))
    (y0, c0, gz0, gp0), (y1, c1, gz1, gp1) = results
    assert torch.equal(c0, c1)
    assert_relative_error(y1, y0, 1e-2)
    assert_relative_error(gz1, gz0, 2e-2)
    for a, b in zip(gp0, gp1):
        assert_relative_error(b, a, 2e-2)
