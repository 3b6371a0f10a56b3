"""
Benchmark of the MoE dispatch kernels (a script, not a test): csrc/ ops against their pure-PyTorch
references, and their share of a whole MoE layer. Figures are medians of one run, printed as ratios.

    python -m nanosar.bench_ops                    # CPU: C++ ops, small sizes
    python -m nanosar.bench_ops --device=cuda      # GPU: T=32768, D=1024, Dh=4096, E in {6,16,64}, bf16

For each E and k: forward and forward+backward time of gating, permute and combine, reference vs
kernel (target on an H200: kernel at least 3x faster), the three kernels' share of the MoE layer's
forward+backward (target: under 10%), and the cost of combine's index check (on CUDA a device-to-host
read of the check's flags, i.e. a stream sync; the CPU op always checks, so there the two are equal).
The layer against a dense FFN and the presets against a dense ViT are in nanosar/bench_model.py.
"""

import argparse

import torch

from nanosar import model as M
from nanosar import moe_ops
from nanosar.bench_model import free_cuda_cache, layer_times, time_call


def op_runners(impl, logits, x, expert_out, E, k):
    """{op: (forward, forward+backward)} closures for impl = model (reference) or moe_ops (kernels)."""
    idx, gates, _, _, _ = M.gating(logits, k)
    order = M.permute(x[:, :1], idx, E)[1]

    def gating_fb():
        leaf = logits.detach().requires_grad_()
        _, g, _, mp, z = impl.gating(leaf, k)
        (g.sum() + mp.sum() + z).backward()

    def permute_fb():
        leaf = x.detach().requires_grad_()
        impl.permute(leaf, idx, E)[0].backward(expert_out)

    def combine_fb():
        out, g = expert_out.detach().requires_grad_(), gates.detach().requires_grad_()
        impl.combine(out, g, order).backward(x)

    return {
        "gating": (lambda: impl.gating(logits, k), gating_fb),
        "permute": (lambda: impl.permute(x, idx, E), permute_fb),
        "combine": (lambda: impl.combine(expert_out, gates, order), combine_fb),
    }


def combine_check_times(logits, x, expert_out, E, k, device, reps):
    """Milliseconds of the combine kernel's forward with and without its check of order."""
    ext = moe_ops.extension_for(x)
    expert_idx, gates = M.gating(logits, k)[:2]
    order = M.permute(x[:, :1], expert_idx, E)[1]
    times = []
    for check in (True, False):
        run = lambda c=check: ext.combine_forward(expert_out, gates, order, check_order=c)  # noqa: E731
        times.append(time_call(run, device, reps=reps) * 1e3)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default 4096 (cpu), 32768 (cuda)")
    parser.add_argument("--width", type=int, default=None, help="D; default 256 (cpu), 1024 (cuda); Dh = 4 D")
    parser.add_argument("--experts", type=int, nargs="+", default=[6, 16, 64])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default fp32 cpu, bf16 cuda")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    T = args.tokens or (32768 if gpu else 4096)
    D = args.width or (1024 if gpu else 256)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if moe_ops.extension_for(torch.empty(0, device=device)) is None:
        raise SystemExit(f"no extension ops for {device.type}: {moe_ops.build_hint()}")
    if gpu:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"T={T} tokens, D={D}, Dh={4 * D}, {dtype}, {device.type}; times in ms (median of {args.reps})")
    print(f"{'E':>3s} {'k':>2s} {'op':8s} {'ref fwd':>8s} {'kern fwd':>9s} {'speed-up':>9s} "
          f"{'ref f+b':>8s} {'kern f+b':>9s} {'speed-up':>9s}")
    for E in args.experts:
        for k in (1, 2):
            torch.manual_seed(0)
            logits = torch.randn(T, E, device=device)                   # the router computes in float32
            x = torch.randn(T, D, device=device, dtype=dtype)
            expert_out = torch.randn(T * k, D, device=device, dtype=dtype)
            ref, ker = op_runners(M, logits, x, expert_out, E, k), op_runners(moe_ops, logits, x, expert_out, E, k)
            kernel_fb_total = 0.0
            for op in ref:
                times = [time_call(fn, device, reps=args.reps) for fn in (*ref[op], *ker[op])]
                rf, rfb, kf, kfb = (t * 1e3 for t in times)
                kernel_fb_total += kfb
                print(f"{E:3d} {k:2d} {op:8s} {rf:8.3f} {kf:9.3f} {rf / kf:8.1f}x "
                      f"{rfb:8.3f} {kfb:9.3f} {rfb / kfb:8.1f}x")
            checked, unchecked = combine_check_times(logits, x, expert_out, E, k, device, args.reps)
            print(f"{E:3d} {k:2d} {'check':8s} combine forward with the order check {checked:.3f} ms, "
                  f"without {unchecked:.3f} ms ({checked / unchecked:.2f}x)")
            layer = M.MoEFFN(D, 4 * D, E, k, descriptor_dim=3, dispatch="kernels").to(device, dtype)
            z = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
            layer_fb = layer_times(layer, z, torch.randn(1, 3, device=device), device, args.reps)[1] * 1e3
            print(f"{E:3d} {k:2d} {'share':8s} gating+permute+combine fwd+bwd = {kernel_fb_total:.3f} ms of the "
                  f"layer's {layer_fb:.3f} ms: {100 * kernel_fb_total / layer_fb:.1f}%")
            layer = None
            free_cuda_cache(device)

if __name__ == "__main__":
    main()
