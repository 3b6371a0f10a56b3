"""
Prepare data in the one format train.py and eval.py read (nanosar/data.py): a folder per domain split
with images.npy (N, C, H, W) float16 in a declared unit, labels.npy (N, H, W) uint8 (255 = ignore),
tiles.jsonl and meta.json.

    python prepare.py synthetic --out data/synth                 # the embedded default: the synthetic DG suite
    python prepare.py corpus --out data/corpus                   # the simulated pre-training corpus (ablation)
    python prepare.py <dataset> --root PATH --out DIR [--split train] [--tile N] [--overlap N]
    python prepare.py --help                                     # every dataset: layout, source, unit

The synthetic suite writes <out>/<domain>/{train,test} for the 13 domains of its 22 sub-benchmarks and
for the extra domains beside them (sim.EXTRA_DOMAINS: dual-pol Sentinel-1 VV+VH domains, one of them the
flood plain F-S1-VV+VH-db, 38 % of its pixels water), and
<out>/suite.json listing the benchmarks (code, gap, source, target), the "domains" they use, the
"extra_domains" and the settings, with "complete": true only once every domain is written. Rerunning
an interrupted run resumes it: splits already written with the same settings are kept, the others
regenerated.

The corpus writes <out>/<domain>/{cpt,heldout} for the 336 single-polarization domains of
sim.corpus_domains() (7 sensors x their polarizations x dB / amplitude / SLC real / SLC imaginary x 4
regions) and <out>/corpus.json listing them with their factors, resumable in the same way. Every corpus
tile is a scene of its own, never one of a benchmark split (seeded by split, domain and index).

Bad input (a missing folder, a damaged file, a full disk) ends with one line on stderr,
`prepare.py: error: <file>: <what is wrong and what to do>`, and exit status 2; Ctrl-C with
`prepare.py: interrupted; rerun the same command to resume` and exit status 130.
"""

