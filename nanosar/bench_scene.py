"""
Whole-scene prediction benchmark (a script, not a test): peak memory and speed of
`eval.py --predict` on synthetic GeoTIFF scenes of growing size; peak memory must not grow with them.

    python -m nanosar.bench_scene --ckpt out/synth_tiny/ckpt.pt                 # 4096^2 and 16384^2
    python -m nanosar.bench_scene --ckpt ... --sizes 2048 4096 --window 128 --stride 96

Each scene is a tiled, deflate-compressed float32 GeoTIFF of dB values (written tile by tile, so
writing it needs no memory either); each prediction runs in a fresh process whose peak resident memory
(ru_maxrss) is reported.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_scene(path, size, tile=512, seed=0):
    """A size x size float32 GeoTIFF of speckled dB values, generated and written tile by tile."""
    rng = np.random.default_rng(seed)

    def tiles():
        for _ in range(math.ceil(size / tile) ** 2):
            yield (10 * np.log10(rng.exponential(0.05, (tile, tile)))).astype(np.float32)

    tags = [(33550, 12, 3, (10.0, 10.0, 0.0), True), (33922, 12, 6, (0.0, 0.0, 0.0, 5e5, 4e6, 0.0), True)]
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(tiles(), shape=(size, size), dtype=np.float32, tile=(tile, tile), compression="zlib",
                     extratags=tags)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--window", type=int, default=None, help="default: the model's tile size")
    parser.add_argument("--stride", type=int, default=None, help="default: 3/4 of the window")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"{'scene':>12s} {'seconds':>8s} {'Mpixel/s':>9s} {'windows/s':>10s} {'peak RSS MiB':>13s}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            scene, mask = os.path.join(tmp, f"scene{size}.tif"), os.path.join(tmp, f"mask{size}.tif")
            write_scene(scene, size)
            cmd = [sys.executable, "eval.py", "--predict", scene, "--ckpt", args.ckpt, "--out", mask,
                   "--block", str(args.block), "--batch", str(args.batch), "--unit", "db"]
            if args.window:
                stride = args.stride or args.window * 3 // 4
                cmd += ["--window", str(args.window), "--stride", str(stride)]
            code = (f"import resource, runpy, sys; sys.argv = {cmd[1:]!r}\n"
                    "runpy.run_path('eval.py', run_name='__main__')\n"
                    "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            t0 = time.time()
            result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
            seconds = time.time() - t0
            if result.returncode:
                raise SystemExit(result.stderr[-3000:])
            peak_mib = int(result.stdout.split("PEAK")[-1]) / 1024
            line = next(ln for ln in result.stdout.splitlines() if ln.startswith("wrote"))
            window = int(line.split("window ")[1].split(",")[0])
            stride = int(line.split("stride ")[1].split(",")[0])
            windows = (math.ceil(max(size - window, 0) / stride) + 1) ** 2
            print(f"{size:>5d}x{size:<6d} {seconds:8.1f} {size * size / seconds / 1e6:9.2f} {windows / seconds:10.1f} "
                  f"{peak_mib:13.0f}", flush=True)
            os.remove(scene)


if __name__ == "__main__":
    main()
