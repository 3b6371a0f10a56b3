"""
Benchmark of nanosar/model.py (a script, not a test): prints figures, measured in one run, as ratios.

    python -m nanosar.bench_model                      # CPU: small sizes, a few seconds
    python -m nanosar.bench_model --device=cuda        # GPU: 512x512 bf16, small and large presets

1. Forward tiles/s and peak memory of each preset with each dispatch, next to a dense ViT of the same
   active size (n_experts=1).
2. Training steps (forward, backward, AdamW) per second and peak memory of each preset, MoE against
   the dense ViT of the same active size (the issue-5 target: large >= 0.85x dense, batch 16 fits).
3. One MoE FFN layer (E experts, top-k) against a dense FFN with the same active FLOPs (hidden k*Dh),
   forward and forward+backward, for each dispatch (loop, grouped, and the extension's kernels if built),
   with the peak memory of a forward (no grad, as in evaluation) and of a forward+backward, each variant
   measured in a fresh subprocess (CPU: growth of the peak resident set; CUDA: torch's peak allocated),
   above the resident weights and input. Two more rows force the torch._grouped_mm
   path (the one H100/H200 take in bf16; it runs on CPU in fp32 too): biases added by the in-place
   one-hot matmul of grouped_expert_ffn ("moe-gmm"), and by the per-row gather it replaced
   ("moe-gmm-gather", an (S, Dh) bias tensor), so the memory the change saves is measured in one run.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from nanosar import model as M
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


def grouped_expert_ffn_gathered_bias(x_sorted, expert_of_row, counts, w1, b1, w2, b2, use_grouped_mm=None):
    """The torch._grouped_mm path of model.grouped_expert_ffn as it was: biases gathered per row, the
    baseline of the "moe-gmm-gather" memory row."""
    offsets = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x_sorted, w1, offs=offsets) + b1[expert_of_row]        # (S, Dh) + gathered (S, Dh)
    return torch._grouped_mm(F.gelu(h), w2, offs=offsets) + b2[expert_of_row]


def make_layer(variant, D, Dh, E, k):
    """The layer of a benchmark variant: dense, moe-<dispatch>, moe-gmm or moe-gmm-gather (these two patch
    model.py's grouped path: only call them in a subprocess of their own)."""
    if variant == "dense":
        return Mlp(D, k * Dh)
    dispatch = variant.removeprefix("moe-")
    if dispatch.startswith("gmm"):
        M.grouped_mm_supported = lambda x: True                   # force torch._grouped_mm
        if dispatch == "gmm-gather":
            M.grouped_expert_ffn = grouped_expert_ffn_gathered_bias
        dispatch = "grouped"
    return MoEFFN(D, Dh, E, k, descriptor_dim=3, dispatch=dispatch)


def resident_kib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def layer_peak_memory_child(spec):
    """Runs in a fresh process: peak memory (MiB) of one forward (no grad, as in evaluation) and of one
    forward+backward of a layer, above what was resident before (weights and input counted in neither).
    Prints {"fwd": ..., "fwd+bwd": ...}."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    layer = make_layer(spec["variant"], spec["D"], spec["Dh"], spec["E"], spec["k"]).to(device, dtype)
    s = torch.randn(1, 3, device=device)
    z = torch.randn(1, spec["T"], spec["D"], device=device, dtype=dtype)

    def forward(z):
        return layer(z) if isinstance(layer, Mlp) else layer(z, s)[0]

    def fwd():
        with torch.no_grad():
            forward(z)

    def fwd_bwd():
        forward(z.detach().requires_grad_()).float().square().mean().backward()

    def peak_mib(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - before) / 2**20
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                         # reset the peak resident set (VmHWM) to the current one
        before = resident_kib("VmRSS")
        fn()
        return (resident_kib("VmHWM") - before) / 1024

    forward(z[:, :64].detach().requires_grad_()).sum().backward()  # library set-up, not the layer's memory
    layer.zero_grad(set_to_none=False)                             # gradient buffers exist before both runs
    print(json.dumps({"fwd": peak_mib(fwd), "fwd+bwd": peak_mib(fwd_bwd)}))


def layer_peak_memory(variant, args, device, dtype, E, k):
    """{"fwd": MiB, "fwd+bwd": MiB} peaks of the layer variant, measured in a fresh subprocess."""
    spec = dict(variant=variant, device=str(device), dtype=str(dtype).removeprefix("torch."), T=args.tokens,
                D=args.width, Dh=4 * args.width, E=E, k=k)
    # glibc returns every block of 64 KiB or more to the system when freed, so the resident set is live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-m", "nanosar.bench_model", "--layer-memory", json.dumps(spec)],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        print(f"   ({variant}: memory measurement failed: {result.stderr.strip().splitlines()[-1:]})")
        return {"fwd": float("nan"), "fwd+bwd": float("nan")}
    return json.loads(result.stdout.strip().splitlines()[-1])


def cell(value, width, fmt=".2f", suffix=""):
    """value formatted to width, or '-' when it was not measured (NaN)."""
    return f"{'-':>{width}s}" if math.isnan(value) else f"{value:{width - len(suffix)}{fmt}}{suffix}"


def bench_moe_layer(args, device, dtype):
    T, D, Dh = args.tokens, args.width, 4 * args.width
    print(f"\n== one FFN layer: T={T} tokens, D={D}, Dh={Dh}, {dtype}, {device.type}; dense FFN has hidden k*Dh ==")
    print("   peak MiB: one forward (no grad) and one forward+backward, each in a fresh process, above the "
          "resident weights and input;\n   moe-gmm*: torch._grouped_mm forced, memory only")
    print(f"{'E':>3s} {'k':>2s} {'layer':15s} {'fwd ms':>8s} {'f+b ms':>8s} {'fwd vs dense':>13s} "
          f"{'f+b vs dense':>13s} {'fwd MiB':>8s} {'f+b MiB':>8s} {'fwd vs dense':>13s} {'f+b vs dense':>13s}")
    nan = float("nan")
    for E in args.experts:
        for k in (1, 2):
            z = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
            s = torch.randn(1, 3, device=device)
            variants = ["dense"] + [f"moe-{d}" for d in moe_variants(device)]
            if args.memory and dtype != torch.float64:     # torch._grouped_mm takes fp32 (CPU) or bf16
                variants += ["moe-gmm", "moe-gmm-gather"]
            peaks = {}
            for variant in variants:
                fwd = fb = nan
                if not variant.startswith("moe-gmm"):      # they patch model.py: subprocess only
                    fwd, fb = layer_times(make_layer(variant, D, Dh, E, k).to(device, dtype), z, s, device, args.reps)
                    free_cuda_cache(device)
                mem = layer_peak_memory(variant, args, device, dtype, E, k) if args.memory else {}
                peaks[variant] = mem = {"fwd": mem.get("fwd", nan), "fwd+bwd": mem.get("fwd+bwd", nan)}
                if variant == "dense":
                    base = fwd, fb
                dense = peaks["dense"]
                print(f"{E:3d} {k:2d} {variant:15s} {cell(fwd * 1e3, 8)} {cell(fb * 1e3, 8)} "
                      f"{cell(fwd / base[0], 13, suffix='x')} {cell(fb / base[1], 13, suffix='x')} "
                      f"{cell(mem['fwd'], 8, '.1f')} {cell(mem['fwd+bwd'], 8, '.1f')} "
                      f"{cell(mem['fwd'] / dense['fwd'], 13, suffix='x')} "
                      f"{cell(mem['fwd+bwd'] / dense['fwd+bwd'], 13, suffix='x')}", flush=True)
            if "moe-gmm-gather" in peaks:
                new, old = peaks["moe-gmm"], peaks["moe-gmm-gather"]
                print(f"{E:3d} {k:2d} grouped_mm biases, in-place one-hot matmul / gathered per row: peak "
                      f"{new['fwd'] / old['fwd']:.2f}x forward, "
                      f"{new['fwd+bwd'] / old['fwd+bwd']:.2f}x forward+backward")


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
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the layer memory figures")
    parser.add_argument("--layer-memory", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.layer_memory:
        return layer_peak_memory_child(json.loads(args.layer_memory))
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