import argparse
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from nanosar import sim
from nanosar.convert import CONVERTERS, LAYOUT
from nanosar.data import Split, clean_split_debris
from nanosar.files import RunLock, remove_stale_temporaries, write_text_atomic

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def _exit_with_parent(parent_pid):
    """Worker initializer: end this worker when prepare.py ends, even by kill -9 (which runs no cleanup
    and would leave the pool's workers simulating forever). Linux: the kernel sends SIGTERM when the parent
    dies (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent's pid once a second. Ctrl-C
    (SIGINT to the whole process group) ends the worker at once and silently: prepare.py says it, once."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl failed")
    except (OSError, AttributeError):                     # not Linux: no prctl
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:                        # the parent died before prctl took effect
        os._exit(1)


def _write_domain_splits(job):
    out, domain, tiles, size, seed = job
    for split, n in tiles.items():
        sim.write_domain(os.path.join(out, domain.name, split), domain, split, n, size, seed)
    return domain.name


def _written_with(path, domain, split, n_tiles, size, seed):
    """True if the split folder `path` holds n_tiles tiles written by sim.write_domain with these settings
    (so a rerun can keep it); False if it is missing, unreadable or differs in any setting."""
    try:
        meta = Split(path).meta
    except (FileNotFoundError, ValueError):
        return False
    expected = json.loads(json.dumps(sim.split_meta(domain, split, size, seed)))    # as JSON stores it
    return meta["num_tiles"] == n_tiles and all(meta.get(k) == v for k, v in expected.items())


def _run(jobs, workers):
    """Run the domain jobs and yield each finished domain's name: in this process for workers <= 1, else
    in a pool of spawned workers that end with this process."""
    if workers <= 1:
        for job in jobs:
            yield _write_domain_splits(job)
        return
    context = multiprocessing.get_context("spawn")        # workers are children of this process on every OS
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        try:
            yield from pool.map(_write_domain_splits, jobs)
        except BaseException:
            pool.shutdown(cancel_futures=True)            # let running domains finish, start no more
            raise


def simulate_domains(out, domains, tiles, tile, seed, workers, index_name, index):
    """Simulate tiles[split] tiles of tile x tile pixels of every domain into <out>/<domain>/<split>, and
    the index file <out>/<index_name> (the dict `index` plus "complete" and the settings).

    The index is written first with "complete": false, and rewritten with "complete": true at the end, so
    an interrupted run is never mistaken for a finished one (nanosar.data.check_suite_complete). A rerun
    keeps every split already written with the same settings (resume) and regenerates the others, so
    splits of two settings are never mixed. Debris of killed runs is cleaned up first; a second run on
    the same folder is refused.
    """
    t0 = time.time()
    index = {**index, "complete": False, "tile": tile, "seed": seed, "tiles": tiles,
             "generator_version": sim.GENERATOR_VERSION}
    with RunLock(out):
        remove_stale_temporaries(out)
        write_text_atomic(os.path.join(out, index_name), json.dumps(index, indent=1))
        jobs, kept = [], 0
        for d in domains:
            clean_split_debris(os.path.join(out, d.name))
            todo = {split: n for split, n in tiles.items()
                    if not _written_with(os.path.join(out, d.name, split), d, split, n, tile, seed)}
            kept += len(tiles) - len(todo)
            if todo:
                jobs.append((out, d, todo, tile, seed))
        if kept:
            print(f"resuming: keeping {kept} splits already written with tile {tile}, seed {seed}", flush=True)
        every = max(1, len(jobs) // 20)                   # about 20 progress lines however many domains
        for i, (job, name) in enumerate(zip(jobs, _run(jobs, workers))):
            if (i + 1) % every == 0 or i + 1 == len(jobs):
                written = " + ".join(f"{n} {split}" for split, n in job[2].items())
                print(f"[{i + 1}/{len(jobs)}] {name}: {written} tiles of {tile}x{tile} ({time.time() - t0:.0f} s)",
                      flush=True)
        index["complete"] = True
        write_text_atomic(os.path.join(out, index_name), json.dumps(index, indent=1))
    written = sum(len(job[2]) for job in jobs)
    print(f"wrote {written} splits (kept {kept}) and {out}/{index_name} in {time.time() - t0:.0f} s")


def prepare_synthetic(out, tile=128, train_tiles=256, test_tiles=64, seed=0, workers=2):
    """Simulate every domain of the suite (train and test splits) and write suite.json (simulate_domains)."""
    suite = {
        "name": "synthetic",
        "description": "nanosar's simulated SAR domain-generalization suite: 12 single-gap and 10 multi-gap "
                       "sub-benchmarks over the paper's 8 gap types",
        "domains": [d.name for d in sim.suite_domains()],
        "extra_domains": [d.name for d in sim.EXTRA_DOMAINS],     # written beside them, in no benchmark
        "benchmarks": [
            {"code": code, "gap": gap, "factors": sorted(sim.GAP_FACTORS[gap]), "source": source.name,
             "target": target.name, "group": "single-gap" if "+" not in gap else "multi-gap"}
            for code, gap, source, target in sim.BENCHMARKS
        ],
    }
    domains = sim.suite_domains() + sim.EXTRA_DOMAINS   # the benchmarks' domains, then those in no benchmark
    simulate_domains(out, domains, {"train": train_tiles, "test": test_tiles}, tile, seed, workers, "suite.json",
                     suite)


def prepare_corpus(out, tile=64, cpt_tiles=8, heldout_tiles=2, seed=0, workers=2):
    """Simulate the continued-pre-training corpus (sim.corpus_domains: every sensor, polarization,
    representation and region) into <out>/<domain>/{cpt,heldout} and write corpus.json, which lists each
    domain with its factors (simulate_domains). Its scenes are disjoint from every benchmark split's."""
    domains = sim.corpus_domains()
    corpus = {
        "name": "corpus",
        "description": "nanosar's simulated continued-pre-training corpus: every sensor preset, polarization, "
                       "representation and region, single-polarization tiles",
        "domains": [{"name": d.name, "unit": d.representation, "sensor": d.sensor, **d.factors()} for d in domains],
    }
    cpt, heldout = sim.CORPUS_SPLITS
    simulate_domains(out, domains, {cpt: cpt_tiles, heldout: heldout_tiles}, tile, seed, workers, "corpus.json",
                     corpus)


TILE_MULTIPLE = 16  # the presets' patch size (tiny's 8 divides it): every preset cuts a tile into whole patches


def tile_size(text):
    """argparse type of --tile: a positive multiple of TILE_MULTIPLE."""
    try:
        tile = int(text)
    except ValueError:
        tile = 0
    if tile < TILE_MULTIPLE or tile % TILE_MULTIPLE:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of {TILE_MULTIPLE} (the patch size): "
                                         f"use e.g. 64, 128, 256 or 512")
    return tile


def _one_line(error):
    """An exception's message on one line, for `prepare.py: error: ...`."""
    text = error.strerror if isinstance(error, OSError) and error.strerror and not error.filename else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def _converter_options(args):
    """The keyword arguments of a converter call that the command line sets (the others keep the
    converter's defaults, e.g. its dataset's tile size)."""
    options = {"tile": args.tile, "overlap": args.overlap, "split_list": args.split_list}
    if args.dataset == "air_polsar_seg2":
        options.update(representation=args.representation, pol=args.pol, scenes=args.scenes)
    return {k: v for k, v in options.items() if v is not None}


