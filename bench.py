"""
Benchmarks of nanosar (scripts, not tests). Every figure is measured in one run next to a baseline of
the same run (the reference op, a dense FFN, a dense ViT of the same active size, eager), plus peak memory.

    python bench.py params                   # parameter counts of every preset, next to the paper's
    python bench.py ops     [--device=cuda]  # gating, permute, combine: kernels vs references
    python bench.py model   [--device=cuda]  # presets vs a dense ViT (forward, training); one MoE layer vs a dense FFN
    python bench.py compile [--device=cuda --dtype=bfloat16 --presets large --size 512]  # torch.compile vs eager
    python bench.py data    [--split data/synth/N-G3-HH-db/train]    # read throughput of a prepared split
    python bench.py scene   --ckpt out/synth_tiny/ckpt.pt             # whole-scene prediction: speed, peak memory

Sizes default to seconds on a CPU and to the GPU scale with --device=cuda (`python bench.py model --help`).
MoE dispatch paths: "reference" (moe_dispatch="reference": a loop over the experts), "grouped" (the fast
path in PyTorch: sorted tokens, grouped matmuls; the kernels switched off by layer.kernel_devices =
frozenset()) and "fast" (the same with the csrc/ kernels; only where they run on the device).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from nanosar import model as M
from nanosar import moe_ops
from nanosar.model import PRESETS, Mlp, MoEFFN, SARConfig, Segmenter

ROOT = os.path.dirname(os.path.abspath(__file__))
NAN = float("nan")

# -----------------------------------------------------------------------------
# Measuring: one timer, one peak-memory probe, one fresh process


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup=2, reps=5):
    """Median wall time of fn() in seconds, after `warmup` calls."""
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


def peak_mib(fn, device):
    """Run fn(); return (peak, before) memory in MiB: torch's allocated CUDA memory, or on CPU this process's
    resident set (Linux: its high-water mark VmHWM, first reset to the current one through /proc/self/clear_refs)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, before / 2**20

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
    fn()
    return kib("VmHWM") / 1024, before / 1024


def in_fresh_process(code, env=None):
    """Run `python -c code` at the repository root in a fresh interpreter, so that no earlier allocation counts.
    Returns (the JSON value of its last output line, its whole output); (None, output) and a line if it fails."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                            env={**os.environ, **(env or {})})
    if result.returncode:
        print(f"   (fresh process failed: {result.stderr.strip().splitlines()[-1:]})")
        return None, result.stdout
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


def cell(value, width, fmt=".2f", suffix=""):
    """value right-aligned in width, or '-' where it was not measured (None or NaN)."""
    if value is None or math.isnan(value):
        return f"{'-':>{width}s}"
    return f"{value:{width - len(suffix)}{fmt}}{suffix}"


# -----------------------------------------------------------------------------
# What is measured: segmenters and single FFN layers on each dispatch path


def moe_paths(device, E=6, k=1):
    """The MoE dispatch paths on device: "fast" only where the kernels run there (elsewhere it is "grouped")."""
    fast = device.type in MoEFFN(8, 8, E, k, descriptor_dim=0).kernel_devices
    return ["reference", "grouped"] + (["fast"] if fast else [])


def dispatch(path):
    """SARConfig.moe_dispatch of a path: "reference", or "fast" for both "grouped" and "fast"."""
    return "reference" if path == "reference" else "fast"


def with_path(module, path):
    """module with every MoE layer's kernels switched off for path "grouped" (the fast path in PyTorch)."""
    if path == "grouped":
        for layer in module.modules():
            if isinstance(layer, MoEFFN):
                layer.kernel_devices = frozenset()
    return module


def segmenter(preset, path, device):
    """The preset's Segmenter: path "dense" (n_experts=1: the same active size), "reference", "grouped" or "fast"."""
    overrides = {"n_experts": 1} if path == "dense" else {"moe_dispatch": dispatch(path)}
    return with_path(Segmenter(SARConfig.preset(preset, **overrides)), path).to(device)


def ffn_layer(path, D, Dh, E, k):
    """One FFN: "dense" is an Mlp with hidden k*Dh (the MoE's active FLOPs), else an MoEFFN on that path."""
    if path == "dense":
        return Mlp(D, k * Dh)
    return with_path(MoEFFN(D, Dh, E, k, descriptor_dim=3, dispatch=dispatch(path)), path)


