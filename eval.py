"""
Domain-generalization evaluation: how well does a model trained on one SAR domain segment unseen ones.

    python eval.py --suite synthetic --ckpt out/suite/physics          # a folder: <folder>/<source>/ckpt.pt
    python eval.py --suite synthetic --ckpt out/synth_tiny/ckpt.pt     # one checkpoint: the benchmarks of its source
    python eval.py --suite synthetic --ckpt physics=out/suite/physics tokens=out/suite/tokens dense=out/suite/dense
    python eval.py --predict scene.tif --ckpt model.pt --out mask.tif  # whole-scene prediction, GeoTIFF in and out
    python eval.py --suite synthetic --list-sources                    # the source domains to train on

The suite mode writes a markdown table in the paper's layout (single-gap and multi-gap sections, one
column per sub-benchmark, averages, the paper's numbers where it reports them), the per-domain expert
routing, and the same as JSON. Under torchrun each process evaluates every world-th tile and the int64
confusion matrices are summed. The predict mode also writes mask.png (a quicklook with a legend) and,
with --routing, the top-1 expert per patch of every MoE block (mask.routing.tif, mask.routing.png).
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

from nanosar import suites
from nanosar.checkpoint import load_checkpoint
from nanosar.data import IGNORE, Split, load_batch
from nanosar.distributed import close_distributed, init_distributed
from nanosar.files import check_output_path, release_freed_memory, write_atomic, write_text_atomic
from nanosar.geotiff import TiffWindows, write_tiled_geotiff
from nanosar.metrics import evaluate
from nanosar.model import SARConfig, Segmenter
from nanosar.quicklook import class_quicklook, write_png
from nanosar.scene import (RoutingMaps, check_scene_values, scene_pixels, sliding_logits_of_tile,
                           sliding_window_logits, write_routing_pictures)
from nanosar.units import UNITS

# -----------------------------------------------------------------------------
# models and their input contract


def load_model(path, device, compile=False):
    """Segmenter in eval mode from a train.py checkpoint (only its model, model_args and config are read,
    checksums verified), and that part of the checkpoint dict. compile: torch.compile it (the fast path
    compiles whole; attributes such as .cfg stay reachable)."""
    ckpt = load_checkpoint(path, parts=("model", "model_args", "config"))
    model = Segmenter(SARConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model = model.to(device).eval()
    return (torch.compile(model) if compile else model), ckpt


def check_contract(cfg, meta, allowed, where):
    """Raise ValueError if data described by `meta` cannot be fed to a model with config `cfg`.

    The channel count must always match. A different unit or channel names are allowed only when the
    benchmark's gap changes them on purpose (allowed: set of factors, e.g. {"representation"}). Every
    class of the data must be a class of the model.
    """
    channels, unit = list(meta["channels"]), meta["unit"]
    if len(channels) != cfg.in_chans:
        raise ValueError(f"{where}: data has {len(channels)} channel(s) {channels}, the model expects "
                         f"{cfg.in_chans} {list(cfg.channels)}")
    if unit != cfg.input_unit and "representation" not in allowed:
        raise ValueError(f"{where}: data unit {unit!r} but the model was trained on {cfg.input_unit!r}; convert "
                         f"the data (prepare.py) or evaluate a benchmark whose gap is the representation")
    if cfg.channels and channels != list(cfg.channels) and "polarization" not in allowed:
        raise ValueError(f"{where}: data channels {channels} but the model was trained on {list(cfg.channels)}")
    names, known = list(meta["class_names"]), list(cfg.class_names)
    if len(names) > cfg.num_classes:
        raise ValueError(f"{where}: {len(names)} classes {names}, but the model knows {cfg.num_classes}")
    if known and [c for c in names if c not in known]:
        unknown = [c for c in names if c not in known]
        raise ValueError(f"{where}: classes {unknown} are unknown to the model (it knows {known})")
    if known and names != known[:len(names)]:
        raise ValueError(f"{where}: class ids differ from the model's: data {names}, model {known}")


# -----------------------------------------------------------------------------
# evaluation of one split (whole tiles, or sliding windows: nanosar/scene.py), with routing statistics


def split_batches(split, batch, rank=0, world=1):
    """This process's share (every world-th tile) of a prepared split, in batches of (images, labels)."""
    indices = list(range(rank, len(split), world))
    for b in range(0, len(indices), batch):
        yield load_batch(split, indices[b:b + batch])


