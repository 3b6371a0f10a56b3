"""
The MoE dispatch kernels of csrc/ as autograd Functions, with the signatures of the pure-PyTorch
references in nanosar/model.py, which the tests hold them to:

    gating(logits (T, E), k)        -> expert_idx (T, k), gates (T, k), counts (E,), mean_prob (E,), z_loss ()
    permute(x (T, D), expert_idx, E) -> x_sorted (T*k, D), order (T*k,), counts (E,)
    combine(expert_out (T*k, D), gates (T, k), order) -> y (T, D)

Which implementation runs (said once on stderr, with the reason when it is the reference):
    CUDA tensors + extension built with CUDA -> csrc/*.cu
    CPU tensors  + extension built           -> csrc/*_cpu.cpp
    otherwise -> model.py's references: no extension, built without CUDA, a GPU the build has no kernel
    image for, the meta device, or a layer beyond the kernels' limits (top_k > 8; more than 512 experts
    on CUDA). moe_dispatch="auto" then falls back; moe_dispatch="kernels" raises with the same reason.

Index checks: permute rejects expert ids outside [0, E) and combine an order that is not a permutation
of [0, T*k) with a RuntimeError, never a memory fault. On CUDA each permute and each combine forward
reads its check back from the GPU (one small copy, a stream synchronisation: two per MoE layer in a
training step); the backward ops reuse the order checked in the forward and do not sync.

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


API_VERSION = 2  # csrc/bindings.cpp's api_version: a build of other sources is stale


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled module (nanosar._C, or the JIT build when NANOSAR_JIT=1), or None if there is none."""
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


def unsupported_reason(x, n_experts=1, top_k=1):
    """Why the extension's ops cannot run an MoE layer (n_experts, top_k) on x's device, or None if they can."""
    ext, reason = _device_support(x.device.type, x.device.index)
    if ext is None:
        return reason
    if top_k > ext.max_top_k:
        return f"top_k={top_k} is above the kernels' limit of {ext.max_top_k}"
    if x.is_cuda and n_experts > ext.max_experts_cuda:
        return f"n_experts={n_experts} is above the CUDA kernels' limit of {ext.max_experts_cuda}"
    return None


def extension_for(x):
    """The extension module that has ops for x's device, or None (not built, no CUDA kernels for it, meta)."""
    return _device_support(x.device.type, x.device.index)[0]


def _ext(x):
    ext, reason = _device_support(x.device.type, x.device.index)
    if ext is None:
        raise RuntimeError(reason)
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
        # order came from permute_forward: a permutation, no need for the check's device sync
        return _ext(order).combine_forward(grad_x_sorted.contiguous(), ones, order, check_order=False), None, None


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, gates, order):
        ctx.save_for_backward(expert_out, gates, order)
        return _ext(expert_out).combine_forward(expert_out, gates, order, check_order=True)

    @staticmethod
    def backward(ctx, grad_y):
        expert_out, gates, order = ctx.saved_tensors
        grad_out, grad_gates = _ext(expert_out).combine_backward(grad_y.contiguous(), expert_out, gates, order,
                                                                 check_order=False)  # checked in forward
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
