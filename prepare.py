"""
Prepare data in the one format train.py and eval.py read (nanosar/data.py): a folder per domain split
with images.npy (N, C, H, W) float16 in a declared unit, labels.npy (N, H, W) uint8 (255 = ignore),
tiles.jsonl and meta.json.

    python prepare.py synthetic --out data/synth                 # the embedded default: the synthetic DG suite
    python prepare.py <dataset> --root PATH --out DIR [--split train] [--tile 512] [--overlap 64]
    python prepare.py --help                                     # every dataset with its expected layout

The synthetic suite writes <out>/<domain>/{train,test} for the 13 domains of its 22 sub-benchmarks,
and <out>/suite.json listing the benchmarks (code, gap, source, target).
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from nanosar import sim
from nanosar.convert import CONVERTERS, LAYOUT
from nanosar.data import write_text_atomic


def _write_domain_splits(job):
    out, domain, tiles, size, seed = job
    for split, n in tiles.items():
        sim.write_domain(os.path.join(out, domain.name, split), domain, split, n, size, seed)
    return domain.name


def prepare_synthetic(out, tile=128, train_tiles=256, test_tiles=64, seed=0, workers=2):
    """Simulate every domain of the suite (train and test splits) and write suite.json."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    jobs = [(out, d, {"train": train_tiles, "test": test_tiles}, tile, seed) for d in sim.suite_domains()]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, name in enumerate(pool.map(_write_domain_splits, jobs)):
            print(f"[{i + 1}/{len(jobs)}] {name}: {train_tiles} train + {test_tiles} test tiles of {tile}x{tile} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    suite = {
        "name": "synthetic",
        "description": "nanosar's simulated SAR domain-generalization suite: 12 single-gap and 10 multi-gap "
                       "sub-benchmarks over the paper's 8 gap types",
        "tile": tile, "seed": seed,
        "benchmarks": [
            {"code": code, "gap": gap, "factors": sorted(sim.GAP_FACTORS[gap]), "source": source.name,
             "target": target.name, "group": "single-gap" if "+" not in gap else "multi-gap"}
            for code, gap, source, target in sim.BENCHMARKS
        ],
    }
    write_text_atomic(os.path.join(out, "suite.json"), json.dumps(suite, indent=1))
    print(f"wrote {len(jobs)} domains and {out}/suite.json in {time.time() - t0:.0f} s")


def main(argv=None):
    layouts = "\n\n".join(f"{name}:\n{LAYOUT[name]}" for name in CONVERTERS)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"datasets and the on-disk layouts their converters expect:\n\n{layouts}")
    parser.add_argument("dataset", choices=["synthetic", *CONVERTERS], help="what to prepare")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--root", help="the dataset's folder as downloaded (not for synthetic)")
    parser.add_argument("--split", default="train", help="split to convert (real datasets)")
    parser.add_argument("--tile", type=int, default=None, help="tile size in pixels (synthetic 128, real 512)")
    parser.add_argument("--overlap", type=int, default=64, help="overlap of tiles cut from larger scenes")
    parser.add_argument("--taxonomy", choices=["7class", "native"], default="7class",
                        help="real datasets: remap labels to the 7 CrossEarth-SAR classes or keep their own")
    parser.add_argument("--representation", default="amplitude", choices=["amplitude", "complex", "real", "imag"],
                        help="air_polsar_seg2: what to keep of the complex SLC")
    parser.add_argument("--pol", default="HH", help="air_polsar_seg2: polarization for complex/real/imag")
    parser.add_argument("--train-tiles", type=int, default=256, help="synthetic: training tiles per domain")
    parser.add_argument("--test-tiles", type=int, default=64, help="synthetic: test tiles per domain")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: seed (same seed, same bytes)")
    parser.add_argument("--workers", type=int, default=2, help="synthetic: processes")
    args = parser.parse_args(argv)
    if args.dataset == "synthetic":
        prepare_synthetic(args.out, args.tile or 128, args.train_tiles, args.test_tiles, args.seed, args.workers)
        return
    if not args.root:
        parser.error(f"{args.dataset} needs --root, the folder of the downloaded dataset")
    options = dict(representation=args.representation, pol=args.pol) if args.dataset == "air_polsar_seg2" else {}
    CONVERTERS[args.dataset](args.root, args.out, split=args.split, tile=args.tile or 512, overlap=args.overlap,
                             taxonomy=args.taxonomy, **options)
    print(f"wrote {os.path.join(args.out, args.split)}")


if __name__ == "__main__":
    sys.exit(main())
