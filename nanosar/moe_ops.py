"""
The MoE dispatch ops as PyTorch custom operators (torch.ops.nanosar.*), with the signatures of the
pure-PyTorch references in nanosar/model.py, which the tests hold them to:

    gating(logits (T, E), k)        -> expert_idx (T, k), gates (T, k), counts (E,), mean_prob (E,), z_loss ()
    permute(x (T, D), expert_idx, E) -> x_sorted (T*k, D), order (T*k,), counts (E,)
    combine(expert_out (T*k, D), gates (T, k), order) -> y (T, D)
    grouped_linear(x (S, Din), w (E, Din, Dout), b (E, Dout), offsets (E,)) -> (S, Dout)

gating, permute and combine are the kernels of csrc/ (C++ on CPU tensors, CUDA on CUDA tensors): the
extension defines the operators and registers its kernels with PyTorch's dispatcher (TORCH_LIBRARY in
csrc/bindings.cpp); this file adds what PyTorch needs around them, each op's fake function (output
shapes, for torch.compile and the meta device) and its autograd formula (torch.library.register_fake and
register_autograd). grouped_linear, the experts' matmuls, is a custom operator written here in Python.
Being operators, they are single opaque nodes in a torch.compile graph: the host reads inside them (the
index checks, grouped_linear's segment sizes) cause no graph break. torch.library.opcheck passes on each.

Where the kernels run, for an MoE layer of n_experts and top_k: kernel_devices(n_experts, top_k), a
frozenset of "cpu" / "cuda", worked out once (and said once on stderr, with the reason where a device
falls back to the PyTorch path): no extension, built without CUDA, a GPU the build has no kernel image
for, or a layer beyond the kernels' limits (top_k > 8; more than 512 experts on CUDA). The meta device
never runs the kernels. unsupported_reason(x, n_experts, top_k) gives the reason for one tensor's device.

Index checks: permute rejects expert ids outside [0, E) and combine an order that is not a permutation
of [0, T*k) with a RuntimeError, never a memory fault. On CUDA each check reads a flag back from the GPU
(one small copy, a stream synchronisation). combine(..., check_order=False) skips it for an order that
permute made (model.dispatch_sorted, and the backward formulas below), so an MoE layer's training step
syncs once for the kernels (permute's check), plus grouped_linear's reads off its torch._grouped_mm path.

Build it with `pip install --no-build-isolation -e .` (setup.py), or set NANOSAR_JIT=1 to compile the
sources of csrc/ just in time with ninja (torch.utils.cpp_extension.load), which is handy when editing
a kernel: the build is cached and redone when a source changes.
"""

import functools
import glob
import os
import sys
from typing import Optional

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def build_hint():
    return "build it with `pip install --no-build-isolation -e .`, or set NANOSAR_JIT=1 to compile csrc/ on first use"


def build_jit(verbose=False):
    """Compile csrc/ now with torch.utils.cpp_extension.load (ninja); CUDA sources too when CUDA is usable."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    with_cuda = torch.cuda.is_available() and CUDA_HOME is not None
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    flags = ["-O3", "-DWITH_CUDA"] if with_cuda else ["-O3"]
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))   # headers of pip's nvidia-* wheels
    includes = sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include"))) if with_cuda else []
    return load(name="nanosar_C_jit", sources=sources, extra_cflags=flags, extra_cuda_cflags=flags + ["-lineinfo"],
                extra_include_paths=includes, with_cuda=with_cuda, verbose=verbose)


API_VERSION = 3  # csrc/bindings.cpp's api_version: a build of other sources is stale


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled module (nanosar._C, or the JIT build when NANOSAR_JIT=1), or None if there is none.
    Loading it registers the operators torch.ops.nanosar.{gating, gating_backward, permute, combine, ...}."""
    if os.environ.get("NANOSAR_JIT") == "1":
        return build_jit()
    try:
        from nanosar import _C
    except ImportError:
        return None
    if getattr(_C, "api_version", 1) != API_VERSION:
        log_once(f"nanosar: {_C.__file__} is stale (built from older csrc/): ignored; {build_hint()}")
        return None
    return _C


_logged = set()


def log_once(message):
    """Print message on stderr the first time it comes."""
    if message not in _logged:
        _logged.add(message)
        print(message, file=sys.stderr)


# -----------------------------------------------------------------------------
# Where the kernels can run