def _conversion_summary(path):
    """One line on what a converter wrote: tiles, shape, unit, and the pixels its report says were dropped."""
    meta = Split(path).meta
    report = meta.get("report") or {}
    dropped = [f"{report.get('nodata_pixels', 0):,} no-data pixels"]
    unmatched = sum(r.get("unmatched_pixels", 0) for r in (report.get("labels") or {}).values())
    if "labels" in report:
        dropped.append(f"{unmatched:,} pixels of unmatched label colours (per scene in meta.json \"report\")")
    listed = report.get("split_list")
    source = f"; {listed['found']} of {listed['listed']} images listed in {listed['path']}" if listed else ""
    return (f"wrote {path}: {meta['num_tiles']} tiles of {'x'.join(map(str, meta['tile_shape']))} in unit "
            f"{meta['unit']}{source}; label 255 on {' and '.join(dropped)}")


def main(argv=None):
    layouts = "\n\n".join(f"{name}:\n{LAYOUT[name]}" for name in CONVERTERS)
    parser = argparse.ArgumentParser(
        prog="prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"datasets and the on-disk layouts their converters expect:\n\n{layouts}")
    parser.add_argument("dataset", choices=["synthetic", "corpus", *CONVERTERS], help="what to prepare")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--root", help="the dataset's folder as downloaded (not for synthetic)")
    parser.add_argument("--split", default="train",
                        help="real datasets: the output split's name; whu_opt_sar train/test, ddhr_sk train/val/test "
                             "and sen1floods11 train/val/test take the official list, which these datasets need for "
                             "any other name (or --split-list); --split all takes every image")
    parser.add_argument("--split-list", help="real datasets: a text file naming the images of the split, one a line "
                                             "(overrides the official list)")
    parser.add_argument("--tile", type=tile_size, default=None,
                        help="tile size in pixels, a multiple of 16 (synthetic 128, corpus 64; real: the dataset's, "
                             "512 or 256 for ddhr_sk, sarbud)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="overlap of tiles cut from larger scenes (real: 64, 0 for ddhr_sk and sarbud)")
    parser.add_argument("--taxonomy", choices=["7class", "native"], default="7class",
                        help="real datasets: remap labels to the 7 CrossEarth-SAR classes or keep their own")
    parser.add_argument("--representation", default="amplitude", choices=["amplitude", "complex", "real", "imag"],
                        help="air_polsar_seg2: what to keep of the complex SLC")
    parser.add_argument("--pol", default="HH", help="air_polsar_seg2: polarization for complex/real/imag")
    parser.add_argument("--scenes", help="air_polsar_seg2: scene tags to convert, e.g. bj,sh (default: all)")
    parser.add_argument("--train-tiles", type=int, default=256, help="synthetic: training tiles per domain")
    parser.add_argument("--test-tiles", type=int, default=64, help="synthetic: test tiles per domain")
    parser.add_argument("--cpt-tiles", type=int, default=8, help="corpus: pre-training tiles per domain")
    parser.add_argument("--heldout-tiles", type=int, default=2, help="corpus: held-out tiles per domain")
    parser.add_argument("--seed", type=int, default=0, help="synthetic, corpus: seed (same seed, same bytes)")
    parser.add_argument("--workers", type=int, default=2, help="synthetic: processes (1 = in this process)")
    args = parser.parse_args(argv)
    if args.dataset not in ("synthetic", "corpus") and not args.root:
        parser.error(f"{args.dataset} needs --root, the folder of the downloaded dataset")
    interrupted = []                                      # Ctrl-C seen (its workers may die first: see below)

    def note_interrupt(signum, frame):
        interrupted.append(signum)
        signal.default_int_handler(signum, frame)         # raises KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()   # (only it may set handlers)
    previous = signal.signal(signal.SIGINT, note_interrupt) if in_main_thread else None
    try:
        if args.dataset == "synthetic":
            prepare_synthetic(args.out, args.tile or 128, args.train_tiles, args.test_tiles, args.seed, args.workers)
            return 0
        if args.dataset == "corpus":
            prepare_corpus(args.out, args.tile or 64, args.cpt_tiles, args.heldout_tiles, args.seed, args.workers)
            return 0
        path = CONVERTERS[args.dataset](args.root, args.out, split=args.split, taxonomy=args.taxonomy,
                                        **_converter_options(args))
        print(_conversion_summary(path))
    except (OSError, ValueError, RuntimeError) as e:      # bad input, full disk, missing codec, busy folder
        if interrupted:        # Ctrl-C killed the workers and the pool reported it (BrokenProcessPool) first
            return report_interrupt()
        print(f"prepare.py: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                             # Ctrl-C: what is written is kept for the rerun
        return report_interrupt()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    return 0


def report_interrupt():
    """The one line and exit status (130, as shells report SIGINT) of a Ctrl-C."""
    print("prepare.py: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
