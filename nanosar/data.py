"""
The one on-disk format that prepare.py writes and train.py / eval.py read, and helpers shared by the
dataset converters (tiling with overlap, label remapping). Reading TIFF / PNG / JPEG files and their
georeferencing is nanosar/geotiff.py; the pixel units and their conversions are nanosar/units.py.

A split is one folder:

    <split>/images.npy   (N, C, H, W) float16, pixels in meta["unit"] (nanosar/units.py; for "dn" with
                         meta["dn_scale"], the DN per unit amplitude, or null when unknown)
    <split>/labels.npy   (N, H, W) uint8 class ids, 255 = ignore
    <split>/tiles.jsonl  one JSON object per tile: where it came from (file, row, col) and, for
                         georeferenced sources, the tile's GeoTIFF tags
    <split>/meta.json    sensor, band, wavelength, polarizations / channels, unit, incidence range,
                         pixel spacing, looks, class names, provenance, sha256 of both arrays

The .npy files are read with np.load(mmap_mode="r"): zero-copy, any tile in O(1). A split is written
into a temporary folder and renamed into place when complete, so a crash never leaves half a split;
the debris of a killed writer (`<split>.tmp-PID`, `<split>.old-PID`) is cleaned up by the next one.
Opening a split checks meta.json (valid JSON, required keys) and that its label values fit its classes.
"""

import hashlib
import json
import os

import numpy as np
import torch

from nanosar.files import (
    explain_os_error,
    remove_path,
    remove_stale_temporaries,
    replace_folder,
    restore_stale_backups,
    temporary_name,
)
from nanosar.units import UNITS

FORMAT_VERSION = 1
IGNORE = 255
# The CrossEarth-SAR pre-training taxonomy; integer order is nanosar's (the paper does not give one).
CLASSES_7 = ("other", "building", "road", "water", "bare_land", "forest", "cropland")
NPY_HEADER_BYTES = 256  # fixed-size .npy header, so the tile count can be filled in when writing ends
REQUIRED_META = ("unit", "channels", "class_names", "num_tiles")  # what a reader of a split needs
SUITE_SETTINGS = ("tile", "seed", "generator_version")  # suite.json keys each split's provenance repeats