def evaluate_split(model, split, device, batch=16, window=None, stride=None, blend="cosine", rank=0, world=1):
    """Scores of a model on a prepared split, per-block expert load fractions (L, E) and mean descriptors
    [H_DE, ENL, R_LR] (nanosar.metrics.evaluate). Whole tiles, or sliding windows when `window` is given
    (then without routing statistics)."""
    logits_of = None
    if window is not None:
        def logits_of(images):
            return torch.stack([sliding_logits_of_tile(model, image, window, stride, blend, batch, device)
                                for image in images])
    with torch.no_grad():
        return evaluate(model, split_batches(split, batch, rank, world), device, world, logits_of)


# -----------------------------------------------------------------------------
# the suite


CHECKPOINT_NAMES = {"best": "best.pt", "last": "ckpt.pt"}   # train.py's files in a run folder


def checkpoint_for(spec, source, which="best"):
    """The checkpoint of `source`: spec is a folder holding <source>/{best,ckpt}.pt (which = "best": the one
    with the best source-validation mIoU; "last": the final one), or one checkpoint file (used only for the
    benchmarks whose source is the domain it was trained on)."""
    if os.path.isdir(spec):
        path = os.path.join(spec, source, CHECKPOINT_NAMES[which])
        if which == "best" and not os.path.isfile(path) and os.path.isfile(os.path.join(spec, source, "ckpt.pt")):
            raise FileNotFoundError(f"{path} not found but ckpt.pt is there: the run never evaluated on source "
                                    f"validation tiles; pass --which last to use its final checkpoint")
        return path if os.path.isfile(path) else None
    trained_on = load_checkpoint(spec, parts=("config",))["config"]["data"]
    return spec if os.path.basename(trained_on.rstrip("/")) == source else None


def no_checkpoint_error(spec, benchmarks, which):
    """The ValueError for a --ckpt that matched no benchmark of the suite, naming what was looked for."""
    sources = ", ".join(dict.fromkeys(b["source"] for b in benchmarks))
    if os.path.isdir(spec):
        return ValueError(f"--ckpt {spec}: no checkpoint for a source of the suite in this folder: expected "
                          f"{os.path.join(spec, '<source>', CHECKPOINT_NAMES[which])} for a source among {sources}")
    return ValueError(f"--ckpt {spec}: trained on a domain that is the source of no benchmark of the suite "
                      f"(sources: {sources})")


def check_data_root(data):
    """ValueError unless --data is a folder (it holds the prepared domains)."""
    if os.path.isfile(data):
        raise ValueError(f"--data {data} is a file, not a folder: give the folder of the prepared domains "
                         f"(python prepare.py synthetic --out FOLDER)")


def evaluate_target(model, bench, args, device, rank, world):
    """Scores of a model on a benchmark's target split (evaluate_split); any ValueError names the split once."""
    target = os.path.join(args.data, bench["target"], args.split)
    try:
        split = Split(target)
        check_contract(model.cfg, split.meta, set(bench.get("factors", [])), target)
        return evaluate_split(model, split, device, args.batch, args.window, args.stride, args.blend, rank, world)
    except ValueError as e:
        raise ValueError(str(e) if target in str(e) else f"split {target}: {e}") from None


