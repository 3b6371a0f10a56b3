"""The C++ (CPU) and CUDA kernels of csrc/ against the pure-PyTorch references in nanosar/model.py.

CPU tests need the extension (pip install --no-build-isolation -e .); they are skipped without it, except
that NANOSAR_REQUIRE_EXT=1 (set by CI) turns a missing extension into a failure. GPU tests are marked
`gpu` and skipped without CUDA.
"""

import os
import subprocess
import sys

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
    """Same ids and counts, close gates, mean_prob and z-loss, with NaN and inf at the same places."""
    (ref_idx, ref_gates, ref_counts, ref_mp, ref_z), (idx, gates, counts, mp, z) = ref, ker
    assert torch.equal(idx, ref_idx)
    assert torch.equal(counts, ref_counts)
    assert gates.dtype == ref_gates.dtype and mp.dtype == ref_mp.dtype
    torch.testing.assert_close(gates, ref_gates, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(mp, ref_mp, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(z, ref_z, rtol=rtol, atol=atol, equal_nan=True)


INF, NAN = float("inf"), float("nan")
# rows the routing rule of model.gating covers (finite rows around them: their values must stay finite)
EDGE_ROWS = {
    "minus_inf": [[0.5, -INF, 1.0, -INF, 0.2, -1.0]],
    "fewer_finite_than_k": [[0.0, -INF, -INF, -INF, -INF, -INF], [-INF, -INF, -INF, 2.0, -INF, -INF]],
    "all_minus_inf": [[-INF] * 6],
    "nan": [[0.1, NAN, 0.3, NAN, 2.0, 0.0], [NAN] * 6],
    "plus_inf": [[0.0, INF, 1.0, INF, -INF, 3.0]],
    "nan_and_inf": [[INF, NAN, 0.0, -INF, -NAN, 1.0]],  # NaN ties with +inf, whatever its sign bit
}


def edge_logits(case, dtype=torch.float32, device="cpu"):
    """(T, 6) logits: random finite rows with the case's rows in between (and tied rows)."""
    finite = make_logits(9, 6, ties=False, dtype=torch.float64)
    finite[4] = torch.tensor([1.0, 1.0, -2.0, 1.0, 0.0, 0.0])                # ties
    rows = torch.tensor(EDGE_ROWS[case], dtype=torch.float64)
    return torch.cat([finite[:3], rows, finite[3:]]).to(dtype=dtype, device=device)


def gating_and_gradient(gating, logits, k):
    """gating's outputs and d(loss)/d(logits) for a loss that uses gates, mean_prob and the z-loss."""
    leaf = logits.detach().clone().requires_grad_()
    outputs = gating(leaf, k)
    _, gates, _, mean_prob, z_loss = outputs
    g = torch.Generator().manual_seed(1)
    w_gates = torch.randn(gates.shape, generator=g, dtype=torch.float64).to(gates)
    w_prob = torch.randn(mean_prob.shape, generator=g, dtype=torch.float64).to(mean_prob)
    ((gates * w_gates).sum() + (mean_prob * w_prob).sum() + 0.3 * z_loss).backward()
    return [t.detach() for t in outputs], leaf.grad


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", list(EDGE_ROWS))
def test_gating_cpu_non_finite_rows_match_reference(case, k, dtype):
    """-inf entries, k above the number of finite logits, all -inf, NaN, +inf: same ids, counts, values
    (NaN where the reference has NaN) and gradients, and the finite rows unaffected."""
    logits = edge_logits(case, dtype)
    (ref, ref_grad), (ker, ker_grad) = (gating_and_gradient(g, logits, k) for g in (M.gating, moe_ops.gating))
    assert_gating_equal(ref, ker)
    torch.testing.assert_close(ker_grad, ref_grad, rtol=1e-4, atol=1e-6, equal_nan=True)
    idx, gates = ker[:2]
    assert ((idx >= 0) & (idx < 6)).all() and (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct ids
    # rows without NaN or +inf and with a finite logit (-inf entries allowed): finite values and gradients
    regular = (~logits.isnan() & (logits < INF)).all(dim=1) & (logits > -INF).any(dim=1)
    assert torch.isfinite(gates[regular]).all() and torch.isfinite(ker_grad[regular]).all()
    assert (ker_grad[regular][logits[regular] == -INF] == 0).all()  # probability 0, gradient 0
    if case == "fewer_finite_than_k" and k > 1:  # [0, -inf, ...] -> experts 0, 1, ... with gates 1, 0, ...
        assert idx[3].tolist() == list(range(k)) and gates[3].tolist() == [1.0] + [0.0] * (k - 1)
    if case == "nan_and_inf":
        assert idx[3].tolist() == [0, 1, 4][:k]
    if case in ("all_minus_inf", "nan", "plus_inf", "nan_and_inf"):  # surfaced, not masked
        assert gates[3].isnan().all() and ker[3].isnan().all() and not torch.isfinite(ker[4])


@needs_ext
def test_gating_cpu_random_non_finite_logits_keep_valid_ids():
    logits = make_logits(2000, 16, ties=True)
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([NAN, -NAN, INF, -INF])[torch.randint(0, 4, logits.shape, generator=g)]
    logits = torch.where(torch.rand(logits.shape, generator=g) < 0.2, special, logits)
    ref, ker = M.gating(logits, 2), moe_ops.gating(logits, 2)
    assert_gating_equal(ref, ker)
    idx, counts = ker[0], ker[2]
    assert ((idx >= 0) & (idx < 16)).all()
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=16))


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
@pytest.mark.parametrize("bad", [-1, 6, 2**40, -(2**62)])
def test_combine_rejects_an_order_out_of_range(bad):
    T, k, D = 3, 2, 4
    out, gates, grad_y = torch.randn(T * k, D), torch.rand(T, k), torch.randn(T, D)
    order = torch.tensor([0, 1, 2, 3, 4, bad])
    with pytest.raises(RuntimeError, match=rf"order holds index {bad} outside \[0, T\*k=6\)"):
        moe_ops.combine(out, gates, order)
    with pytest.raises(RuntimeError, match="outside"):
        EXT.combine_backward(grad_y, out, gates, order)
    with pytest.raises(RuntimeError, match="not a permutation: index 4"):
        moe_ops.combine(out, gates, torch.tensor([0, 1, 2, 3, 4, 4]))


@needs_ext
def test_bad_indices_do_not_crash_the_process():
    """The calls that used to segfault (exit 139), in a subprocess: now a RuntimeError and exit 0."""
    script = """
import torch
from nanosar import moe_ops
ext = moe_ops.load_extension()
calls = [
    lambda: ext.combine_forward(torch.randn(4, 8), torch.ones(2, 2), torch.tensor([0, 1, 2, 1 << 40])),
    lambda: ext.combine_forward(torch.randn(4, 8), torch.ones(2, 2), torch.tensor([-5, 1, 2, 3]), check_order=False),
    lambda: ext.combine_backward(torch.randn(2, 8), torch.randn(4, 8), torch.ones(2, 2), torch.tensor([0, 9, 2, 3])),
    lambda: ext.permute_forward(torch.randn(2, 8), torch.tensor([[0, 1 << 40], [1, 0]]), 3),
    lambda: ext.gating_backward(torch.randn(2, 3), torch.tensor([[0], [-7]]), torch.ones(2, 1), torch.ones(2, 1),
                                torch.ones(3), torch.ones(())),
]
for call in calls:
    try:
        call()
        print("no error")
    except RuntimeError as e:
        print("RuntimeError:", str(e).splitlines()[0])
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("RuntimeError:") for line in lines), result.stdout
    assert "outside" in lines[0] and "outside" in lines[3] and "expert id -7" in lines[4]


@needs_ext
@pytest.mark.parametrize("bad", [-1, 6, 2**40])
def test_permute_rejects_expert_ids_out_of_range(bad):
    with pytest.raises(RuntimeError, match=rf"expert id {bad} outside \[0, 6\)"):
        moe_ops.permute(torch.randn(3, 4), torch.tensor([[0, 1], [2, bad], [5, 0]]), 6)


@needs_ext
def test_auto_falls_back_beyond_the_kernel_limits_with_one_log_line(monkeypatch, capsys):
    monkeypatch.setattr(moe_ops, "_logged", set())
    x = torch.zeros(1)
    k = EXT.max_top_k + 1
    for _ in range(3):
        assert M.moe_functions("auto", x, n_experts=k + 1, top_k=k) == (M.gating, M.dispatch_grouped)
    lines = [line for line in capsys.readouterr().err.splitlines() if "pure-PyTorch reference" in line]
    assert len(lines) == 1 and f"top_k={k} is above the kernels' limit of {EXT.max_top_k}" in lines[0]
    with pytest.raises(RuntimeError, match=f"moe_dispatch='kernels' but top_k={k}"):
        M.moe_functions("kernels", x, n_experts=k + 1, top_k=k)
    assert M.moe_functions("auto", x, n_experts=k + 1, top_k=2)[0] is moe_ops.gating  # within the limits


@needs_ext
def test_moe_layer_beyond_the_kernel_limit_runs_on_the_reference(monkeypatch, capsys):
    """A layer whose top_k the kernels do not support (limit lowered to 1 here) runs and equals "grouped"."""
    monkeypatch.setattr(moe_ops, "_logged", set())
    monkeypatch.setattr(EXT, "max_top_k", 1)
    outputs = []
    for dispatch in ("auto", "grouped"):
        torch.manual_seed(0)
        layer = M.MoEFFN(16, 32, 6, 2, descriptor_dim=3, dispatch=dispatch)
        outputs.append(layer(torch.randn(2, 9, 16), torch.randn(2, 3))[0])
    torch.testing.assert_close(outputs[0], outputs[1])
    assert capsys.readouterr().err.count("top_k=2 is above the kernels' limit of 1") == 1
    with pytest.raises(RuntimeError, match="top_k=2 is above"):
        M.MoEFFN(16, 32, 6, 2, descriptor_dim=3, dispatch="kernels")(torch.randn(2, 9, 16), torch.randn(2, 3))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", list(EDGE_ROWS))
@gpu_test
def test_gating_cuda_non_finite_rows_match_reference(case, k, dtype):
    logits = edge_logits(case, dtype, device="cuda")
    (ref, ref_grad), (ker, ker_grad) = (gating_and_gradient(g, logits, k) for g in (M.gating, moe_ops.gating))
    assert_gating_equal(ref, ker)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(ker_grad.float(), ref_grad.float(), equal_nan=True, **tol)
    cpu = moe_ops.gating(logits.cpu(), k)
    assert_gating_equal(cpu, [t.cpu() for t in ker])


@gpu_test
def test_cuda_bad_indices_raise_and_leave_the_gpu_usable():
    """A checked flag, not a device assert: a clear RuntimeError, and the CUDA context still works."""
    out, gates = torch.randn(6, 4, device="cuda"), torch.rand(3, 2, device="cuda")
    with pytest.raises(RuntimeError, match=r"order holds index 9 outside \[0, T\*k=6\)"):
        moe_ops.combine(out, gates, torch.tensor([0, 1, 2, 3, 4, 9], device="cuda"))
    with pytest.raises(RuntimeError, match="not a permutation"):
        twice = torch.tensor([0, 1, 2, 3, 4, 4], device="cuda")
        EXT.combine_backward(torch.randn(3, 4, device="cuda"), out, gates, twice)
    with pytest.raises(RuntimeError, match=r"expert id -3 outside \[0, 6\)"):
        moe_ops.permute(torch.randn(3, 4, device="cuda"), torch.tensor([[0, 1], [2, -3], [5, 0]], device="cuda"), 6)
    # unchecked: bad entries are skipped, nothing is read or written out of bounds
    EXT.combine_forward(out, gates, torch.tensor([0, 1, 2, 3, 4, 1 << 40], device="cuda"), check_order=False)
    torch.cuda.synchronize()
    order = torch.tensor([5, 4, 3, 2, 1, 0], device="cuda")
    torch.testing.assert_close(moe_ops.combine(out, gates, order), M.combine(out, gates, order))


@gpu_test
def test_cuda_kernels_have_an_image_for_this_gpu_and_limits_fall_back(monkeypatch, capsys):
    assert EXT.cuda_kernel_status(torch.cuda.current_device()) == ""
    monkeypatch.setattr(moe_ops, "_logged", set())
    x = torch.zeros(1, device="cuda")
    E = EXT.max_experts_cuda + 1
    assert M.moe_functions("auto", x, n_experts=E, top_k=1) == (M.gating, M.dispatch_grouped)
    assert f"n_experts={E} is above the CUDA kernels' limit" in capsys.readouterr().err
    assert M.moe_functions("auto", x, n_experts=E - 1, top_k=1)[0] is moe_ops.gating


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