def npy_header(shape, dtype):
    """A version-1.0 .npy header of exactly NPY_HEADER_BYTES bytes for a C-ordered array."""
    header = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
    header = header.encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(header) - 1
    if pad < 0:
        raise ValueError(f"array shape {shape} does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    body = header + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def clean_split_debris(folder, name=None):
    """Tidy a folder of splits after killed writers: put back a `<split>.old-PID` backup whose split is
    missing (killed mid-replace) and remove `<split>.tmp-PID` temporaries of dead processes; only those of
    split `name` when given. Temporaries of live processes (parallel writers) are left alone."""
    restore_stale_backups(folder, name)
    remove_stale_temporaries(folder, name)


class SplitWriter:
    """Append tiles to a new split folder; the folder appears, complete, only when close() succeeds.

        with SplitWriter("data/x/train", meta) as w:
            w.add(image (C, H, W), label (H, W), source="scene.tif", row=0, col=512)

    meta must hold "unit" (one of nanosar.units.UNITS), "channels" (names, in order) and "class_names";
    for unit "dn" meta.json also records "dn_scale", the DN per unit of calibrated amplitude (null when
    unknown, the default). Everything else (sensor, band, ...) is copied into meta.json as given.
    Every tile is checked: shape, finite pixels, label values in [0, num_classes) or 255; a bad tile
    raises ValueError naming its source and nothing is left on disk. A write that fails (disk full)
    raises OSError naming the split, after removing the temporary folder; an older split at the same
    path is left as it was. The debris of killed writers of the same split (`<split>.tmp-PID`,
    `<split>.old-PID`) is cleaned up first.
    meta.json also records the label values present and the pixels per class, so a reader checks its
    labels against class_names without scanning them.
    """

    def __init__(self, path, meta):
        for key in ("unit", "channels", "class_names"):
            if key not in meta:
                raise ValueError(f"split meta for {path} lacks {key!r}")
        if meta["unit"] not in UNITS:
            raise ValueError(f"unit {meta['unit']!r} for {path} is not one of {UNITS}")
        self.meta = dict(meta)
        if meta["unit"] == "dn":
            scale = self.meta.setdefault("dn_scale", None)
            if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
                raise ValueError(f"dn_scale for {path} must be a positive number or None (unknown), got {scale!r}")
        self.path = os.path.abspath(path)
        self.num_classes = len(meta["class_names"])
        self.tmp = temporary_name(self.path)
        self.files, self.tiles = {}, None
        try:
            clean_split_debris(os.path.dirname(self.path), os.path.basename(self.path))   # and our own tmp
            os.makedirs(self.tmp)
            self.files = {name: open(os.path.join(self.tmp, f"{name}.npy"), "wb") for name in ("images", "labels")}
            for f in self.files.values():
                f.write(b"\0" * NPY_HEADER_BYTES)               # placeholder, rewritten by close()
            self.tiles = open(os.path.join(self.tmp, "tiles.jsonl"), "w")
        except OSError as e:
            self._fail(e)
        self.hashes = {name: hashlib.sha256() for name in self.files}
        self.label_counts = np.zeros(256, np.int64)            # pixels per label value, 255 = ignore
        self.count, self.tile_shape = 0, None

    def add(self, image, label, source="", **info):
        """Append one tile. image: (C, H, W) in meta["unit"], label: (H, W) class ids or 255."""
        image, label = np.asarray(image), np.asarray(label)
        where = f"{source or 'tile'} (tile {self.count})"
        C = len(self.meta["channels"])
        if image.ndim != 3 or image.shape[0] != C:
            raise ValueError(f"{where}: image must be (C={C}, H, W) for channels {self.meta['channels']}, "
                             f"got shape {image.shape}")
        if label.shape != image.shape[1:]:
            raise ValueError(f"{where}: label size {label.shape} does not match image size {image.shape[1:]}")
        if self.tile_shape is None:
            self.tile_shape = image.shape
        elif image.shape != self.tile_shape:
            raise ValueError(f"{where}: tile shape {image.shape} differs from the split's {self.tile_shape}")
        if not np.isfinite(image).all():
            raise ValueError(f"{where}: {int((~np.isfinite(image)).sum())} NaN or infinite pixels")
        if np.abs(image).max(initial=0) > np.finfo(np.float16).max:
            raise ValueError(f"{where}: values up to {np.abs(image).max():.3g} overflow float16; rescale them")
        if label.dtype.kind not in "ui":
            raise ValueError(f"{where}: labels must be integers, got {label.dtype}")
        values = np.unique(label)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != IGNORE)]
        if bad.size:
            raise ValueError(f"{where}: unknown label values {bad.tolist()} for {self.num_classes} classes "
                             f"{list(self.meta['class_names'])} (255 = ignore)")
        label = label.astype(np.uint8)
        try:
            for name, array in (("images", image.astype(np.float16)), ("labels", label)):
                data = np.ascontiguousarray(array).tobytes()
                self.files[name].write(data)
                self.hashes[name].update(data)
            self.tiles.write(json.dumps({"source": source, **info}) + "\n")
        except OSError as e:
            self._fail(e)
        self.label_counts += np.bincount(label.ravel(), minlength=256)
        self.count += 1

    def close(self):
        """Write headers and meta.json, then move the folder into place (replacing an older one)."""
        if self.count == 0:
            self.abort()
            raise ValueError(f"no tiles were written to {self.path}")
        C, H, W = self.tile_shape
        values = np.flatnonzero(self.label_counts)
        meta = {
            **self.meta,
            "format_version": FORMAT_VERSION,
            "num_tiles": self.count,
            "tile_shape": [C, H, W],
            "ignore_index": IGNORE,
            "label_values": values.tolist(),                                  # sorted, 255 = ignore
            "class_pixels": self.label_counts[:self.num_classes].tolist(),     # pixels per class id
            "sha256": {f"{name}.npy": h.hexdigest() for name, h in self.hashes.items()},  # of the array data
        }
        arrays = (("images", (self.count, C, H, W), np.float16), ("labels", (self.count, H, W), np.uint8))
        try:
            for name, shape, dtype in arrays:
                f = self.files[name]
                f.seek(0)
                f.write(npy_header(shape, dtype))
                f.close()                                          # flushes: a full disk fails here
            self.tiles.close()
            with open(os.path.join(self.tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            replace_folder(self.tmp, self.path)
        except OSError as e:
            self._fail(e)

    def abort(self):
        """Remove everything written so far. Never raises for a file that cannot be flushed (full disk)."""
        for f in (*self.files.values(), self.tiles):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass                       # a failed flush on a full disk; the file is closed all the same
        remove_path(self.tmp)

    def _fail(self, error):
        """Abort after an OSError and raise it again as one line naming the split."""
        self.abort()
        raise OSError(error.errno, explain_os_error(error, self.path)) from error

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_meta(path):
    """meta.json of the split folder `path` as a dict; ValueError naming the file if it is not valid JSON
    or lacks a key readers need (REQUIRED_META), FileNotFoundError if the folder or the file is missing."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"split folder {path} does not exist (run prepare.py first)")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"split {path} is incomplete: meta.json is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:                                   # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{meta_path} is not valid JSON ({e}): re-run prepare.py") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a {type(meta).__name__}, not a JSON object: re-run prepare.py")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {', '.join(map(repr, missing))}: re-run prepare.py")
    if not isinstance(meta["num_tiles"], int) or not isinstance(meta["class_names"], list):
        raise ValueError(f"{meta_path}: num_tiles must be an integer and class_names a list, got "
                         f"{meta['num_tiles']!r} and {meta['class_names']!r}: re-run prepare.py")
    return meta


def label_values(labels, chunk_bytes=64 << 20):
    """Sorted label values present in labels (N, H, W) uint8, read in chunks of about chunk_bytes (for
    memory-mapped splits written before meta.json recorded them)."""
    counts = np.zeros(256, np.int64)
    step = max(1, chunk_bytes // max(1, labels[0].size if len(labels) else 1))
    for i in range(0, len(labels), step):
        counts += np.bincount(np.asarray(labels[i:i + step]).ravel(), minlength=256)
    return np.flatnonzero(counts).tolist()


class Split:
    """A prepared split, memory-mapped: images (N, C, H, W) float16, labels (N, H, W) uint8, meta dict.

    Opening checks meta.json, the array shapes, and that every label value is a class id or 255
    (from meta.json's label_values; splits written before it existed are scanned once). verify=True
    also recomputes the sha256 of both arrays, which catches files changed after writing."""

    def __init__(self, path, verify=False):
        self.path = path
        self.meta = read_meta(path)
        for name in ("images.npy", "labels.npy"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"split {path} is incomplete: {name} is missing")
        try:
            self.images = np.load(os.path.join(path, "images.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"split {path}: cannot map its arrays ({e}); the files are truncated or corrupt") from e
        n = self.meta["num_tiles"]
        if self.images.shape[0] != n or self.labels.shape != (n, *self.images.shape[2:]):
            raise ValueError(f"split {path}: images {self.images.shape} and labels {self.labels.shape} do not "
                             f"match meta.json ({n} tiles)")
        self.check_labels()
        if verify:
            self.verify()

    def check_labels(self):
        """ValueError naming the split if a label value is neither a class id (< len(class_names)) nor 255."""
        values = self.meta.get("label_values")
        if values is None:
            values = label_values(self.labels)                 # a split from before label_values
        K = len(self.class_names)
        bad = [v for v in values if not (0 <= v < K or v == IGNORE)]
        if bad:
            raise ValueError(f"split {self.path}: label values {bad} are neither class ids of its {K} classes "
                             f"{self.class_names} nor 255 (ignore); labels and meta.json disagree: re-run prepare.py")

    def verify(self):
        """Recompute the sha256 of both arrays and compare with meta.json."""
        for name, array in (("images.npy", self.images), ("labels.npy", self.labels)):
            digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
            if digest != self.meta.get("sha256", {}).get(name):
                raise ValueError(f"split {self.path}: {name} checksum mismatch (file changed or corrupt)")

    def __len__(self):
        return self.images.shape[0]

    @property
    def unit(self):
        return self.meta["unit"]

    @property
    def channels(self):
        return list(self.meta["channels"])

    @property
    def class_names(self):
        return list(self.meta["class_names"])


def check_suite_complete(root, index="suite.json"):
    """Check a simulated data folder (prepare.py synthetic: suite.json; prepare.py corpus: corpus.json)
    before using it; returns the index file's dict.

    ValueError naming the file if the index says the folder is incomplete (a run was killed, or is still
    writing) or a domain split's meta.json disagrees with its settings (tile size, seed, tile count,
    generator version): a run with other settings was interrupted and left both behind. Suites written
    before these settings were recorded are accepted as they are.
    """
    path = os.path.join(root, index)
    command, what = ("corpus", "corpus") if index == "corpus.json" else ("synthetic", "suite")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run python prepare.py {command} --out {root}")
    try:
        with open(path) as f:
            suite = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-run prepare.py {command} --out {root}") from e
    tiles = suite.get("tiles") or {}
    rerun = (f"re-run python prepare.py {command} --out {root} --tile {suite.get('tile')} --seed {suite.get('seed')}"
             + "".join(f" --{split}-tiles {n}" for split, n in tiles.items()))
    if suite.get("complete") is False:
        raise ValueError(f"{path}: the {what} is incomplete (prepare.py was interrupted or is still running); "
                         f"{rerun} (finished domains are kept)")
    domains = suite.get("domains") or sorted({b[k] for b in suite.get("benchmarks", []) for k in ("source", "target")})
    domains = list(domains) + list(suite.get("extra_domains", []))
    for domain in (d["name"] if isinstance(d, dict) else d for d in domains):
        for split, n in tiles.items():
            split_path = os.path.join(root, domain, split)
            meta = read_meta(split_path)
            provenance = meta.get("provenance") or {}
            found = {"tiles": meta["num_tiles"], **{k: provenance.get(k) for k in SUITE_SETTINGS}}
            wanted = {"tiles": n, **{k: suite[k] for k in SUITE_SETTINGS if k in suite}}
            differ = {k: (found[k], v) for k, v in wanted.items() if found[k] != v}
            if differ:
                text = ", ".join(f"{k} {a} (suite.json: {b})" for k, (a, b) in differ.items())
                raise ValueError(f"{split_path} was written with other settings than {path}: {text}; {rerun}")
    return suite


# -----------------------------------------------------------------------------
# Helpers for the converters and scene prediction: tiling with overlap, labels (values or colours) to class
# ids, batches.


def tile_positions(size, tile, overlap):
    """Start offsets of tiles of `tile` pixels along an axis of `size`, `overlap` pixels shared; the last
    tile is aligned with the end. A size below `tile` gives [0] (the tile is then padded)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile size {tile}")
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def cut_tiles(image, label, tile, overlap):
    """Yield (row, col, image tile (C, tile, tile), label tile (tile, tile)) covering a scene.

    image: (C, H, W), label: (H, W). Scenes smaller than a tile are padded: image with 0, label with 255.
    """
    C, H, W = image.shape
    if label.shape != (H, W):
        raise ValueError(f"image size {(H, W)} and label size {label.shape} differ")
    if H < tile or W < tile:
        padded = np.zeros((C, max(H, tile), max(W, tile)), image.dtype)
        padded[:, :H, :W] = image
        padded_label = np.full(padded.shape[1:], IGNORE, np.uint8)
        padded_label[:H, :W] = label
        image, label = padded, padded_label
        H, W = label.shape
    for row in tile_positions(H, tile, overlap):
        for col in tile_positions(W, tile, overlap):
            yield row, col, image[:, row:row + tile, col:col + tile], label[row:row + tile, col:col + tile]


def remap_labels(label, mapping, path):
    """Map dataset label values to class ids with a {value: id} dict (ids may be 255 = ignore).

    A value not in the mapping raises ValueError naming the file and the values seen.
    """
    label = np.asarray(label)
    if label.size and label.max() > max(mapping):                   # before sizing the lookup table by it
        unknown = np.unique(label[label > max(mapping)]).tolist()[:20]
        raise ValueError(f"{path}: unknown label values {unknown}; expected {sorted(mapping)}")
    lut = np.full(max(mapping) + 1, -1, np.int16)
    for value, cls in mapping.items():
        lut[value] = cls
    if label.min(initial=0) < 0:
        raise ValueError(f"{path}: negative label values {np.unique(label[label < 0]).tolist()}")
    out = lut[label]
    if (out < 0).any():
        unknown = np.unique(label[out < 0]).tolist()
        raise ValueError(f"{path}: unknown label values {unknown}; expected {sorted(mapping)}")
    return out.astype(np.uint8)


def label_ids(array, path):
    """A 1-band label (1, H, W) of integer values (floats allowed if integral) -> (H, W) integers."""
    if array.shape[0] != 1:
        raise ValueError(f"{path}: expected a 1-band label of class values, found {array.shape[0]} bands")
    label = array[0]
    if label.dtype.kind == "f":
        if not (np.isfinite(label).all() and (label == np.round(label)).all()):
            raise ValueError(f"{path}: label has NaN or non-integer values")
        return label.astype(np.int64)
    if label.dtype.kind not in "ui":
        raise ValueError(f"{path}: label dtype {label.dtype} is not an integer type")
    return label


def colours_to_ids(rgb, palette, path):
    """An RGB label (3, H, W) -> (H, W) ids with {(r, g, b): id}; unknown colours raise naming the file."""
    code = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2].astype(np.int64)
    ids = np.full(code.shape, -1, np.int64)
    for (r, g, b), cls in palette.items():
        ids[code == (r << 16 | g << 8 | b)] = cls
    if (ids < 0).any():
        bad = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in np.unique(code[ids < 0])[:8].tolist()]
        raise ValueError(f"{path}: unknown label colours {bad}; expected {sorted(palette)}")
    return ids


