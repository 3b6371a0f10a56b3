"""
Whole-scene inference for eval.py --predict: a GeoTIFF scene read the way the model expects it (bands,
unit, no-data filled), sliding windows with blended overlaps, and the per-patch routing of the MoE blocks
(of a scene: RoutingMaps; of a few tiles, for eval.py --suite's report: write_routing_pictures).

    read, invalid = scene_pixels(TiffWindows("scene.tif"), model.cfg, "db")
    logits = sliding_window_logits(lambda x: model(x).logits, read, (H, W), (0, H, 0, W), 512, 384)  # (K, H, W)
"""

import json
import math
import os

import numpy as np
import torch

from nanosar.data import IGNORE, Split, load_batch, tile_positions
from nanosar.files import write_atomic
from nanosar.geotiff import coarsen_geotags, write_band_geotiff
from nanosar.model import MoEFFN
from nanosar.quicklook import routing_mosaic, write_png
from nanosar.units import MAGNITUDE_UNITS, check_plausible, nodata_mask

# -----------------------------------------------------------------------------
# sliding windows with blended overlaps


def blend_weights(window, blend):
    """(window, window) weights of one window's logits: "constant" (1) or "cosine" (a Hann window that
    never reaches 0, so every pixel keeps some weight)."""
    if blend == "constant":
        return torch.ones(window, window)
    ramp = torch.sin(math.pi * (torch.arange(window) + 0.5) / window) ** 2
    return ramp[:, None] * ramp[None, :]


