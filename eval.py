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
confusion matrices are summed.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

from nanosar import suites
from nanosar.checkpoint import load_checkpoint
from nanosar.data import IGNORE, Split, load_batch, tile_positions
from nanosar.distributed import close_distributed, init_distributed
from nanosar.files import check_output_path, release_freed_memory, write_atomic, write_text_atomic
from nanosar.geotiff import TiffWindows, write_tiled_geotiff
from nanosar.metrics import evaluate
from nanosar.model import SARConfig, Segmenter
from nanosar.units import MAGNITUDE_UNITS, UNITS, check_plausible, nodata_mask

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
# inference: whole image, or sliding windows with blended overlaps


def blend_weights(window, blend):
    """(window, window) weights of one window's logits: "constant" (1) or "cosine" (a Hann window that
    never reaches 0, so every pixel keeps some weight)."""
    if blend == "constant":
        return torch.ones(window, window)
    ramp = torch.sin(math.pi * (torch.arange(window) + 0.5) / window) ** 2
    return ramp[:, None] * ramp[None, :]


def sliding_window_logits(forward, read, shape, region, window, stride, blend="cosine", batch=8, device="cpu"):
    """Blended logits (K, h, w) of `region` = (y0, y1, x0, x1) of an image of `shape` = (H, W).

    Windows lie on one grid over the whole image (window x window, step `stride`, the last aligned to the
    edge), so computing the image region by region gives the same numbers as computing it at once.
    read(y0, y1, x0, x1) -> (C, h, w) float tensor; forward((B, C, window, window)) -> (B, K, window, window).
    Images smaller than a window are mirrored into it (pad_to_window), so the model sees SAR-like texture
    rather than a flat border; the padding gets no weight in the output.
    """
    H, W = shape
    y0, y1, x0, x1 = region
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    weight = blend_weights(window, blend).to(device)
    ys = [y for y in tile_positions(H, window, window - stride) if y < y1 and y + window > y0]
    xs = [x for x in tile_positions(W, window, window - stride) if x < x1 and x + window > x0]
    starts = [(y, x) for y in ys for x in xs]
    logits = total = None
    for b in range(0, len(starts), batch):
        chunk = starts[b:b + batch]
        tiles = torch.zeros(len(chunk), *read(0, 1, 0, 1).shape[:1], window, window)
        for i, (y, x) in enumerate(chunk):
            tiles[i] = pad_to_window(read(y, y + window, x, x + window), window)
        out = forward(tiles.to(device)).float()                               # (B, K, window, window)
        if logits is None:
            logits = torch.zeros(out.shape[1], y1 - y0, x1 - x0, device=device)
            total = torch.zeros(y1 - y0, x1 - x0, device=device)
        for i, (y, x) in enumerate(chunk):
            ty0, ty1, tx0, tx1 = max(y, y0), min(y + window, y1, H), max(x, x0), min(x + window, x1, W)
            w = weight[ty0 - y:ty1 - y, tx0 - x:tx1 - x]
            logits[:, ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] += out[i, :, ty0 - y:ty1 - y, tx0 - x:tx1 - x] * w
            total[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] += w
    return logits / total


def pad_to_window(part, window):
    """(C, h, w) -> (C, window, window): the part at the top left, mirrored (symmetric reflection, repeated
    as often as needed) into the rest. A neutral fill: speckle statistics and descriptors stay those of the
    image, where zeros (or the mean) would add a flat, featureless border."""
    h, w = part.shape[-2:]
    if (h, w) == (window, window):
        return part
    padded = np.pad(part.numpy(), ((0, 0), (0, window - h), (0, window - w)), mode="symmetric")
    return torch.from_numpy(padded)


def sliding_logits_of_tile(model, image, window, stride, blend, batch, device):
    """Sliding-window logits (K, H, W) of one in-memory image (C, H, W)."""
    H, W = image.shape[-2:]
    read = lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1].cpu()  # noqa: E731
    return sliding_window_logits(lambda x: model(x).logits, read, (H, W), (0, H, 0, W), window, stride, blend,
                                 batch, device)


# -----------------------------------------------------------------------------
# evaluation of one split, with routing statistics


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


def run_name(spec):
    """The row label of a --ckpt without label=: the run folder's name (out/synth_tiny/ckpt.pt -> synth_tiny)."""
    path = os.path.abspath(spec)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def run_suite(args, device, rank, world):
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
            target = os.path.join(args.data, bench["target"], args.split)
            split = Split(target)
            check_contract(model.cfg, split.meta, set(bench.get("factors", [])), target)
            t0 = time.time()
            scores = evaluate_split(model, split, device, args.batch, args.window, args.stride, args.blend, rank, world)
            results[label][bench["code"]] = {**scores, "source": bench["source"], "target": bench["target"],
                                             "checkpoint": path}
            if rank == 0:
                print(f"{label:>10s} {bench['code']:>8s}: {bench['source']} -> {bench['target']}: "
                      f"mIoU {100 * scores['miou']:.2f} ({time.time() - t0:.1f} s)", flush=True)
    if rank == 0:
        if not any(results.values()):
            raise SystemExit("no checkpoint matched any benchmark source: pass a folder holding <source>/ckpt.pt")
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
        lines.append("")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# whole-scene prediction