def segmenter_step(model, x, dtype, train):
    """A closure: one forward without grad (eval mode), or one training step (forward, backward, AdamW), of
    model on x (B, C, H, W) sigma0 in dB, under autocast to dtype."""
    model.train(train)
    if train:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)
        labels = torch.randint(0, model.cfg.num_classes, (x.shape[0], *x.shape[-2:]), device=x.device)

    def step():
        with torch.set_grad_enabled(train), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        if train:
            (F.cross_entropy(out.logits.float(), labels) + out.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def tiles_per_s(fn, batch, device, reps):
    """(tiles/s, peak GiB on CUDA else None, seconds of the first call: the compilation of a compiled model)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    rate = batch / time_call(fn, device, warmup=1, reps=reps)
    return rate, (peak_mib(fn, device)[0] / 1024 if device.type == "cuda" else None), first


def layer_call(layer, s):
    """layer as a function z (1, T, D) -> (1, T, D); s (1, 3): the MoE router's descriptors."""
    return layer if isinstance(layer, Mlp) else (lambda z: layer(z, s)[0])


def layer_times(layer, z, s, device, reps):
    """Median forward and forward+backward seconds of a dense Mlp or an MoEFFN on z (1, T, D)."""
    run = layer_call(layer, s)
    with torch.no_grad():
        fwd = time_call(lambda: run(z), device, reps=reps)
    return fwd, time_call(lambda: run(z).float().square().mean().backward(), device, reps=reps)


# -----------------------------------------------------------------------------
# params: the presets' sizes (built on the meta device: no memory, no time)


def bench_params(args):
    paper = {"small": "90M / 20M", "base": "300M / 80M", "large": "1.3B / 300M"}
    print(f"{'preset':8s} {'backbone total':>15s} {'backbone active':>16s} {'head':>9s}   paper (total / active)")
    for name in PRESETS:
        with torch.device("meta"):
            counts = Segmenter(SARConfig.preset(name)).parameter_counts()
        print(f"{name:8s} {counts['backbone_total'] / 1e6:14.1f}M {counts['backbone_active'] / 1e6:15.1f}M "
              f"{counts['head'] / 1e6:8.2f}M   {paper.get(name, '-')}")


# -----------------------------------------------------------------------------
# ops: the csrc/ kernels against their references in nanosar/model.py


def op_runners(impl, logits, x, expert_out, E, k):
    """{op: (forward, forward+backward)} closures for impl = model (references) or moe_ops (kernels)."""
    idx, gates = M.gating(logits, k)[:2]
    order = M.permute(x[:, :1], idx, E)[1]

    def gating_fb():
        _, g, _, mean_prob, z_loss = impl.gating(logits.detach().requires_grad_(), k)
        (g.sum() + mean_prob.sum() + z_loss).backward()

    def permute_fb():
        impl.permute(x.detach().requires_grad_(), idx, E)[0].backward(expert_out)

    def combine_fb():
        impl.combine(expert_out.detach().requires_grad_(), gates.detach().requires_grad_(), order).backward(x)

    return {"gating": (lambda: impl.gating(logits, k), gating_fb),
            "permute": (lambda: impl.permute(x, idx, E), permute_fb),
            "combine": (lambda: impl.combine(expert_out, gates, order), combine_fb),
            "check": [lambda c=c: torch.ops.nanosar.combine(expert_out, gates, order, c) for c in (True, False)]}


def bench_ops(args, device, dtype):
    """For each E and k: forward and forward+backward of gating, permute and combine, reference vs kernel
    (target on an H200: kernel at least 3x faster); the kernels' share of the MoE layer's forward+backward
    (target: under 10%); the cost of combine's index check (on CUDA a device-to-host read of its flags, a
    stream sync; the CPU op always checks, so there the two are equal)."""
    if "fast" not in moe_paths(device):
        raise SystemExit(f"no extension ops for {device.type}: {moe_ops.build_hint()}")
    T, D = args.tokens, args.width
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
            ms = {op: [time_call(fn, device, reps=args.reps) * 1e3 for fn in (*ref[op], *ker[op])]
                  for op in ("gating", "permute", "combine")}
            for op, (rf, rfb, kf, kfb) in ms.items():
                print(f"{E:3d} {k:2d} {op:8s} {rf:8.3f} {kf:9.3f} {rf / kf:8.1f}x "
                      f"{rfb:8.3f} {kfb:9.3f} {rfb / kfb:8.1f}x")
            checked, unchecked = (time_call(fn, device, reps=args.reps) * 1e3 for fn in ker["check"])
            print(f"{E:3d} {k:2d} {'check':8s} combine forward with the order check {checked:.3f} ms, "
                  f"without {unchecked:.3f} ms ({checked / unchecked:.2f}x)")
            z = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
            layer = ffn_layer("fast", D, 4 * D, E, k).to(device, dtype)
            layer_fb = layer_times(layer, z, torch.randn(1, 3, device=device), device, args.reps)[1] * 1e3
            kernels_fb = sum(times[3] for times in ms.values())
            print(f"{E:3d} {k:2d} {'share':8s} gating+permute+combine fwd+bwd = {kernels_fb:.3f} ms of the "
                  f"layer's {layer_fb:.3f} ms: {100 * kernels_fb / layer_fb:.1f}%")


# -----------------------------------------------------------------------------
# model and compile: each preset against the dense ViT of the same active size, eager (and compiled)


def compiled_rate(model, x, dtype, train, device, reps):
    """tiles_per_s of torch.compile(model), and None; or NaNs and the error's first line if it fails."""
    torch._dynamo.reset()      # fresh caches: the earlier models count toward no recompilation limit
    try:
        return tiles_per_s(segmenter_step(torch.compile(model), x, dtype, train), x.shape[0], device, reps), None
    except Exception as e:  # noqa: BLE001  (a benchmark reports a failed compile and goes on)
        return (NAN, None, NAN), f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def bench_segmenters(args, device, dtype, train, paths, compiled=False):
    """Tiles/s and peak memory of a forward (or a training step) of each preset on each MoE path, next to the
    dense ViT of the same active size (targets, large: training >= 0.85x dense with batch 16 fitting; compiled
    forward >= 0.95x compiled dense). With compiled, also under torch.compile(model), default mode ("compile s":
    the first compiled call, shorter when inductor's on-disk cache holds the graphs from an earlier run); a
    failed compile prints its error's first line and the run goes on."""
    batch = args.train_batch if train else args.batch
    what = "training step (forward, backward, AdamW)" if train else "forward"
    print(f"\n== {'eager and compiled ' if compiled else ''}{what}, {args.size}x{args.size}, batch {batch}, "
          f"{dtype}, {device.type} ==")
    columns = f"{'tiles/s':>9s} {'vs dense':>9s} {'peak GiB':>9s}"
    print(f"{'preset':8s} {'variant':14s} {columns}" + (f" | compiled {columns} {'vs eager':>9s} {'compile s':>10s}"
                                                        if compiled else ""))
    for name in args.presets:
        x = torch.randn(batch, 1, args.size, args.size, device=device) * 3 - 12   # (B, 1, H, W) sigma0 in dB
        dense = None
        for path in ["dense"] + paths:
            model = segmenter(name, path, device)
            eager = tiles_per_s(segmenter_step(model, x, dtype, train), batch, device, args.reps)
            comp, error = compiled_rate(model, x, dtype, train, device, args.reps) if compiled else (None, None)
            model = None
            torch.cuda.empty_cache()   # a no-op without CUDA
            dense = dense or (eager, comp)
            cells = [f"{cell(rate, 9)} {cell(rate / base, 9, suffix='x')} {cell(peak, 9)}"
                     for (rate, peak, _), (base, _, _) in zip((eager, comp) if compiled else (eager,), dense)]
            variant = path if path == "dense" else f"moe-{path}"
            row = f"{name:8s} {variant:14s} " + " |          ".join(cells)
            if compiled:
                row += f" {cell(comp[0] / eager[0], 9, suffix='x')} {cell(comp[2], 10, '.1f')}"
            print(row + (f"\n{'':23s} compile failed: {error}" if error else ""), flush=True)


def layer_peaks(spec):
    """Runs in a fresh process (bench.py model): prints {"fwd": MiB, "fwd+bwd": MiB}, the peak memory of one
    forward without grad (as in evaluation) and of one forward+backward of a layer, above what was resident
    before (weights, input and gradient buffers counted in neither)."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    layer = ffn_layer(spec["path"], spec["D"], 4 * spec["D"], spec["E"], spec["k"]).to(device, dtype)
    run = layer_call(layer, torch.randn(1, 3, device=device))
    z = torch.randn(1, spec["T"], spec["D"], device=device, dtype=dtype)
    run(z[:, :64].detach().requires_grad_()).sum().backward()   # library set-up, not the layer's memory
    layer.zero_grad(set_to_none=False)                          # gradient buffers exist before both runs

    def fwd():
        with torch.no_grad():
            run(z)

    def fwd_bwd():
        run(z.detach().requires_grad_()).float().square().mean().backward()

    peaks = {name: peak_mib(fn, device) for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd))}
    print(json.dumps({name: peak - before for name, (peak, before) in peaks.items()}))


def bench_layer(args, device, dtype):
    """One MoE FFN (E experts, top-k) against a dense FFN of the same active FLOPs (hidden k*Dh): times, and peak
    memory measured each in a fresh process (CPU: growth of the resident set; CUDA: torch's allocated)."""
    T, D, Dh = args.tokens, args.width, 4 * args.width
    print(f"\n== one FFN layer: T={T} tokens, D={D}, Dh={Dh}, {dtype}, {device.type}; dense FFN has hidden k*Dh ==")
    print("   peak MiB: one forward (no grad) and one forward+backward, each in a fresh process, above the "
          "resident weights and input")
    print(f"{'E':>3s} {'k':>2s} {'layer':15s} {'fwd ms':>8s} {'f+b ms':>8s} {'fwd vs dense':>13s} "
          f"{'f+b vs dense':>13s} {'fwd MiB':>8s} {'f+b MiB':>8s} {'fwd vs dense':>13s} {'f+b vs dense':>13s}")
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}   # glibc gives back freed blocks >= 64 KiB: resident = live memory
    for E in args.experts:
        for k in (1, 2):
            z = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
            s, base = torch.randn(1, 3, device=device), None
            for path in ["dense"] + moe_paths(device, E, k):
                fwd, fb = layer_times(ffn_layer(path, D, Dh, E, k).to(device, dtype), z, s, device, args.reps)
                torch.cuda.empty_cache()   # a no-op without CUDA
                mem = {"fwd": NAN, "fwd+bwd": NAN}
                if args.memory:
                    spec = {"path": path, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                            "T": T, "D": D, "E": E, "k": k}
                    mem = in_fresh_process(f"import bench; bench.layer_peaks({spec!r})", env)[0] or mem
                base = base or (fwd, fb, mem)
                variant = path if path == "dense" else f"moe-{path}"
                print(f"{E:3d} {k:2d} {variant:15s} {fwd * 1e3:8.3f} {fb * 1e3:8.3f} "
                      f"{cell(fwd / base[0], 13, suffix='x')} {cell(fb / base[1], 13, suffix='x')} "
                      f"{cell(mem['fwd'], 8, '.1f')} {cell(mem['fwd+bwd'], 8, '.1f')} "
                      f"{cell(mem['fwd'] / base[2]['fwd'], 13, suffix='x')} "
                      f"{cell(mem['fwd+bwd'] / base[2]['fwd+bwd'], 13, suffix='x')}", flush=True)


# -----------------------------------------------------------------------------
# data: read throughput of a prepared split, sequential and shuffled, from a cold and a warm page cache


def bench_data(args):
    from nanosar.data import CLASSES_7, Split, SplitWriter, load_batch

    def drop_page_cache(path):
        """Ask the kernel to forget the split's pages, so reads come from disk (Linux; may be refused)."""
        try:
            for name in ("images.npy", "labels.npy"):
                fd = os.open(os.path.join(path, name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            return True
        except (AttributeError, OSError):
            return False

    def bench(path):
        split = Split(path)
        n, rng = len(split), np.random.default_rng(0)
        tile_mb = (split.images[0].nbytes + split.labels[0].nbytes) / 2**20
        print(f"{path}: {n} tiles of {tuple(split.images.shape[1:])} ({tile_mb:.2f} MB each on disk)")
        for order in ("sequential", "shuffled"):
            for cache in ("cold", "warm"):
                del split                                   # unmap, so that the kernel may drop the pages
                if cache == "cold" and not drop_page_cache(path):
                    continue
                split = Split(path)
                indices = np.arange(n) if order == "sequential" else rng.permutation(n)
                t0 = time.perf_counter()
                for i in range(0, n, args.batch):
                    load_batch(split, indices[i:i + args.batch])
                rate = n / (time.perf_counter() - t0)
                print(f"  {order:10s} {cache} page cache, batch {args.batch}: {rate:9.0f} tiles/s  "
                      f"{rate * tile_mb:8.0f} MB/s")

    if args.split:
        return bench(args.split)
    with tempfile.TemporaryDirectory() as tmp:
        path, rng = os.path.join(tmp, "split"), np.random.default_rng(0)
        meta = {"unit": "db", "channels": [f"c{i}" for i in range(args.channels)], "class_names": list(CLASSES_7)}
        with SplitWriter(path, meta) as writer:
            for _ in range(args.tiles):
                writer.add(rng.standard_normal((args.channels, args.size, args.size), np.float32),
                           rng.integers(0, 7, (args.size, args.size), np.uint8))
        bench(path)


# -----------------------------------------------------------------------------
# scene: `eval.py --predict` on synthetic GeoTIFF scenes of growing size; peak memory must not grow with them


def write_scene(path, size, tile=512, seed=0):
    """A size x size tiled, deflate-compressed float32 GeoTIFF of speckled dB values, written tile by tile."""
    rng = np.random.default_rng(seed)
    tiles = ((10 * np.log10(rng.exponential(0.05, (tile, tile)))).astype(np.float32)
             for _ in range(math.ceil(size / tile) ** 2))
    tags = [(33550, 12, 3, (10.0, 10.0, 0.0), True), (33922, 12, 6, (0.0, 0.0, 0.0, 5e5, 4e6, 0.0), True)]
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(tiles, shape=(size, size), dtype=np.float32, tile=(tile, tile), compression="zlib", extratags=tags)


def bench_scene(args):
    """Each prediction runs in a fresh process, whose peak resident memory (ru_maxrss) is reported."""
    print(f"{'scene':>12s} {'seconds':>8s} {'Mpixel/s':>9s} {'windows/s':>10s} {'peak RSS MiB':>13s}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            scene, mask = os.path.join(tmp, f"scene{size}.tif"), os.path.join(tmp, f"mask{size}.tif")
            write_scene(scene, size)
            argv = ["eval.py", "--predict", scene, "--ckpt", args.ckpt, "--out", mask, "--block", str(args.block),
                    "--batch", str(args.batch), "--unit", "db"]
            if args.window:
                argv += ["--window", str(args.window), "--stride", str(args.stride or args.window * 3 // 4)]
            t0 = time.time()
            peak, output = in_fresh_process(
                f"import json, resource, runpy, sys; sys.argv = {argv!r}\n"
                "runpy.run_path('eval.py', run_name='__main__')\n"
                "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))")   # MiB
            seconds = time.time() - t0
            if peak is None:
                return
            line = next(ln for ln in output.splitlines() if ln.startswith("wrote"))     # "... window W, stride S, ..."
            window, stride = (int(line.split(f"{key} ")[1].split(",")[0]) for key in ("window", "stride"))
            windows = (math.ceil(max(size - window, 0) / stride) + 1) ** 2
            print(f"{size:>5d}x{size:<6d} {seconds:8.1f} {size * size / seconds / 1e6:9.2f} {windows / seconds:10.1f} "
                  f"{peak:13.0f}", flush=True)
            os.remove(scene)


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    on_device = argparse.ArgumentParser(add_help=False)   # options of the commands that run the model
    on_device.add_argument("--device", default="cpu")
    on_device.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 (cpu), bfloat16 (cuda)")
    on_device.add_argument("--reps", type=int, default=5, help="timed repetitions, median reported (default 5)")
    sized = argparse.ArgumentParser(add_help=False)       # options of the commands that run whole segmenters
    sized.add_argument("--presets", nargs="+", choices=list(PRESETS),
                       help="default: tiny small (cpu; compile: tiny), small large (cuda)")
    sized.add_argument("--size", type=int, help="tile size; default 64 (cpu), 512 (cuda)")
    sized.add_argument("--batch", type=int, help="forward batch; default 2 (cpu), 32 (cuda)")
    sized.add_argument("--train-batch", type=int, help="training step batch; default 2 (cpu), 16 (cuda)")
    layer = argparse.ArgumentParser(add_help=False)       # options of the commands that run one layer
    layer.add_argument("--tokens", type=int, help="T; default 4096 (ops) or 2048 (model) on cpu, 32768 on cuda")
    layer.add_argument("--width", type=int, help="D; default 256 (cpu), 1024 (cuda); Dh = 4 D")
    layer.add_argument("--experts", type=int, nargs="+", help="E; default 6 16 64 (model on cpu: 6)")

    commands.add_parser("params", help="parameter counts of every preset next to the paper's")
    commands.add_parser("ops", parents=[on_device, layer], help="kernels vs references", description=bench_ops.__doc__)
    cmd = commands.add_parser("model", parents=[on_device, sized, layer], help="presets vs dense; layer vs dense FFN",
                              description=bench_segmenters.__doc__)
    cmd.add_argument("--no-memory", dest="memory", action="store_false", help="skip the layer memory figures")
    cmd = commands.add_parser("compile", parents=[on_device, sized], help="torch.compile vs eager",
                              description=bench_segmenters.__doc__)
    cmd.add_argument("--paths", nargs="+", choices=["reference", "grouped", "fast"],
                     help="MoE dispatch paths beside dense; default: reference grouped fast (cpu), fast (cuda)")
    cmd = commands.add_parser("data", help="read throughput of a prepared split")
    cmd.add_argument("--split", help="a prepared split folder; default: a temporary one")
    cmd.add_argument("--tiles", type=int, default=512, help="tiles in the temporary split")
    cmd.add_argument("--size", type=int, default=512, help="tile size of the temporary split")
    cmd.add_argument("--channels", type=int, default=1)
    cmd.add_argument("--batch", type=int, default=32)
    cmd = commands.add_parser("scene", help="whole-scene prediction speed and peak memory against scene size")
    cmd.add_argument("--ckpt", required=True)
    cmd.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    cmd.add_argument("--window", type=int, help="default: the model's tile size")
    cmd.add_argument("--stride", type=int, help="default: 3/4 of the window")
    cmd.add_argument("--block", type=int, default=1024)
    cmd.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    if args.command in ("params", "data", "scene"):
        return {"params": bench_params, "data": bench_data, "scene": bench_scene}[args.command](args)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    defaults = {"presets": (["tiny"] if args.command == "compile" else ["tiny", "small"], ["small", "large"]),
                "size": (64, 512), "batch": (2, 32), "train_batch": (2, 16), "width": (256, 1024),
                "tokens": (4096 if args.command == "ops" else 2048, 32768),
                "experts": ([6] if args.command == "model" else [6, 16, 64], [6, 16, 64]),
                "paths": (["reference", "grouped", "fast"], ["fast"]), "dtype": ("float32", "bfloat16")}
    for name, (cpu, cuda) in defaults.items():
        if getattr(args, name, 0) is None:      # 0: not an option of this command
            setattr(args, name, cuda if gpu else cpu)
    dtype = getattr(torch, args.dtype)
    if gpu:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    if args.command == "ops":
        bench_ops(args, device, dtype)
    elif args.command == "model":
        bench_segmenters(args, device, dtype, False, moe_paths(device))
        bench_segmenters(args, device, dtype, True, [p for p in moe_paths(device) if p != "reference"])
        bench_layer(args, device, dtype)
    else:
        paths = [p for p in args.paths if p in moe_paths(device)]
        for train in (False, True):
            bench_segmenters(args, device, dtype, train, paths, compiled=True)


if __name__ == "__main__":
    main()