@functools.lru_cache(maxsize=None)
def _device_support(device_type, device_index):
    """(extension, None) if its ops run on this device, else (None, why not)."""
    ext = load_extension()
    if device_type not in ("cpu", "cuda"):
        return None, f"the nanosar extension has no {device_type} ops"
    if ext is None:
        return None, f"the nanosar extension is not built: {build_hint()}"
    if device_type == "cuda":
        if not ext.with_cuda:
            return None, "the nanosar extension was built without CUDA; rebuild it with a CUDA toolkit"
        index = torch.cuda.current_device() if device_index is None else device_index
        problem = ext.cuda_kernel_status(index)
        if problem:
            major, minor = torch.cuda.get_device_capability(index)
            return None, (f"the nanosar CUDA kernels cannot run on {torch.cuda.get_device_name(index)} "
                          f"(compute capability {major}.{minor}): {problem}; "
                          f"rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\"")
    return ext, None


def _unsupported(device_type, device_index, n_experts, top_k):
    ext, reason = _device_support(device_type, device_index)
    if ext is None:
        return reason
    if top_k > ext.max_top_k:
        return f"top_k={top_k} is above the kernels' limit of {ext.max_top_k}"
    if device_type == "cuda" and n_experts > ext.max_experts_cuda:
        return f"n_experts={n_experts} is above the CUDA kernels' limit of {ext.max_experts_cuda}"
    return None


def unsupported_reason(x, n_experts=1, top_k=1):
    """Why the extension's ops cannot run an MoE layer (n_experts, top_k) on x's device, or None if they can."""
    return _unsupported(x.device.type, x.device.index, n_experts, top_k)


def extension_for(x):
    """The extension module that has ops for x's device, or None (not built, no CUDA kernels for it, meta)."""
    return _device_support(x.device.type, x.device.index)[0]


@functools.lru_cache(maxsize=None)
def kernel_devices(n_experts, top_k):
    """The device types ("cpu", "cuda") on which the kernels run an MoE layer of n_experts and top_k.

    Call it once when the layer is built and use the kernels iff x.device.type is in the set: a fixed
    branch, which torch.compile specialises on. Cached; each device's choice is said once on stderr,
    with the reason where it falls back to the PyTorch path. "cuda" is judged on the current CUDA
    device and only where CUDA is available; "meta" is never in the set.
    """
    devices = set()
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        reason = _unsupported(device_type, None, n_experts, top_k)
        if reason is None:
            devices.add(device_type)
            kind = "CUDA" if device_type == "cuda" else "C++"
            log_once(f"nanosar: MoE ops on {device_type}: {kind} kernels of {load_extension().__name__}")
        else:
            log_once(f"nanosar: MoE ops on {device_type}: pure-PyTorch reference, because {reason}")
    return frozenset(devices)


# -----------------------------------------------------------------------------
# gating, permute, combine: the extension's operators, their fake functions and autograd formulas


def _acc_dtype(dtype):
    """The kernels' accumulation type: float32 for float32/float16/bfloat16, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _gating_fake(logits, top_k):
    T, E = logits.shape
    acc = _acc_dtype(logits.dtype)
    return (logits.new_empty(T, top_k, dtype=acc), logits.new_empty(E, dtype=acc), logits.new_empty((), dtype=acc),
            logits.new_empty(T, top_k, dtype=torch.long), logits.new_empty(E, dtype=torch.long))


def _gating_backward_fake(logits, expert_idx, gates, grad_gates, grad_mean_prob, grad_z_loss):
    return logits.new_empty(logits.shape)


def _permute_fake(x, expert_idx, n_experts):
    rows = x.shape[0] * expert_idx.shape[1]                                   # T*k
    return x.new_empty(rows, x.shape[1]), expert_idx.new_empty(rows), expert_idx.new_empty(n_experts)


def _combine_fake(expert_out, gates, order, check_order=True):
    return expert_out.new_empty(gates.shape[0], expert_out.shape[1])


def _combine_backward_fake(grad_y, expert_out, gates, order, check_order=True):
    return expert_out.new_empty(expert_out.shape), gates.new_empty(gates.shape)


def _gating_setup(ctx, inputs, output):
    logits, _ = inputs
    gates, _, _, expert_idx, _ = output
    ctx.save_for_backward(logits, expert_idx, gates)


def _gating_backward(ctx, grad_gates, grad_mean_prob, grad_z_loss, _grad_idx, _grad_counts):
    logits, expert_idx, gates = ctx.saved_tensors
    zeros = lambda shape: gates.new_zeros(shape)  # noqa: E731  (an output the loss did not use)
    grad_gates = zeros(gates.shape) if grad_gates is None else grad_gates
    grad_mean_prob = zeros(logits.shape[1:]) if grad_mean_prob is None else grad_mean_prob
    grad_z_loss = zeros(()) if grad_z_loss is None else grad_z_loss
    grad_logits = torch.ops.nanosar.gating_backward(logits, expert_idx, gates, grad_gates, grad_mean_prob, grad_z_loss)
    return grad_logits, None


def _permute_setup(ctx, inputs, output):
    x, expert_idx, _ = inputs
    ctx.n_tokens, ctx.top_k = x.shape[0], expert_idx.shape[1]
    ctx.save_for_backward(output[1])                                          # order


def _permute_backward(ctx, grad_x_sorted, _grad_order, _grad_counts):
    (order,) = ctx.saved_tensors
    # the gradient of a row copy sums each token's k rows back: a combine with unit gates; order came
    # from the forward, a permutation, so no check (on CUDA: no device sync)
    ones = order.new_ones(ctx.n_tokens, ctx.top_k, dtype=_acc_dtype(grad_x_sorted.dtype))
    return torch.ops.nanosar.combine(grad_x_sorted, ones, order, False), None, None


def _combine_setup(ctx, inputs, output):
    expert_out, gates, order, _ = inputs
    ctx.save_for_backward(expert_out, gates, order)


def _combine_backward(ctx, grad_y):
    expert_out, gates, order = ctx.saved_tensors
    grad_out, grad_gates = torch.ops.nanosar.combine_backward(grad_y, expert_out, gates, order, False)  # checked
    return grad_out, grad_gates, None, None


def _register_extension_ops():
    """Fake functions and autograd formulas of the extension's operators (once, when it is loaded)."""
    for name, fake in [("gating", _gating_fake), ("gating_backward", _gating_backward_fake),
                       ("permute", _permute_fake), ("combine", _combine_fake),
                       ("combine_backward", _combine_backward_fake)]:
        torch.library.register_fake(f"nanosar::{name}", fake)
    # gating_backward and combine_backward have no formula: no double backward through gating and combine
    torch.library.register_autograd("nanosar::gating", _gating_backward, setup_context=_gating_setup)
    torch.library.register_autograd("nanosar::permute", _permute_backward, setup_context=_permute_setup)
    torch.library.register_autograd("nanosar::combine", _combine_backward, setup_context=_combine_setup)