def scene_pixels(scene, model_cfg, unit):
    """A read(y0, y1, x0, x1) -> (C, h, w) float tensor for the model, plus a nodata-mask reader; clear
    errors when the scene's bands or values do not fit the model."""
    if unit is not None and unit != model_cfg.input_unit:
        raise ValueError(f"{scene.path} is in {unit!r}, but the model expects {model_cfg.input_unit!r}; "
                         f"convert it first")
    complex_file = np.dtype(scene.dtype).kind == "c"
    bands = 2 * scene.bands if complex_file else scene.bands
    if complex_file and model_cfg.input_unit != "complex":
        raise ValueError(f"{scene.path}: complex pixels, but the model expects {model_cfg.input_unit!r} input; "
                         f"convert the scene (e.g. to amplitude or dB) first")
    if bands != model_cfg.in_chans:
        raise ValueError(f"{scene.path}: {bands} band(s){' (re, im)' if complex_file else ''}, but the model expects "
                         f"{model_cfg.in_chans} {list(model_cfg.channels)} in unit {model_cfg.input_unit!r}")
    # no-data (units.nodata_mask: non-finite, the declared GDAL_NODATA, or 0 in a magnitude unit) is filled
    # with 0 in a magnitude unit (which the model's descriptors leave out), else with the normalisation
    # mean, and predicted as 255
    model_unit = model_cfg.input_unit
    magnitude = model_unit in MAGNITUDE_UNITS
    fill = torch.tensor([0.0] * model_cfg.in_chans if magnitude or not model_cfg.pixel_mean else
                        model_cfg.pixel_mean).view(-1, 1, 1)

    def raw(y0, y1, x0, x1):
        window = scene.read(y0, y1, x0, x1)
        return np.concatenate([window.real, window.imag]) if complex_file else window

    def invalid(y0, y1, x0, x1):
        return torch.from_numpy(nodata_mask(raw(y0, y1, x0, x1), model_unit, scene.nodata))

    def read(y0, y1, x0, x1):
        window = raw(y0, y1, x0, x1)
        bad = torch.from_numpy(nodata_mask(window, model_unit, scene.nodata))
        return torch.where(bad[None], fill, torch.from_numpy(np.array(window, dtype=np.float32)))

    return read, invalid


def check_scene_values(scene, unit, path):
    """Stop when a window from the scene's middle cannot be in `unit` (units.check_plausible: a dB model
    fed DN or amplitude would see 10^(x/10) overflow), saying which --unit to pass."""
    y, x, h, w = scene.height // 2, scene.width // 2, min(512, scene.height), min(512, scene.width)
    sample = scene.read(y - h // 2, y + h - h // 2, x - w // 2, x + w - w // 2)
    sample = sample.real if np.iscomplexobj(sample) else sample
    if scene.nodata is not None and sample.dtype.kind == "f":   # declared no-data is not a measurement
        sample = np.where(sample == scene.nodata, np.nan, sample.astype(np.float64))
    try:
        check_plausible(sample, unit, path)
    except ValueError as e:
        raise ValueError(f"{e}; pass --unit with what the scene holds (the model reads {unit!r})") from None


def predict_scene(args, device):
    """Sliding-window prediction of a large GeoTIFF, block by block (memory independent of the scene size),
    written as a tiled, deflate-compressed GeoTIFF of class ids with the input's georeferencing."""
    check_output_path(args.out, [args.predict, args.ckpt[0]])   # never replace an input
    model, _ = load_model(args.ckpt[0], device, args.compile)
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
    t0 = time.time()

    def forward(x):
        return model(x).logits

    def tiles():
        for i, (y, x) in enumerate(blocks):
            region = (y, min(y + block, H), x, min(x + block, W))
            with torch.no_grad():
                logits = sliding_window_logits(forward, read, (H, W), region, window, stride, args.blend,
                                               args.batch, device)
            labels = logits.argmax(0).to(torch.uint8).cpu()
            labels[invalid(*region)] = IGNORE
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
    print(f"wrote {args.out}: {H}x{W} class ids (255 = nodata) in {time.time() - t0:.1f} s, window {window}, "
          f"stride {stride}, {args.blend} blending")


# -----------------------------------------------------------------------------


def one_line(error):
    """The message of an error for a person: an OSError's file name and reason, else its text."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


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
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda if available (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.list_sources:
        benchmarks = suites.load(args.suite or "synthetic", args.data)
        print("\n".join(dict.fromkeys(b["source"] for b in benchmarks)))
        return
    if not args.ckpt:
        parser.error("--ckpt is required")
    if bool(args.suite) == bool(args.predict):
        parser.error("choose one of --suite or --predict")
    if args.window and not args.stride:
        args.stride = args.window * 3 // 4
    if args.batch < 1 or (args.window is not None and args.window < 1) or args.block < 16:
        parser.error("--batch and --window must be >= 1 and --block >= 16")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible to this process")
    rank, world, device = init_distributed(args.device)
    try:
        if args.predict:
            if args.out == "out/eval":
                parser.error("--predict needs --out mask.tif")
            predict_scene(args, device)
        else:
            run_suite(args, device, rank, world)
    except (OSError, ValueError) as e:  # missing or damaged files, bad data, a full disk
        print(f"eval.py: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