def nearest_colours(rgb, palette, tolerance):
    """An RGB label (3, H, W) uint8 with noisy colours -> ((H, W) values of the nearest palette colour,
    255 where no palette colour is within `tolerance` in every channel; (P,) pixels per palette colour;
    pixels matching none). palette: {(r, g, b): value}. Each distinct colour is looked up once."""
    code = (rgb[0].astype(np.int32) << 16) | (rgb[1].astype(np.int32) << 8) | rgb[2].astype(np.int32)  # (H, W)
    counts = np.bincount(code.ravel(), minlength=1 << 24)                  # pixels per 24-bit colour
    seen = np.flatnonzero(counts)                                          # (K,) colours present
    colours = np.stack([seen >> 16, (seen >> 8) & 255, seen & 255], 1)     # (K, 3)
    keys = np.array(list(palette), np.int64)                               # (P, 3)
    dist = np.abs(colours[:, None, :] - keys[None]).max(-1)                # (K, P) largest channel difference
    nearest, matched = dist.argmin(1), dist.min(1) <= tolerance            # (K,)
    lut = np.full(1 << 24, IGNORE, np.uint8)
    lut[seen[matched]] = np.array(list(palette.values()), np.uint8)[nearest[matched]]
    per_colour = np.bincount(nearest[matched], weights=counts[seen[matched]], minlength=len(keys))
    return lut[code], per_colour.astype(np.int64), int(counts[seen[~matched]].sum())