def sliding_window_logits(forward, read, shape, region, window, stride, blend="cosine", batch=8, device="cpu",
                          after_forward=None):
    """Blended logits (K, h, w) of `region` = (y0, y1, x0, x1) of an image of `shape` = (H, W).

    Windows lie on one grid over the whole image (window x window, step `stride`, the last aligned to the
    edge), so computing the image region by region gives the same numbers as computing it at once.
    read(y0, y1, x0, x1) -> (C, h, w) float tensor; forward((B, C, window, window)) -> (B, K, window, window).
    Images smaller than a window are mirrored into it (pad_to_window), so the model sees SAR-like texture
    rather than a flat border; the padding gets no weight in the output. after_forward(starts, region), if
    given, is called after each forward with the batch's window starts [(y, x), ...] (RoutingMaps.record).
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
        if after_forward is not None:
            after_forward(chunk, region)
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
    """Sliding-window logits (K, H, W) of one in-memory image (C, H, W) by a Segmenter."""
    H, W = image.shape[-2:]
    read = lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1].cpu()  # noqa: E731
    return sliding_window_logits(lambda x: model(x).logits, read, (H, W), (0, H, 0, W), window, stride, blend,
                                 batch, device)


# -----------------------------------------------------------------------------
# a scene read for the model: bands and unit checked, no-data filled


def mirror_fill_rows(image, invalid):
    """Fill the invalid pixels of each row from that row's valid ones: beyond its first / last valid pixel by
    symmetric reflection about it (np.pad's "symmetric", repeated as often as needed), inside a hole with
    the nearest valid pixel to the left. image (C, h, w), invalid (h, w) bool -> filled (C, h, w) copy and
    (h,) bool: the rows without a valid pixel, left as they were."""
    h, w = invalid.shape
    valid, cols = ~invalid, np.arange(w)
    first = valid.argmax(1)[:, None]                                       # (h, 1)
    span = w - valid[:, ::-1].argmax(1)[:, None] - first                   # last - first + 1
    k = (cols - first) % (2 * span)                                        # position in a reflection period
    source = first + np.where(k < span, k, 2 * span - 1 - k)               # (h, w) columns in [first, last]
    nearest_left = np.maximum.accumulate(np.where(valid, cols, 0), axis=1)  # valid column at or left of each
    source = np.take_along_axis(nearest_left, source, 1)
    empty = ~valid.any(1)
    source[empty] = cols
    return np.take_along_axis(image, np.broadcast_to(source, image.shape), 2), empty


def fill_nodata(image, invalid, constant):
    """image (C, h, w) with its no-data pixels (invalid (h, w) bool) filled for the model: rows mirrored from
    their valid pixels (mirror_fill_rows), then rows without any from the columns, so a no-data border
    becomes the reflection of the data beside it, as a scene smaller than the window is mirrored into it.

    Why not a constant (0, or the normalisation mean): a flat area is a texture the model reads as
    pixels (a smooth, calm-water-like region that shifts its descriptors and attention); a border of
    declared no-data lowered the accuracy of the interior beside it (a test measures it). `constant`
    (C,) fills only a window without any valid pixel (it is predicted as 255 anyway)."""
    if not invalid.any():
        return image
    if invalid.all():
        return np.broadcast_to(np.asarray(constant, image.dtype)[:, None, None], image.shape).copy()
    image, empty_rows = mirror_fill_rows(image, invalid)
    if empty_rows.any():
        by_columns = np.broadcast_to(empty_rows, invalid.T.shape)          # (w, h): the rows still empty
        image = mirror_fill_rows(image.transpose(0, 2, 1), by_columns)[0].transpose(0, 2, 1)
    return image


def scene_pixels(scene, model_cfg, unit):
    """A read(y0, y1, x0, x1) -> (C, h, w) float tensor for the model, with no-data filled (fill_nodata), plus
    a reader of the no-data mask (h, w) bool; clear errors when the scene's bands or unit do not fit the model.

    No-data (units.nodata_mask): non-finite pixels, the declared GDAL_NODATA, or 0 in a magnitude unit;
    the caller predicts it as 255."""
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
    model_unit = model_cfg.input_unit
    magnitude = model_unit in MAGNITUDE_UNITS
    all_nodata_fill = [0.0] * model_cfg.in_chans if magnitude or not model_cfg.pixel_mean else model_cfg.pixel_mean

    def raw(y0, y1, x0, x1):
        window = scene.read(y0, y1, x0, x1)
        return np.concatenate([window.real, window.imag]) if complex_file else window

    def invalid(y0, y1, x0, x1):
        return torch.from_numpy(nodata_mask(raw(y0, y1, x0, x1), model_unit, scene.nodata))

    def read(y0, y1, x0, x1):
        window = raw(y0, y1, x0, x1)
        bad = nodata_mask(window, model_unit, scene.nodata)
        return torch.from_numpy(fill_nodata(np.array(window, dtype=np.float32), bad, all_nodata_fill))

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


# -----------------------------------------------------------------------------
# routing maps: the top-1 expert of every patch, per MoE block


def nearest_window_starts(size, window, stride, pixels):
    """For each pixel index along an axis of `size`, the start of the sliding window (tile_positions grid)
    whose centre is nearest, the earlier one on a tie: the window with the largest cosine blend weight
    there (the Hann ramp falls with the distance to the centre), which always contains the pixel."""
    starts = np.array(tile_positions(size, window, window - stride))
    centres = starts + (window - 1) / 2
    right = np.minimum(np.searchsorted(centres, pixels), len(starts) - 1)
    left = np.maximum(right - 1, 0)
    return starts[np.where(pixels - centres[left] <= centres[right] - pixels, left, right)]


class RoutingMaps:
    """The top-1 expert of every patch of a scene, per MoE block: maps (L, ceil(H/p), ceil(W/p)) uint8,
    255 where the patch's centre pixel is no-data. Cell (i, j) covers pixels [i p, (i + 1) p) x
    [j p, (j + 1) p); its expert is that of the token holding its centre pixel (clipped to the scene) in
    the window whose centre is nearest that pixel (nearest_window_starts): the window the cosine blending
    trusts most there. Forward hooks on the MoE FFNs record the expert ids; record(starts, region) is
    sliding_window_logits' after_forward and writes the cells whose centre lies in the region, so each
    cell is written once. Memory: L bytes per patch. write() saves them, close() removes the hooks."""

    def __init__(self, model, shape, window, stride):
        self.cfg, self.window = model.cfg, window
        p = self.cfg.patch_size
        self.blocks = [i for i, block in enumerate(model.backbone.blocks) if isinstance(block.mlp, MoEFFN)]
        if not self.blocks:
            raise ValueError("the model is dense (n_experts = 1): it has no routing to map")
        self.centres = [np.minimum(np.arange(0, n, p) + p // 2, n - 1) for n in shape]      # centre pixel per cell
        self.window_starts = [nearest_window_starts(n, window, stride, c) for n, c in zip(shape, self.centres)]
        self.maps = np.full((len(self.blocks), len(self.centres[0]), len(self.centres[1])), IGNORE, np.uint8)
        self.expert_ids = []
        self.hooks = [model.backbone.blocks[i].mlp.register_forward_hook(self.keep) for i in self.blocks]

    def keep(self, module, inputs, output):
        """Forward hook of a MoEFFN: keep its top-1 expert per token, (B * T,)."""
        self.expert_ids.append(output[1].expert_idx[:, 0])

    def patch_experts(self, batch):
        """(L, B, window / p, window / p) top-1 expert per patch token of the last forward's windows."""
        g, prefix = self.window // self.cfg.patch_size, 1 + self.cfg.num_register_tokens
        ids = torch.stack(self.expert_ids).view(len(self.blocks), batch, -1)[:, :, prefix:]
        self.expert_ids = []
        return ids.reshape(len(self.blocks), batch, g, g).cpu().numpy()

    def record(self, starts, region):
        """Write the cells of `region` = (y0, y1, x0, x1) whose nearest window is one of `starts` (the windows
        of the forward that just ran)."""
        experts, p = self.patch_experts(len(starts)), self.cfg.patch_size
        (cy, cx), (wy, wx) = self.centres, self.window_starts
        in_rows, in_cols = (cy >= region[0]) & (cy < region[1]), (cx >= region[2]) & (cx < region[3])
        for b, (y, x) in enumerate(starts):
            rows, cols = np.flatnonzero(in_rows & (wy == y)), np.flatnonzero(in_cols & (wx == x))
            tokens = experts[:, b][:, (cy[rows] - y) // p][:, :, (cx[cols] - x) // p]   # (L, rows, cols)
            self.maps[:, rows[:, None], cols[None, :]] = tokens

    def mark_nodata(self, region, invalid):
        """Set 255 in the cells whose centre pixel lies in `region` and is no-data (invalid: (h, w) bool of it)."""
        (cy, cx), (y0, y1, x0, x1) = self.centres, region
        rows, cols = np.flatnonzero((cy >= y0) & (cy < y1)), np.flatnonzero((cx >= x0) & (cx < x1))
        bad = np.asarray(invalid)[(cy[rows] - y0)[:, None], (cx[cols] - x0)[None, :]]
        cells = (slice(None), rows[:, None], cols[None, :])
        self.maps[cells] = np.where(bad, IGNORE, self.maps[cells])

    def write(self, stem, geo):
        """<stem>.routing.tif: band b = the maps of MoE block self.blocks[b], georeferenced at patch resolution
        (the scene's tags `geo` with pixel size x patch size, same origin); <stem>.routing.png: the mosaic."""
        p = self.cfg.patch_size
        description = json.dumps({"bands": "top-1 expert per patch", "moe_blocks": self.blocks, "patch_size": p})
        write_atomic(stem + ".routing.tif", lambda tmp: write_band_geotiff(tmp, self.maps, coarsen_geotags(geo, p),
                                                                           IGNORE, description))
        write_png(stem + ".routing.png", routing_mosaic(self.maps, self.blocks, self.cfg.n_experts))

    def close(self):
        """Remove the forward hooks."""
        for hook in self.hooks:
            hook.remove()


def tile_routing_maps(model, images):
    """(L, h / p, n * w / p) uint8: the top-1 expert per patch of each MoE block for n square tiles
    `images` (n, C, h, w) in the model's unit, side by side (the suite report's routing picture)."""
    maps = []
    routing = RoutingMaps(model, images.shape[-2:], images.shape[-1], images.shape[-1])
    try:
        with torch.no_grad():
            for image in images:
                model(image[None])
                routing.record([(0, 0)], (0, images.shape[-2], 0, images.shape[-1]))
                maps.append(routing.maps.copy())
    finally:
        routing.close()
    return np.concatenate(maps, axis=2), routing.blocks


ROUTING_TILES = 4   # test tiles per target in the suite report's routing pictures


def write_routing_pictures(results, models, data, split_name, out, device):
    """eval.py --suite's routing pictures, <out>/routing/<label>_<target>.png for each MoE checkpoint and
    target: the top-1 expert per patch of every block on the first ROUTING_TILES tiles of the target's
    split (tile_routing_maps); results[label][code]["routing_png"] gets its path, relative to out.
    models: {checkpoint path: Segmenter}, as results[label][code]["checkpoint"] names them."""
    for label, scores in results.items():
        for s in scores.values():
            model = getattr(models.get(s["checkpoint"]), "_orig_mod", models.get(s["checkpoint"]))  # eager: hooks
            if model is None or model.cfg.n_experts == 1:
                continue
            split = Split(os.path.join(data, s["target"], split_name))
            images, _ = load_batch(split, range(min(ROUTING_TILES, len(split))))
            maps, blocks = tile_routing_maps(model, images.to(device))
            s["routing_png"] = os.path.join("routing", f"{label}_{s['target']}.png")
            os.makedirs(os.path.join(out, "routing"), exist_ok=True)
            write_png(os.path.join(out, s["routing_png"]), routing_mosaic(maps, blocks, model.cfg.n_experts))
