"""
The MoE dispatch kernels of csrc/ as autograd Functions, with the signatures of the pure-PyTorch
references in nanosar/model.py, which the tests hold them to:

    gating(logits (T, E), k)        -> expert_idx (T, k), gates (T, k), counts (E,), mean_prob (E,), z_loss ()
    permute(x (T, D), expert_idx, E) -> x_sorted (T*k, D), order (T*k,), counts (E,)
    combine(expert_out (T*k, D), gates (T, k), order) -> y (T, D)

Which implementation runs (said once per device type on stderr):
    CUDA tensors + extension built with CUDA -> csrc/*.cu
    CPU tensors  + extension built           -> csrc/*_cpu.cpp
    otherwise (or on the meta device)        -> model.py's references (moe_dispatch="auto" falls back)

Build it with `pip install --no-build-isolation -e .` (setup.py), or set NANOSAR_JIT=1 to compile the
sources of csrc/ just in time with ninja (torch.utils.cpp_extension.load), which is handy when editing
a kernel: the build is cached and redone when a source changes.
"""

import functools
import glob
import os
import sys

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


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled module (nanosar._C, or the JIT build when NANOSAR_JIT=1), or None if there is none."""
    if os.environ.get("NANOSAR_JIT") == "1":
        return build_jit()
    try:
        from nanosar import _C
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def _extension_for_device(device_type):
    ext = load_extension()
    if device_type == "cuda" and ext is not None and not ext.with_cuda:
        print("nanosar: MoE ops on cuda: pure-PyTorch reference (extension built without CUDA)", file=sys.stderr)
        return None
    if device_type not in ("cpu", "cuda"):
        return None
    if ext is None:
        print(f"nanosar: MoE ops on {device_type}: pure-PyTorch reference (no extension; {build_hint()})",
              file=sys.stderr)
        return None
    kind = "CUDA kernels" if device_type == "cuda" else "C++ kernels"
    print(f"nanosar: MoE ops on {device_type}: {kind} of {ext.__name__}", file=sys.stderr)
    return ext


def extension_for(x):
    """The extension module that has ops for x's device, or None (not built, built without CUDA, meta)."""
    return _extension_for_device(x.device.type)


def _ext(x):
    ext = extension_for(x)
    if ext is None:
        raise RuntimeError(f"nanosar extension has no {x.device.type} ops; {build_hint()}")
    return ext


class GatingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k):
        expert_idx, gates, counts, mean_prob, z_loss = _ext(logits).gating_forward(logits, top_k)
        ctx.save_for_backward(logits, expert_idx, gates)
        ctx.mark_non_differentiable(expert_idx, counts)
        return expert_idx, gates, counts, mean_prob, z_loss

    @staticmethod
    def backward(ctx, _grad_idx, grad_gates, _grad_counts, grad_mean_prob, grad_z_loss):
        logits, expert_idx, gates = ctx.saved_tensors
        zeros = lambda shape: torch.zeros(shape, dtype=gates.dtype, device=gates.device)  # noqa: E731
        grad_gates = zeros(gates.shape) if grad_gates is None else grad_gates.contiguous()
        grad_mean_prob = zeros(logits.shape[1:]) if grad_mean_prob is None else grad_mean_prob.contiguous()
        grad_z_loss = zeros(()) if grad_z_loss is None else grad_z_loss.contiguous()
        grad_logits = _ext(logits).gating_backward(logits, expert_idx, gates, grad_gates, grad_mean_prob, grad_z_loss)
        return grad_logits, None


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_idx, n_experts):
        x_sorted, order, counts = _ext(x).permute_forward(x, expert_idx, n_experts)
        ctx.save_for_backward(order)
        ctx.top_k = expert_idx.shape[1]
        ctx.mark_non_differentiable(order, counts)
        return x_sorted, order, counts

    @staticmethod
    def backward(ctx, grad_x_sorted, _grad_order, _grad_counts):
        (order,) = ctx.saved_tensors
        # the gradient of a row copy sums each token's k rows back: a combine with unit gates
        T = order.numel() // ctx.top_k
        acc_dtype = torch.promote_types(grad_x_sorted.dtype, torch.float32)
        ones = torch.ones(T, ctx.top_k, dtype=acc_dtype, device=order.device)
        return _ext(order).combine_forward(grad_x_sorted.contiguous(), ones, order), None, None


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, gates, order):
        ctx.save_for_backward(expert_out, gates, order)
        return _ext(expert_out).combine_forward(expert_out, gates, order)

    @staticmethod
    def backward(ctx, grad_y):
        expert_out, gates, order = ctx.saved_tensors
        grad_out, grad_gates = _ext(expert_out).combine_backward(grad_y.contiguous(), expert_out, gates, order)
        return grad_out, grad_gates, None


def gating(logits, top_k):
    """Kernel twin of model.gating: logits (T, E) -> expert_idx, gates, counts, mean_prob, z_loss."""
    return GatingFunction.apply(logits.contiguous(), top_k)


def permute(x, expert_idx, n_experts):
    """Kernel twin of model.permute: x (T, D), expert_idx (T, k) -> x_sorted (T*k, D), order, counts."""
    return PermuteFunction.apply(x.contiguous(), expert_idx.contiguous(), n_experts)


def combine(expert_out, gates, order):
    """Kernel twin of model.combine: expert_out (T*k, D), gates (T, k), order (T*k,) -> y (T, D)."""
    acc_dtype = torch.promote_types(expert_out.dtype, torch.float32)
    return CombineFunction.apply(expert_out.contiguous(), gates.to(acc_dtype).contiguous(), order)
