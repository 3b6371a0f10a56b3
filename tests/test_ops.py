"""The C++ (CPU) and CUDA kernels of csrc/ against the pure-PyTorch references in nanosar/model.py; the
custom operators around them (torch.library.opcheck), grouped_linear against a plain loop, kernel_devices.

CPU tests need the extension (pip install --no-build-isolation -e .); they are skipped without it, except
that NANOSAR_REQUIRE_EXT=1 (set by CI) turns a missing extension into a failure. GPU tests are marked
`gpu` and skipped without CUDA.
"""

import doctest
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanosar import model as M
from nanosar import moe_ops

EXT = moe_ops.load_extension()
OPS = torch.ops.nanosar  # the custom operators: gating, permute, combine (with the extension), grouped_linear
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


@pytest.mark.parametrize("impl", ["reference", pytest.param("kernel", marks=needs_ext)])
def test_permute_docstring_example_holds(impl):
    """The worked example in model.permute's docstring (5 tokens, 3 experts), run as a doctest on the
    reference and on the kernel; combine with unit gates undoes it."""
    permute = M.permute if impl == "reference" else moe_ops.permute
    test = doctest.DocTestFinder().find(M.permute, globs={"torch": torch, "permute": permute})[0]
    assert len(test.examples) == 2
    result = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE).run(test, out=print)
    assert result.failed == 0
    x = torch.arange(5.0)[:, None]
    x_sorted, order, _ = permute(x, torch.tensor([[2], [0], [2], [1], [0]]), 3)
    assert torch.equal(M.combine(x_sorted, torch.ones(5, 1), order), x)


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


