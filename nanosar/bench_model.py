"""
Benchmark of nanosar/model.py (a script, not a test): prints figures, measured in one run, as ratios.

    python -m nanosar.bench_model                      # CPU: small sizes, a few seconds
    python -m nanosar.bench_model --device=cuda        # GPU: 512x512 bf16, small and large presets

1. Forward tiles/s and peak memory of each preset with each dispatch, next to a dense ViT of the same
   active size (n_experts=1).
2. Training steps (forward, backward, AdamW) per second and peak memory of each preset, MoE against
   the dense ViT of the same active size (the issue-5 target: large >= 0.85x dense, batch 16 fits).
3. One MoE FFN layer (E experts, top-k) against a dense FFN with the same active FLOPs (hidden k*Dh),
   forward and forward+backward, for each dispatch (loop, grouped, and the extension's kernels if built).
"""

import argparse
import statistics
import time

import torch

from nanosar import moe_ops
from nanosar.model import Mlp, MoEFFN, SARConfig, Segmenter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup=2, reps=5):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_gib(device, fn):
    """Peak allocated GPU memory of fn() in GiB; None on CPU (no per-call allocator statistics there)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def moe_variants(device):
    """MoE dispatch variants to compare: the two references, and the extension's kernels when built."""
    variants = ["loop", "grouped"]
    if moe_ops.extension_for(torch.empty(0, device=device)) is not None:
        variants.append("kernels")
    return variants


def forward_rate(model, x, dtype, device, reps):
    """Forward tiles/s of model on x (B, C, H, W) under autocast to dtype, and peak GiB (None on CPU)."""

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)

    seconds = time_call(forward, device, warmup=1, reps=reps)
    return x.shape[0] / seconds, peak_memory_gib(device, forward)


def train_rate(model, x, dtype, device, reps):
    """Training tiles/s (forward, backward, AdamW step, bf16 autocast on GPU) and peak GiB (None on CPU)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    labels = torch.randint(0, model.cfg.num_classes, (x.shape[0], *x.shape[-2:]), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.logits.float(), labels) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    seconds = time_call(step, device, warmup=1, reps=reps)
    return x.shape[0] / seconds, peak_memory_gib(device, step)


def layer_times(layer, z, s, device, reps):
    """Median forward and forward+backward seconds of a dense Mlp or an MoEFFN on z (1, T, D)."""
    run = (lambda: layer(z)) if isinstance(layer, Mlp) else (lambda: layer(z, s)[0])
    with torch.no_grad():
        fwd = time_call(run, device, reps=reps)
    fwd_bwd = time_call(lambda: run().float().square().mean().backward(), device, reps=reps)
    return fwd, fwd_bwd


def free_cuda_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_presets(args, device, dtype):
    print(f"\n== forward, {args.size}x{args.size}, batch {args.batch}, {dtype}, {device.type} ==")
    print(f"{'preset':8s} {'variant':14s} {'tiles/s':>9s} {'vs dense':>9s} {'peak GiB':>9s}")
    for name in args.presets:
        x = torch.randn(args.batch, 1, args.size, args.size, device=device) * 3 - 12  # sigma0 in dB
        variants = [("dense", dict(n_experts=1))] + [(f"moe-{v}", dict(moe_dispatch=v)) for v in moe_variants(device)]
        dense_rate = None
        for variant, overrides in variants:
            model = Segmenter(SARConfig.preset(name, **overrides)).to(device).eval()
            rate, peak = forward_rate(model, x, dtype, device, args.reps)
            model = None  # free the weights before the next variant is built
            free_cuda_cache(device)
            dense_rate = dense_rate or rate
            peak_txt = f"{peak:9.2f}" if peak is not None else f"{'-':>9s}"
            print(f"{name:8s} {variant:14s} {rate:9.2f} {rate / dense_rate:8.2f}x {peak_txt}")


def bench_training(args, device, dtype):
    print(f"\n== training step, {args.size}x{args.size}, batch {args.train_batch}, {dtype}, {device.type} ==")
    print(f"{'preset':8s} {'variant':14s} {'tiles/s':>9s} {'vs dense':>9s} {'peak GiB':>9s}")
    for name in args.presets:
        x = torch.randn(args.train_batch, 1, args.size, args.size, device=device) * 3 - 12
        variants = [("dense", dict(n_experts=1))] + [(f"moe-{v}", dict(moe_dispatch=v)) for v in moe_variants(device)
                                                     if v != "loop"]
        dense_rate = None
        for variant, overrides in variants:
            model = Segmenter(SARConfig.preset(name, **overrides)).to(device)
            rate, peak = train_rate(model, x, dtype, device, args.reps)
            model = None
            free_cuda_cache(device)
            dense_rate = dense_rate or rate
            peak_txt = f"{peak:9.2f}" if peak is not None else f"{'-':>9s}"
            print(f"{name:8s} {variant:14s} {rate:9.2f} {rate / dense_rate:8.2f}x {peak_txt}", flush=True)


def bench_moe_layer(args, device, dtype):
    T, D, Dh = args.tokens, args.width, 4 * args.width
    print(f"\n== one FFN layer: T={T} tokens, D={D}, Dh={Dh}, {dtype}, {device.type}; dense FFN has hidden k*Dh ==")
    print(f"{'E':>3s} {'k':>2s} {'layer':14s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} "
          f"{'fwd vs dense':>13s} {'f+b vs dense':>13s}")
    for E in args.experts:
        for k in (1, 2):
            z = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
            s = torch.randn(1, 3, device=device)
            layers = {"dense": lambda: Mlp(D, k * Dh)}
            for dispatch in moe_variants(device):
                layers[f"moe-{dispatch}"] = lambda d=dispatch: MoEFFN(D, Dh, E, k, descriptor_dim=3, dispatch=d)
            base = None
            for label, make_layer in layers.items():
                fwd, fb = layer_times(make_layer().to(device, dtype), z, s, device, args.reps)
                free_cuda_cache(device)
                base = base or (fwd, fb)
                print(f"{E:3d} {k:2d} {label:14s} {fwd * 1e3:8.2f} {fb * 1e3:11.2f} {fwd / base[0]:12.2f}x "
                      f"{fb / base[1]:12.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=None, help="default: tiny small (cpu), small large (cuda)")
    parser.add_argument("--size", type=int, default=None, help="tile size; default 64 (cpu), 512 (cuda)")
    parser.add_argument("--batch", type=int, default=None, help="default 2 (cpu), 32 (cuda)")
    parser.add_argument("--train-batch", type=int, default=None, help="training step batch; default 2 (cpu), 16 (cuda)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default fp32 cpu, bf16 cuda")
    parser.add_argument("--tokens", type=int, default=None, help="MoE layer tokens; default 2048 (cpu), 32768 (cuda)")
    parser.add_argument("--width", type=int, default=None, help="MoE layer width D; default 256 (cpu), 1024 (cuda)")
    parser.add_argument("--experts", type=int, nargs="+", default=None, help="default 6 (cpu), 6 16 64 (cuda)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.presets = args.presets or (["small", "large"] if gpu else ["tiny", "small"])
    args.size = args.size or (512 if gpu else 64)
    args.batch = args.batch or (32 if gpu else 2)
    args.train_batch = args.train_batch or (16 if gpu else 2)
    args.tokens = args.tokens or (32768 if gpu else 2048)
    args.width = args.width or (1024 if gpu else 256)
    args.experts = args.experts or ([6, 16, 64] if gpu else [6])
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if gpu:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    bench_presets(args, device, dtype)
    bench_training(args, device, dtype)
    bench_moe_layer(args, device, dtype)


if __name__ == "__main__":
    main()
