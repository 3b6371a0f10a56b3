"""
Read throughput of prepared splits (a script, not a test): tiles/s and MB/s from the memory-mapped
.npy files into float32 torch batches, sequential and shuffled.

    python -m nanosar.bench_data                                  # a temporary split of random tiles
    python -m nanosar.bench_data --split data/synth/N-G3-HH-db/train
"""

import argparse
import os
import tempfile
import time

import numpy as np

from nanosar.data import CLASSES_7, Split, SplitWriter, load_batch


def make_split(path, n, size, channels):
    rng = np.random.default_rng(0)
    meta = dict(unit="db", channels=[f"c{i}" for i in range(channels)], class_names=list(CLASSES_7))
    with SplitWriter(path, meta) as w:
        for _ in range(n):
            w.add(rng.standard_normal((channels, size, size), np.float32), rng.integers(0, 7, (size, size), np.uint8))


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


def bench(path, batch):
    split = Split(path)
    n = len(split)
    tile_mb = (split.images[0].nbytes + split.labels[0].nbytes) / 2**20
    print(f"{path}: {n} tiles of {tuple(split.images.shape[1:])} ({tile_mb:.2f} MB each on disk)")
    rng = np.random.default_rng(0)
    for order in ("sequential", "shuffled"):
        for cache in ("cold", "warm"):
            del split                                   # unmap, so that the kernel may drop the pages
            if cache == "cold" and not drop_page_cache(path):
                continue
            split = Split(path)
            indices = np.arange(n) if order == "sequential" else rng.permutation(n)
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                load_batch(split, indices[i:i + batch])
            rate = n / (time.perf_counter() - t0)
            print(f"  {order:10s} {cache} page cache, batch {batch}: {rate:9.0f} tiles/s  {rate * tile_mb:8.0f} MB/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", help="a prepared split folder; default: a temporary one")
    parser.add_argument("--tiles", type=int, default=512, help="tiles in the temporary split")
    parser.add_argument("--size", type=int, default=512, help="tile size of the temporary split")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.split:
        bench(args.split, args.batch)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "split")
        make_split(path, args.tiles, args.size, args.channels)
        bench(path, args.batch)


if __name__ == "__main__":
    main()