_EXT = load_extension()
if _EXT is not None:
    _register_extension_ops()


def _require_extension():
    if _EXT is None:
        raise RuntimeError(f"the nanosar extension is not built: {build_hint()}")


def gating(logits, top_k):
    """Kernel twin of model.gating: logits (T, E) -> expert_idx, gates, counts, mean_prob, z_loss."""
    _require_extension()
    # the operator returns its float outputs first (csrc/moe_ops.h); here in the reference's order
    gates, mean_prob, z_loss, expert_idx, counts = torch.ops.nanosar.gating(logits, top_k)
    return expert_idx, gates, counts, mean_prob, z_loss


def permute(x, expert_idx, n_experts):
    """Kernel twin of model.permute (a worked example of order there): x (T, D), expert_idx (T, k) ->
    x_sorted (T*k, D), order (T*k,), counts (E,)."""
    _require_extension()
    return torch.ops.nanosar.permute(x, expert_idx, n_experts)


def combine(expert_out, gates, order, check_order=True):
    """Kernel twin of model.combine: expert_out (T*k, D), gates (T, k), order (T*k,) -> y (T, D).
    check_order=False skips the check that order is a permutation (on CUDA a host sync): only for an order
    that permute returned (dispatch_sorted); an unchecked bad entry is skipped, never read out of bounds."""
    _require_extension()
    return torch.ops.nanosar.combine(expert_out, gates.to(_acc_dtype(expert_out.dtype)), order, check_order)


# -----------------------------------------------------------------------------
# grouped_linear: every expert's linear layer on its contiguous block of rows, one operator


def _segments(offsets, rows):
    """[(start, end)] per expert from offsets (E,) of cumulative end rows; checks them (a host read)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    if any(end < start for start, end in zip(starts, ends)) or (ends and (ends[0] < 0 or ends[-1] != rows)):
        raise ValueError(f"grouped_linear: offsets must be non-decreasing end rows from 0 to {rows} "
                         f"(the cumulative sum of the rows per expert), got {ends}")
    return list(zip(starts, ends))


def _grouped_mm_supported(a, b):
    """Whether torch._grouped_mm runs a fast kernel for a @ b: bf16 on sm90+ GPUs, rows of 16-byte multiples."""
    return (a.is_cuda and a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
            and a.shape[-1] % 8 == 0 and b.shape[-1] % 8 == 0 and _is_sm90_or_newer(a.device.index))


@functools.lru_cache(maxsize=None)
def _is_sm90_or_newer(device_index):
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _expert_of_rows_onehot(offsets, rows, dtype):
    """(S, E) one-hot matrix of each row's expert, from the offsets, on the device (no host read)."""
    row = torch.arange(rows, device=offsets.device)
    expert = torch.searchsorted(offsets.to(torch.long), row, right=True)     # (S,) expert of each row
    return torch.zeros(rows, offsets.shape[0], dtype=dtype, device=offsets.device).scatter_(1, expert[:, None], 1)