def run_name(spec):
    """The row label of a --ckpt without label=: the run folder's name (out/synth_tiny/ckpt.pt -> synth_tiny)."""
    path = os.path.abspath(spec)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def run_suite(args, device, rank, world):
    check_data_root(args.data)
    benchmarks = suites.load(args.suite, args.data)
    variants = dict(v.split("=", 1) if "=" in v else (run_name(v), v) for v in args.ckpt)
    results = {}
    for label, spec in variants.items():
        results[label] = {}
        cache = {}
        for bench in benchmarks:
            path = checkpoint_for(spec, bench["source"], args.which)
            if path is None:
                continue
            if path not in cache:                                    # each checkpoint is read once
                cache[path] = load_model(path, device, args.compile)
            model, _ = cache[path]
            t0 = time.time()
            scores = evaluate_target(model, bench, args, device, rank, world)
            results[label][bench["code"]] = {**scores, "source": bench["source"], "target": bench["target"],
                                             "checkpoint": path}
            if rank == 0:
                print(f"{label:>10s} {bench['code']:>8s}: {bench['source']} -> {bench['target']}: "
                      f"mIoU {100 * scores['miou']:.2f} ({time.time() - t0:.1f} s)", flush=True)
        if not results[label]:
            raise no_checkpoint_error(spec, benchmarks, args.which)
    if rank == 0:
        write_routing_pictures(results, {path: model for path, (model, _) in cache.items()}, args.data,
                               args.split, args.out, device)
        markdown = suite_markdown(args.suite, benchmarks, results)
        print("\n" + markdown)
        os.makedirs(args.out, exist_ok=True)
        write_text_atomic(os.path.join(args.out, f"{args.suite}.md"), markdown)
        write_text_atomic(os.path.join(args.out, f"{args.suite}.json"),
                     json.dumps({"suite": args.suite, "benchmarks": benchmarks, "results": results}, indent=1))
        print(f"wrote {args.out}/{args.suite}.md and .json")