def load_batch(split, indices):
    """Tiles `indices` of a Split as torch tensors: images (B, C, H, W) float32 in the split's unit,
    labels (B, H, W) int64. Indices are read in sorted order (sequential on disk), returned as asked."""
    indices = np.asarray(indices)
    order = np.argsort(indices)
    images = np.empty((len(indices), *split.images.shape[1:]), np.float16)
    labels = np.empty((len(indices), *split.labels.shape[1:]), np.uint8)
    images[order] = split.images[indices[order]]
    labels[order] = split.labels[indices[order]]
    check_tile_labels(split, indices, labels)
    return torch.from_numpy(images).float(), torch.from_numpy(labels).long()


def check_tile_labels(split, indices, labels):
    """ValueError naming the split, the tile and the value if labels (B, H, W) uint8 of tiles `indices` hold a
    value that is neither a class id nor 255: a labels.npy changed after its meta.json was written, which
    opening the split (check_labels reads meta.json) cannot see. One pass over the batch's labels."""
    num_classes = len(split.meta["class_names"])
    bad = (labels >= num_classes) & (labels != IGNORE)                      # (B, H, W)
    if bad.any():
        b = int(np.flatnonzero(bad.reshape(len(labels), -1).any(axis=1))[0])
        value = int(labels[b][bad[b]][0])
        raise ValueError(f"split {split.path}: tile {int(indices[b])} has label value {value}, neither a class "
                         f"id of its {num_classes} classes nor 255 (ignore), and meta.json does not list it: "
                         f"labels.npy changed after prepare.py wrote it; fix that tile or re-run prepare.py for "
                         f"this split")