def _check_grouped_shapes(x, w, b, offsets):
    E, Din, Dout = w.shape
    if x.dim() != 2 or x.shape[1] != Din or offsets.shape != (E,) or (b is not None and b.shape != (E, Dout)):
        raise ValueError(f"grouped_linear: expected x (S, {Din}), w (E, Din, Dout) = {tuple(w.shape)}, b (E, Dout) "
                         f"or None, offsets (E,); got x {tuple(x.shape)}, "
                         f"b {None if b is None else tuple(b.shape)}, offsets {tuple(offsets.shape)}")


@torch.library.custom_op("nanosar::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
    """Each expert's linear layer on its rows. x: (S, Din) grouped by expert, w: (E, Din, Dout),
    b: (E, Dout) or None, offsets: (E,) int32/int64 cumulative end rows (offsets[-1] = S) -> (S, Dout),
    out[offsets[e-1]:offsets[e]] = x[offsets[e-1]:offsets[e]] @ w[e] + b[e]. An expert may have no rows.

    One torch._grouped_mm where it is fast (bf16, sm90+ GPUs; the offsets stay on the device, and the bias
    is added as (one-hot experts of the rows) @ b, never a gathered (S, Dout) bias); elsewhere one addmm
    per expert into its rows of the output, with the sizes read on the host: inside this operator, so
    the caller's torch.compile graph has no break, and checked (the grouped-matmul path trusts them).
    """
    _check_grouped_shapes(x, w, b, offsets)
    S = x.shape[0]
    if _grouped_mm_supported(x, w):
        out = torch._grouped_mm(x.contiguous(), w, offs=offsets.to(torch.int32))   # (S, Dout)
        return out if b is None else out.addmm_(_expert_of_rows_onehot(offsets, S, out.dtype), b)
    out = x.new_empty(S, w.shape[2])
    for e, (start, end) in enumerate(_segments(offsets, S)):
        if end == start:
            continue
        if b is None:
            torch.mm(x[start:end], w[e], out=out[start:end])                  # (n_e, Dout)
        else:
            torch.addmm(b[e], x[start:end], w[e], out=out[start:end])
    return out


@torch.library.custom_op("nanosar::grouped_linear_weight_grad", mutates_args=())
def grouped_linear_weight_grad(x: torch.Tensor, grad_out: torch.Tensor,
                               offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_linear's gradients for w and b: grad_w[e] = x_e^T grad_e (E, Din, Dout), grad_b[e] = grad_e.sum(0)
    (E, Dout), x_e and grad_e the rows of expert e; zero for an expert without rows."""
    E, S = offsets.shape[0], x.shape[0]
    if _grouped_mm_supported(x, grad_out):
        grad_w = torch._grouped_mm(x.t(), grad_out.contiguous(), offs=offsets.to(torch.int32))     # (E, Din, Dout)
        return grad_w, _expert_of_rows_onehot(offsets, S, grad_out.dtype).t() @ grad_out            # (E, Dout)
    grad_w = x.new_zeros(E, x.shape[1], grad_out.shape[1])
    grad_b = grad_out.new_zeros(E, grad_out.shape[1])
    for e, (start, end) in enumerate(_segments(offsets, S)):
        if end > start:
            torch.mm(x[start:end].t(), grad_out[start:end], out=grad_w[e])
            torch.sum(grad_out[start:end], dim=0, out=grad_b[e])
    return grad_w, grad_b


@grouped_linear.register_fake
def _grouped_linear_fake(x, w, b, offsets):
    _check_grouped_shapes(x, w, b, offsets)
    return x.new_empty(x.shape[0], w.shape[2])


@grouped_linear_weight_grad.register_fake
def _grouped_linear_weight_grad_fake(x, grad_out, offsets):
    E = offsets.shape[0]
    return x.new_empty(E, x.shape[1], grad_out.shape[1]), grad_out.new_empty(E, grad_out.shape[1])


def _grouped_linear_setup(ctx, inputs, output):
    x, w, b, offsets = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w, offsets)


def _grouped_linear_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_linear(grad, w.transpose(1, 2), None, offsets)      # (S, Din): rows @ w[e]^T
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        grad_w, grad_b = grouped_linear_weight_grad(x, grad, offsets)        # (E, Din, Dout), (E, Dout)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None


grouped_linear.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup)