def moe_layer_results(E, k, dispatch, kernels=True, device="cpu", autocast=False):
    """An MoE layer's output, tokens per expert and gradients (input, parameters); kernels=False takes the
    fast dispatch's PyTorch path (the kernels' devices emptied)."""
    torch.manual_seed(0)
    D = 24 if device == "cpu" else 64
    layer = M.MoEFFN(D, 2 * D, E, k, descriptor_dim=3, dispatch=dispatch).to(device)
    if not kernels:
        layer.kernel_devices = frozenset()
    z = torch.randn(3, 37, D, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y, routing = layer(z, torch.randn(3, 3, device=device))
        loss = (y.float() * torch.linspace(-1, 1, D, device=device)).sum() + routing.balance_loss + routing.z_loss
    loss.backward()
    return y, routing.tokens_per_expert, z.grad, [p.grad for p in layer.parameters()]


@needs_ext
@pytest.mark.parametrize("E, k", [(6, 1), (6, 2), (16, 1), (1, 1)])
def test_moe_layer_cpu_kernels_equal_reference(E, k):
    """The whole MoE layer: same output and same gradients for input, router and expert weights, with the
    kernels, with the fast dispatch's PyTorch path, and with the reference dispatch."""
    assert "cpu" in M.MoEFFN(8, 8, E, k, descriptor_dim=3).kernel_devices
    (y0, c0, gz0, gp0), *others = [moe_layer_results(E, k, "reference"), moe_layer_results(E, k, "fast"),
                                   moe_layer_results(E, k, "fast", kernels=False)]
    for y1, c1, gz1, gp1 in others:
        torch.testing.assert_close(y1, y0)
        assert torch.equal(c0, c1)
        torch.testing.assert_close(gz1, gz0)
        for a, b in zip(gp0, gp1):
            torch.testing.assert_close(b, a)


@needs_ext
def test_segmenter_fast_uses_the_extension_and_agrees():
    torch.manual_seed(0)
    fast = M.Segmenter(M.SARConfig.preset("tiny", top_k=2))
    ref = M.Segmenter(M.SARConfig.preset("tiny", top_k=2, moe_dispatch="reference"))
    ref.load_state_dict(fast.state_dict())
    layers = [m for m in fast.modules() if isinstance(m, M.MoEFFN)]
    assert layers and all("cpu" in layer.kernel_devices for layer in layers)
    x = torch.randn(2, 1, 64, 64) * 3 - 12
    torch.testing.assert_close(fast(x).logits, ref(x).logits)


class HostReads(TorchDispatchMode):
    """Counts the ops that would read device memory on the host (a sync) on CUDA: .item() and friends
    (aten._local_scalar_dense), ops whose output size depends on values (nonzero, ...), and the extension's
    index checks (every permute; combine and combine_backward with check_order). grouped_linear's own
    reads happen inside the operator, beyond this mode: host_reads counts its moe_ops._segments calls."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += self.reads_back(func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def reads_back(func, args, kwargs):
        name = func._schema.name
        if name in ("nanosar::combine", "nanosar::combine_backward"):     # check_order, the last argument
            n = len(func._schema.arguments)
            return bool(args[n - 1] if len(args) == n else kwargs.get("check_order", True))
        return name in ("aten::_local_scalar_dense", "nanosar::permute") or torch.Tag.dynamic_output_shape in func.tags


def host_reads(fn, monkeypatch):
    """How many host reads fn() would make on CUDA (HostReads, plus grouped_linear's segment reads)."""
    segments, calls = moe_ops._segments, []
    monkeypatch.setattr(moe_ops, "_segments", lambda *a: calls.append(1) or segments(*a))
    with HostReads() as reads:
        fn()
    return reads.count + len(calls)


@needs_ext
@pytest.mark.parametrize("grouped_mm, forward, backward", [(True, 1, 0), (False, 3, 4)])
def test_moe_layer_host_reads_per_layer(grouped_mm, forward, backward, monkeypatch):
    """The syncs dispatch_sorted documents, per MoE layer on CUDA: the forward reads permute's check of the
    expert ids (combine's check of order is skipped); off the torch._grouped_mm path (bf16 on sm90+, forced
    here on the CPU), grouped_linear reads its segment sizes, 2 in the forward and 4 in the backward. The
    public combine still checks by default. Nothing else in the tiny Segmenter reads back."""
    monkeypatch.setattr(moe_ops, "_grouped_mm_supported", lambda a, b: grouped_mm)
    torch.manual_seed(0)
    layer = M.MoEFFN(16, 32, 6, 2, descriptor_dim=3)
    z, s = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 3)
    out = []
    assert host_reads(lambda: out.extend(layer(z, s)), monkeypatch) == forward
    assert host_reads(lambda: (out[0].sum() + out[1].balance_loss).backward(), monkeypatch) == backward
    x_sorted, order, _ = moe_ops.permute(z.detach()[0], out[1].expert_idx[:9], 6)
    assert host_reads(lambda: moe_ops.combine(x_sorted, out[1].gates[:9], order), monkeypatch) == 1
    model = M.Segmenter(M.SARConfig.preset("tiny", top_k=2))
    n_layers = sum(isinstance(m, M.MoEFFN) for m in model.modules())
    assert host_reads(lambda: model(torch.randn(2, 1, 64, 64)).logits.sum().backward(), monkeypatch) == \
        n_layers * (forward + backward)


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
        OPS.combine_backward(grad_y, out, gates, order)
    with pytest.raises(RuntimeError, match="not a permutation: index 4"):
        moe_ops.combine(out, gates, torch.tensor([0, 1, 2, 3, 4, 4]))


@needs_ext
def test_bad_indices_do_not_crash_the_process():
    """The calls that used to segfault (exit 139), in a subprocess: now a RuntimeError and exit 0."""
    script = """
import torch
from nanosar import moe_ops  # loads the extension, which registers torch.ops.nanosar
ops = torch.ops.nanosar
calls = [
    lambda: ops.combine(torch.randn(4, 8), torch.ones(2, 2), torch.tensor([0, 1, 2, 1 << 40])),
    lambda: ops.combine(torch.randn(4, 8), torch.ones(2, 2), torch.tensor([-5, 1, 2, 3]), check_order=False),
    lambda: ops.combine_backward(torch.randn(2, 8), torch.randn(4, 8), torch.ones(2, 2), torch.tensor([0, 9, 2, 3])),
    lambda: ops.permute(torch.randn(2, 8), torch.tensor([[0, 1 << 40], [1, 0]]), 3),
    lambda: ops.gating_backward(torch.randn(2, 3), torch.tensor([[0], [-7]]), torch.ones(2, 1), torch.ones(2, 1),
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
def test_moe_layer_beyond_the_kernel_limit_runs_on_the_pytorch_path(fresh_kernel_devices, monkeypatch, capsys):
    """A layer whose top_k the kernels do not support (limit lowered to 1 here) runs without them, equals
    the reference dispatch, and says why once."""
    monkeypatch.setattr(EXT, "max_top_k", 1)
    layers = [M.MoEFFN(16, 32, 6, 2, descriptor_dim=3) for _ in range(3)]
    assert all("cpu" not in layer.kernel_devices for layer in layers)
    assert "cpu" in M.MoEFFN(16, 32, 6, 1, descriptor_dim=3).kernel_devices
    outputs = []
    for dispatch in ("fast", "reference"):
        torch.manual_seed(0)
        layer = M.MoEFFN(16, 32, 6, 2, descriptor_dim=3, dispatch=dispatch)
        outputs.append(layer(torch.randn(2, 9, 16), torch.randn(2, 3))[0])
    torch.testing.assert_close(outputs[0], outputs[1])
    assert capsys.readouterr().err.count("top_k=2 is above the kernels' limit of 1") == 1


@needs_ext
def test_extension_rejects_bad_input():
    with pytest.raises(RuntimeError, match="top_k"):
        OPS.gating(torch.randn(4, 3), 4)
    with pytest.raises(RuntimeError, match="outside"):
        OPS.permute(torch.randn(2, 4), torch.tensor([[0], [7]]), 6)
    with pytest.raises(RuntimeError, match="rows"):
        OPS.combine(torch.randn(3, 4), torch.ones(2, 1), torch.arange(2))
    with pytest.raises(RuntimeError, match="dimensions"):
        OPS.combine(torch.randn(6), torch.ones(2, 1), torch.arange(2))


@needs_ext
def test_ops_take_any_layout():
    """Strided inputs (a transposed view, a column slice) give the results of their contiguous copies."""
    logits = make_logits(9, 8, ties=False).t().contiguous().t()                   # (9, 8), column-major
    for a, b in zip(moe_ops.gating(logits, 2), moe_ops.gating(logits.contiguous(), 2)):
        assert torch.equal(a, b)
    x, expert_idx = torch.randn(9, 10)[:, ::2], M.gating(logits, 3)[0][:, 1:]  # (9, 5) strided, (9, 2) slice
    for a, b in zip(moe_ops.permute(x, expert_idx, 8), moe_ops.permute(x.contiguous(), expert_idx.contiguous(), 8)):
        assert torch.equal(a, b)
    out, gates, order = torch.randn(5, 36)[:, ::2].t(), torch.rand(2, 9).t(), torch.randperm(18)  # (18, 5), (9, 2)
    assert torch.equal(moe_ops.combine(out, gates, order), moe_ops.combine(out.contiguous(), gates.contiguous(), order))


# -----------------------------------------------------------------------------
# The custom operators: opcheck (schema, fake tensors, autograd registration, AOT dispatch with dynamic
# shapes), grouped_linear against a plain loop, kernel_devices. Backward ops are checked without
# requires_grad: they have no autograd formula of their own (no double backward through the kernels).

OPCHECK_CASES = [(7, 2, 2), (257, 6, 1), (40, 16, 2)]  # (T, E, k)


def routed(T, E, k, D, dtype, seed=0):
    """Inputs of permute and combine made by the references: x (T, D), expert_idx (T, k), gates (T, k)
    in the accumulation type, order (T*k,), expert_out (T*k, D)."""
    expert_idx, gates = M.gating(make_logits(T, E, ties=True, dtype=dtype, seed=seed), k)[:2]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    order = M.permute(x, expert_idx, E)[1]
    expert_out = torch.randn(T * k, D, generator=g, dtype=torch.float64).to(dtype)
    return x, expert_idx, gates, order, expert_out


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T, E, k", OPCHECK_CASES)
def test_opcheck_gating(T, E, k, dtype, requires_grad):
    logits = make_logits(T, E, ties=False, dtype=dtype).requires_grad_(requires_grad)
    torch.library.opcheck(OPS.gating.default, (logits, k))
    gates, mean_prob, z_loss, expert_idx, counts = OPS.gating(logits.detach(), k)
    torch.library.opcheck(OPS.gating_backward.default, (logits.detach(), expert_idx, gates, torch.randn_like(gates),
                                                        torch.randn_like(mean_prob), torch.randn_like(z_loss)))


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T, E, k", OPCHECK_CASES)
def test_opcheck_permute_and_combine(T, E, k, dtype, requires_grad):
    x, expert_idx, gates, order, expert_out = routed(T, E, k, 5, dtype)
    torch.library.opcheck(OPS.permute.default, (x.requires_grad_(requires_grad), expert_idx, E))
    for check_order in (True, False):
        args = (expert_out.clone().requires_grad_(requires_grad), gates.clone().requires_grad_(requires_grad), order)
        torch.library.opcheck(OPS.combine.default, args + (check_order,))
    torch.library.opcheck(OPS.combine_backward.default, (torch.randn(T, 5, dtype=dtype), expert_out, gates, order))


@needs_ext
def test_kernel_ops_keep_the_reference_signatures_on_meta():
    """The fake functions give every output's shape and dtype without running anything (the meta device)."""
    T, E, k, D = 11, 6, 2, 4
    logits = torch.empty(T, E, device="meta", dtype=torch.bfloat16)
    expert_idx, gates, counts, mean_prob, z_loss = moe_ops.gating(logits, k)
    assert [(t.shape, t.dtype) for t in (expert_idx, gates, counts, mean_prob, z_loss)] == [
        ((T, k), torch.long), ((T, k), torch.float32), ((E,), torch.long), ((E,), torch.float32), ((), torch.float32)]
    x_sorted, order, counts = moe_ops.permute(torch.empty(T, D, device="meta"), expert_idx, E)
    assert (x_sorted.shape, order.shape, counts.shape) == ((T * k, D), (T * k,), (E,))
    assert moe_ops.combine(x_sorted, gates, order).shape == (T, D)


def grouped_linear_reference(x, w, b, counts):
    """The plain loop: expert e's rows (a contiguous block of counts[e] rows) times w[e], plus b[e]."""
    blocks = x.split(counts.tolist())                                          # E x (n_e, Din)
    return torch.cat([blk @ w[e] + (0 if b is None else b[e]) for e, blk in enumerate(blocks)])


def grouped_inputs(counts, Din, Dout, dtype=torch.float64, offsets_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    E, S = len(counts), int(counts.sum())
    x = torch.randn(S, Din, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(E, Din, Dout, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(E, Dout, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, counts, counts.cumsum(0).to(offsets_dtype)


# rows per expert: experts without rows first, in the middle and last; one expert; no rows at all
GROUP_COUNTS = [[3, 0, 5, 1], [0, 4, 0, 0, 2, 0], [7], [0, 0, 0]]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("counts", GROUP_COUNTS)
def test_grouped_linear_matches_the_loop_and_gradchecks(counts, bias):
    x, w, b, counts, offsets = grouped_inputs(counts, 3, 4)
    b = b if bias else None
    torch.testing.assert_close(moe_ops.grouped_linear(x, w, b, offsets), grouped_linear_reference(x, w, b, counts))
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    fn = lambda x, w, *b: moe_ops.grouped_linear(x, w, b[0] if b else None, offsets)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    if bias:  # an expert without rows gets zero weight and bias gradients
        moe_ops.grouped_linear(*leaves, offsets).sum().backward()
        empty = counts == 0
        assert (leaves[1].grad[empty] == 0).all() and (leaves[2].grad[empty] == 0).all()


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("offsets_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", GROUP_COUNTS[:2])
def test_opcheck_grouped_linear(counts, dtype, offsets_dtype, requires_grad):
    x, w, b, _, offsets = grouped_inputs(counts, 3, 4, dtype, offsets_dtype)
    for bias in (b, None):
        args = [t.clone().requires_grad_(requires_grad) for t in (x, w)] + [bias, offsets]
        if bias is not None:
            args[2] = bias.clone().requires_grad_(requires_grad)
        torch.library.opcheck(OPS.grouped_linear.default, tuple(args))
    torch.library.opcheck(OPS.grouped_linear_weight_grad.default, (x, torch.randn(x.shape[0], 4, dtype=dtype), offsets))


def test_grouped_linear_grouped_mm_path_matches_the_loop(monkeypatch):
    """The torch._grouped_mm path (taken for bf16 on sm90+ GPUs), forced here on the CPU in float32."""
    x, w, b, counts, offsets = grouped_inputs([5, 0, 9, 2], 16, 8, torch.float32, torch.int32)
    results = []
    for grouped_mm in (False, True):
        monkeypatch.setattr(moe_ops, "_grouped_mm_supported", lambda a, b, use=grouped_mm: use)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = moe_ops.grouped_linear(*leaves, offsets)
        (y * torch.linspace(-1, 1, 8)).sum().backward()
        results.append([y] + [t.grad for t in leaves])
    torch.testing.assert_close(results[0][0], grouped_linear_reference(x, w, b, counts))
    for loop, grouped in zip(*results):
        torch.testing.assert_close(grouped, loop)


@pytest.mark.parametrize("offsets", [[3, 2, 8], [3, 5, 7], [3, 5, 9], [-1, 5, 8]])
def test_grouped_linear_rejects_bad_offsets(offsets):
    x, w, b, _, _ = grouped_inputs([3, 2, 3], 3, 4)
    with pytest.raises(ValueError, match="offsets must be non-decreasing end rows from 0 to 8"):
        moe_ops.grouped_linear(x, w, b, torch.tensor(offsets))
    with pytest.raises(ValueError, match="expected x"):
        moe_ops.grouped_linear(x, w, b, torch.tensor([3, 8]))


@pytest.fixture
def fresh_kernel_devices(monkeypatch):
    """kernel_devices and its log lines as if first called (it is cached), and again after the test."""
    monkeypatch.setattr(moe_ops, "_logged", set())
    moe_ops.kernel_devices.cache_clear()
    yield
    moe_ops.kernel_devices.cache_clear()


@needs_ext
def test_kernel_devices_is_cached_and_said_once(fresh_kernel_devices, capsys):
    devices = moe_ops.kernel_devices(6, 2)
    assert isinstance(devices, frozenset) and "cpu" in devices and "meta" not in devices
    assert ("cuda" in devices) == (HAS_CUDA_OPS and EXT.cuda_kernel_status(torch.cuda.current_device()) == "")
    assert moe_ops.kernel_devices(6, 2) is devices
    lines = capsys.readouterr().err.splitlines()
    assert lines.count(f"nanosar: MoE ops on cpu: C++ kernels of {EXT.__name__}") == 1


@needs_ext
def test_kernel_devices_beyond_the_limits_fall_back_with_one_line(fresh_kernel_devices, monkeypatch, capsys):
    monkeypatch.setattr(EXT, "max_top_k", 1)
    for _ in range(3):
        assert "cpu" not in moe_ops.kernel_devices(6, 2)
    assert "cpu" in moe_ops.kernel_devices(6, 1)
    lines = [line for line in capsys.readouterr().err.splitlines() if "pure-PyTorch reference" in line]
    assert lines == ["nanosar: MoE ops on cpu: pure-PyTorch reference, because top_k=2 is above the kernels' limit of 1"]


def test_kernel_devices_without_the_extension(fresh_kernel_devices, monkeypatch, capsys):
    monkeypatch.setattr(moe_ops, "_device_support", lambda device_type, index: (None, "the extension is not built"))
    assert moe_ops.kernel_devices(6, 1) == frozenset()
    assert "MoE ops on cpu: pure-PyTorch reference, because the extension is not built" in capsys.readouterr().err
    monkeypatch.setattr(moe_ops, "_EXT", None)
    with pytest.raises(RuntimeError, match="extension is not built"):
        moe_ops.gating(torch.randn(3, 2), 1)


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
        OPS.combine_backward(torch.randn(3, 4, device="cuda"), out, gates, twice)
    with pytest.raises(RuntimeError, match=r"expert id -3 outside \[0, 6\)"):
        moe_ops.permute(torch.randn(3, 4, device="cuda"), torch.tensor([[0, 1], [2, -3], [5, 0]], device="cuda"), 6)
    # unchecked: bad entries are skipped, nothing is read or written out of bounds
    OPS.combine(out, gates, torch.tensor([0, 1, 2, 3, 4, 1 << 40], device="cuda"), check_order=False)
    torch.cuda.synchronize()
    order = torch.tensor([5, 4, 3, 2, 1, 0], device="cuda")
    torch.testing.assert_close(moe_ops.combine(out, gates, order), M.combine(out, gates, order))


@gpu_test
def test_cuda_kernels_have_an_image_for_this_gpu_and_limits_fall_back(fresh_kernel_devices, capsys):
    assert EXT.cuda_kernel_status(torch.cuda.current_device()) == ""
    E = EXT.max_experts_cuda + 1
    assert moe_ops.kernel_devices(E, 1) == {"cpu"}
    assert f"n_experts={E} is above the CUDA kernels' limit" in capsys.readouterr().err
    assert moe_ops.kernel_devices(E - 1, 1) == {"cpu", "cuda"}


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
    """bf16 autocast: the fast dispatch with the CUDA kernels (and torch._grouped_mm on sm90+) against its
    PyTorch path (kernels off) and the reference loop."""
    (y0, c0, gz0, gp0), *others = [moe_layer_results(E, k, "reference", device="cuda", autocast=True),
                                   moe_layer_results(E, k, "fast", device="cuda", autocast=True),
                                   moe_layer_results(E, k, "fast", kernels=False, device="cuda", autocast=True)]
    for y1, c1, gz1, gp1 in others:
        assert torch.equal(c0, c1)
        assert_relative_error(y1, y0, 1e-2)
        assert_relative_error(gz1, gz0, 2e-2)
        for a, b in zip(gp0, gp1):
            assert_relative_error(b, a, 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@gpu_test
def test_opcheck_cuda(dtype):
    """opcheck of every operator on CUDA tensors (fp32, and bf16 for which grouped_linear takes
    torch._grouped_mm on sm90+), with and without requires_grad for the forward ops."""
    T, E, k, D = 300, 16, 2, 64
    for requires_grad in (False, True):
        logits = make_logits(T, E, ties=False, dtype=dtype, device="cuda").requires_grad_(requires_grad)
        torch.library.opcheck(OPS.gating.default, (logits, k))
        x, expert_idx, gates, order, expert_out = [t.cuda() for t in routed(T, E, k, D, dtype)]
        torch.library.opcheck(OPS.permute.default, (x.requires_grad_(requires_grad), expert_idx, E))
        torch.library.opcheck(OPS.combine.default, (expert_out.requires_grad_(requires_grad),
                                                    gates.requires_grad_(requires_grad), order))
        xs, w, b, _, offsets = [t.cuda() for t in grouped_inputs([40, 0, 200, 360], D, 32, dtype)]
        torch.library.opcheck(OPS.grouped_linear.default, (xs.requires_grad_(requires_grad),
                                                           w.requires_grad_(requires_grad), b, offsets))
    gates, mean_prob, z_loss, expert_idx, _ = OPS.gating(logits.detach(), k)
    torch.library.opcheck(OPS.gating_backward.default, (logits.detach(), expert_idx, gates, torch.randn_like(gates),
                                                        torch.randn_like(mean_prob), torch.randn_like(z_loss)))
    torch.library.opcheck(OPS.combine_backward.default,
                          (torch.randn(T, D, device="cuda", dtype=dtype), expert_out.detach(), gates, order))
    torch.library.opcheck(OPS.grouped_linear_weight_grad.default,
                          (xs.detach(), torch.randn(xs.shape[0], 32, device="cuda", dtype=dtype), offsets))


@gpu_test
def test_grouped_linear_cuda_bf16_matches_the_loop():
    """bf16 on CUDA: torch._grouped_mm where supported (sm90+), else the loop; values and gradients against
    the plain loop in float32."""
    xs, w, b, counts, offsets = [t.cuda() for t in grouped_inputs([40, 0, 200, 360, 0], 64, 32, torch.bfloat16)]
    leaves = [t.clone().requires_grad_() for t in (xs, w, b)]
    y = moe_ops.grouped_linear(*leaves, offsets)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_leaves = [t.float().requires_grad_() for t in (xs, w, b)]
    ref = grouped_linear_reference(*ref_leaves, counts)
    ref.backward(grad.float())
    assert_relative_error(y, ref, 1e-2)
    for t, r in zip(leaves, ref_leaves):
        assert_relative_error(t.grad, r.grad, 2e-2)