# -----------------------------------------------------------------------------
# The training stream: every batch a function of (seed, position), so resume and DDP are exact


def stream_indices(n, seed, start, count):
    """Tile indices (list of count ints in [0, n)) at positions start .. start + count - 1 of a stream over
    n tiles that reads a fresh permutation per epoch: position p is tile perm_{p // n}[p % n], with
    perm_e = permutation seeded by (seed, e). Any batch is a function of (seed, position) alone, which
    makes resume and the DDP/single-process equivalence exact."""
    epochs = range(start // n, (start + count - 1) // n + 1) if count else range(0)
    perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in epochs}
    return [int(perms[p // n][p % n]) for p in range(start, start + count)]


def augment(images, labels, seed, start):
    """Flip / rotate tile b of a batch read at stream position start + b by one of the 8 dihedral
    transforms, drawn from (seed, position), so augmentation too is reproducible. In place; returns both."""
    for b in range(len(images)):
        k = int(np.random.default_rng([seed, start + b, 7]).integers(8))
        images[b], labels[b] = dihedral(images[b], k), dihedral(labels[b], k)
    return images, labels


class TileStream:
    """The training tiles of one or more splits as one index space, read as stream_indices orders them."""

    def __init__(self, splits, val_fraction, seed):
        self.splits, self.seed = splits, seed
        self.train, self.val = [], []  # (split index, tile index)
        for s, split in enumerate(splits):
            n_val = int(len(split) * val_fraction)
            self.train += [(s, i) for i in range(len(split) - n_val)]
            self.val += [(s, i) for i in range(len(split) - n_val, len(split))]
        if not self.train:
            raise ValueError(f"no training tiles in {[sp.path for sp in splits]}")

    def tiles_at(self, start, count):
        """(split, tile) pairs at stream positions start .. start + count - 1."""
        return [self.train[i] for i in stream_indices(len(self.train), self.seed, start, count)]

    def batch(self, start, count, augment_tiles):
        """Images (B, C, H, W) float32 and labels (B, H, W) int64 at stream positions start...; flipped and
        rotated (augment) when augment_tiles."""
        images, labels = read_tiles(self.splits, self.tiles_at(start, count))
        return augment(images, labels, self.seed, start) if augment_tiles else (images, labels)


def read_tiles(splits, pairs):
    """(split, tile) pairs -> images (B, C, H, W) float32, labels (B, H, W) int64, in the pairs' order;
    one batched read per split."""
    images = torch.empty(len(pairs), *splits[0].images.shape[1:])
    labels = torch.empty(len(pairs), *splits[0].labels.shape[1:], dtype=torch.long)
    for s, split in enumerate(splits):
        where = [b for b, (t, _) in enumerate(pairs) if t == s]
        if where:
            images[where], labels[where] = load_batch(split, [pairs[b][1] for b in where])
    return images, labels


def dihedral(x, k):
    """One of the 8 flips/rotations of the square, on the last two dims."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def open_splits(folders, split_name):
    """The prepared <folder>/<split_name> splits of one or more domains, to be used together: they must
    share unit, channels, classes and tile size (ValueError naming the two that differ)."""
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data folder {folder} does not exist (prepare it first: python prepare.py ...)")
    splits = [Split(os.path.join(folder, split_name)) for folder in folders]
    for sp in splits[1:]:
        for key in ("unit", "channels", "class_names", "tile_shape"):
            if sp.meta[key] != splits[0].meta[key]:
                raise ValueError(f"{sp.path} has {key}={sp.meta[key]} but {splits[0].path} has "
                                 f"{splits[0].meta[key]}: mixed datasets must share units, channels, classes "
                                 f"and tile size")
    return splits


def channel_statistics(splits, max_tiles=256):
    """Per-channel mean and std (tuples, in the data's unit) of up to max_tiles training tiles: the model's
    input normalisation."""
    images = np.concatenate([np.asarray(sp.images[: max_tiles // len(splits)], np.float64) for sp in splits])
    mean, std = images.mean(axis=(0, 2, 3)), images.std(axis=(0, 2, 3))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-6)) for s in std)