def suite_markdown(name, benchmarks, results):
    """Tables in the paper's layout: a row per model, a column per sub-benchmark, the group average."""
    lines = [f"# {name} suite: target mIoU (%)", ""]
    for group in ("single-gap", "multi-gap"):
        group_benchmarks = [b for b in benchmarks if b["group"] == group]
        codes = [b["code"] for b in group_benchmarks]
        lines += [f"## {group}", "", "| model | " + " | ".join(codes) + " | avg |",
                  "|---|" + "---|" * (len(codes) + 1)]
        for label, scores in results.items():
            values = [scores[c]["miou"] * 100 if c in scores else None for c in codes]
            present = [v for v in values if v is not None]
            average = f"{sum(present) / len(present):.1f}" if len(present) == len(codes) else "-"
            lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in values)
                         + f" | {average} |")
        for method in suites.PAPER_METHODS:
            paper = [b.get("paper_miou", {}).get(method) for b in group_benchmarks]
            if any(v is not None for v in paper):
                average = suites.PAPER_AVERAGES[group][method]
                lines.append(f"| paper: {method} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in paper)
                             + f" | {average} (all {len(codes)}) |")
        for label, scores in results.items():
            ran = [c for c in codes if c in scores]
            if len(ran) < len(codes):
                lines.append(f"\n{label}: {len(ran)} of {len(codes)} ran ({', '.join(ran) or 'none'}): its "
                             f"checkpoint(s) cover only those sources; '-' = not run, and the average needs all.")
        lines += ["", "| code | gap | source -> target |", "|---|---|---|"]
        lines += [f"| {b['code']} | {b['gap']} | {b['source']} -> {b['target']} |" for b in group_benchmarks]
        lines.append("")
    lines += ["## Expert routing per target domain", "",
              "Mean descriptors of the target tiles and, per MoE block, the busiest expert and its share "
              "of tokens.", ""]
    for label, scores in results.items():
        seen = {}
        for code, s in scores.items():
            if s["expert_load"] and s["target"] not in seen:
                seen[s["target"]] = s
        if not seen:
            continue
        lines += [f"### {label}", "", "| target | H_DE | ENL | R_LR | busiest expert per block (share) |",
                  "|---|---|---|---|---|"]
        for target, s in seen.items():
            h, enl, r = s["mean_descriptors"]
            busiest = " ".join(f"e{int(np.argmax(f))}:{max(f):.2f}" for f in s["expert_load"])
            lines.append(f"| {target} | {h:.2f} | {enl:.3g} | {r:.3g} | {busiest} |")
        lines += [""] + [f"![{label} routing on {t}]({s['routing_png']})" for t, s in seen.items()
                         if "routing_png" in s] + [""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# whole-scene prediction


def output_stem(out):
    """--out without a .tif / .tiff suffix: the start of the names of the quicklook and the routing maps."""
    root, ext = os.path.splitext(out)
    return root if ext.lower() in (".tif", ".tiff") else out


def predict_scene(args, device):
    """Sliding-window prediction of a large GeoTIFF, block by block (memory independent of the scene size),
    written as a tiled, deflate-compressed GeoTIFF of class ids with the input's georeferencing, and
    <out>.png, its quicklook; with --routing also the routing maps (RoutingMaps.write)."""
    if os.path.isdir(args.ckpt[0]):
        raise ValueError(f"--ckpt {args.ckpt[0]} is a folder; --predict needs one checkpoint file, e.g. "
                         f"{os.path.join(args.ckpt[0], CHECKPOINT_NAMES['best'])}")
    stem = output_stem(args.out)
    outputs = [args.out, stem + ".png"] + ([stem + ".routing.tif", stem + ".routing.png"] if args.routing else [])
    for out in outputs:
        check_output_path(out, [args.predict, args.ckpt[0]])   # never replace an input
    model, _ = load_model(args.ckpt[0], device, args.compile and not args.routing)   # hooks need the eager model
    cfg = model.cfg
    scene = TiffWindows(args.predict)
    if not scene.geo:
        warnings.warn(f"{args.predict} has no georeferencing tags: the output will have none either")
    if args.unit is None:
        print(f"assuming {args.predict} holds {list(cfg.channels) or cfg.in_chans} in {cfg.input_unit!r}, the model's "
              f"unit (say --unit to check it)")
    read, invalid = scene_pixels(scene, cfg, args.unit)
    check_scene_values(scene, cfg.input_unit, args.predict)
    H, W = scene.height, scene.width
    window = args.window or cfg.img_size
    stride = args.stride or window * 3 // 4
    block = args.block
    if block % 16:
        raise ValueError(f"--block must be a multiple of 16 (TIFF tiles), got {block}")
    blocks = [(y, x) for y in range(0, H, block) for x in range(0, W, block)]
    routing = RoutingMaps(model, (H, W), window, stride) if args.routing else None
    t0 = time.time()

    def forward(x):
        return model(x).logits

    def tiles():
        for i, (y, x) in enumerate(blocks):
            region = (y, min(y + block, H), x, min(x + block, W))
            with torch.no_grad():
                logits = sliding_window_logits(forward, read, (H, W), region, window, stride, args.blend,
                                               args.batch, device, routing and routing.record)
            labels = logits.argmax(0).to(torch.uint8).cpu()
            nodata = invalid(*region)
            labels[nodata] = IGNORE
            if routing:
                routing.mark_nodata(region, nodata)
            out = np.full((block, block), IGNORE, np.uint8)
            out[:labels.shape[0], :labels.shape[1]] = labels.numpy()
            if (i + 1) % max(1, len(blocks) // 20) == 0 or i + 1 == len(blocks):
                done = sum(min(block, H - by) * min(block, W - bx) for by, bx in blocks[:i + 1])
                print(f"  block {i + 1}/{len(blocks)}: {100 * done / (H * W):.0f}% of the scene, "
                      f"{done / (time.time() - t0) / 1e6:.2f} Mpixel/s", flush=True)
            release_freed_memory()
            yield out

    try:
        write_atomic(args.out, lambda tmp: write_tiled_geotiff(tmp, tiles(), (H, W), block, scene.geo, IGNORE))
    finally:
        scene.close()
        if routing:
            routing.close()
    print(f"wrote {args.out}: {H}x{W} class ids (255 = nodata) in {time.time() - t0:.1f} s, window {window}, "
          f"stride {stride}, {args.blend} blending")
    write_png(stem + ".png", class_quicklook(args.out, cfg.class_names or [""] * cfg.num_classes))
    print(f"wrote {stem}.png (quicklook)")
    if routing:
        routing.write(stem, scene.geo)
        print(f"wrote {stem}.routing.tif (a band per MoE block {routing.blocks}, {routing.maps.shape[1]}x"
              f"{routing.maps.shape[2]} patches of {cfg.patch_size} pixels) and {stem}.routing.png")


# -----------------------------------------------------------------------------


def one_line(error):
    """The message of an error for a person: an OSError's file name and reason, else its text."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


def fail(message):
    """Stop with one line on stderr, `eval.py: error: message`, and exit status 2."""
    print(f"eval.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["synthetic", "paper"], help="evaluate a benchmark suite")
    parser.add_argument("--predict", metavar="SCENE.tif", help="predict a whole GeoTIFF scene")
    parser.add_argument("--list-sources", action="store_true", help="print the suite's source domains and exit")
    parser.add_argument("--ckpt", nargs="+", default=[],
                        help="checkpoint file(s) or folder(s) of <source>/ckpt.pt; label=path names a variant")
    parser.add_argument("--data", default="data/synth", help="root of the prepared domains")
    parser.add_argument("--split", default="test", help="target split to evaluate")
    parser.add_argument("--out", default="out/eval", help="suite: output folder; predict: output GeoTIFF")
    parser.add_argument("--window", type=int, default=None, help="sliding-window size (default: whole tiles; "
                                                                  "predict: the model's tile size)")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window step (default 3/4 window)")
    parser.add_argument("--which", choices=["best", "last"], default="best",
                        help="with run folders: best.pt (best source-validation mIoU, the default) or ckpt.pt "
                             "(the final iteration)")
    parser.add_argument("--blend", choices=["cosine", "constant"], default="cosine",
                        help="weights of overlapping windows: cosine (Hann) or constant (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="windows or tiles per forward (default: %(default)s)")
    parser.add_argument("--block", type=int, default=1024, help="predict: pixels per output block and TIFF tile")
    parser.add_argument("--unit", choices=UNITS,
                        help="predict: the scene's pixel unit, checked against the model's")
    parser.add_argument("--routing", action="store_true", help="predict: also write the top-1 expert per patch "
                        "of every MoE block, <out>.routing.tif and .png (the model then runs uncompiled)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda if available (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.list_sources:
        try:
            check_data_root(args.data)
            print("\n".join(dict.fromkeys(b["source"] for b in suites.load(args.suite or "synthetic", args.data))))
        except (OSError, ValueError) as e:
            fail(one_line(e))
        return
    if not args.ckpt:
        fail("--ckpt is required")
    if bool(args.suite) == bool(args.predict):
        fail("choose one of --suite or --predict")
    if args.predict and args.out == "out/eval":
        fail("--predict needs --out mask.tif")
    if args.window and not args.stride:
        args.stride = args.window * 3 // 4
    if args.batch < 1 or (args.window is not None and args.window < 1) or args.block < 16:
        fail("--batch and --window must be >= 1 and --block >= 16")
    if args.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        fail(f"--device cuda but no CUDA GPU is visible to this process (torch {torch.__version__}, {build}): use "
             f"--device cpu or auto, or on a GPU machine install a CUDA build of torch")
    rank, world, device = init_distributed(args.device)
    try:
        if args.predict:
            predict_scene(args, device)
        else:
            run_suite(args, device, rank, world)
    except (OSError, ValueError) as e:  # missing or damaged files, bad data, a full disk
        fail(one_line(e))
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
