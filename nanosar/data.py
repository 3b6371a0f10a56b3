"""
The one on-disk format that prepare.py writes and train.py / eval.py read, and helpers shared by the
dataset converters (TIFF reading with clear errors, tiling with overlap, label remapping).

A split is one folder:

    <split>/images.npy   (N, C, H, W) float16, pixels in meta["unit"] (see UNITS)
    <split>/labels.npy   (N, H, W) uint8 class ids, 255 = ignore
    <split>/tiles.jsonl  one JSON object per tile: where it came from (file, row, col) and, for
                         georeferenced sources, the tile's GeoTIFF tags
    <split>/meta.json    sensor, band, wavelength, polarizations / channels, unit, incidence range,
                         pixel spacing, looks, class names, provenance, sha256 of both arrays

The .npy files are read with np.load(mmap_mode="r"): zero-copy, any tile in O(1). A split is written
into a temporary folder and renamed into place when complete, so a crash never leaves half a split.
"""

import hashlib
import json
import os
import shutil

import numpy as np

FORMAT_VERSION = 1
IGNORE = 255
# The CrossEarth-SAR pre-training taxonomy; integer order is nanosar's (the paper does not give one).
CLASSES_7 = ("other", "building", "road", "water", "bare_land", "forest", "cropland")
# What a pixel value means: linear intensity (sigma0), linear amplitude (sqrt of intensity, or DN),
# dB (10 log10 intensity), complex SLC as (real, imag) channels, or one component of the SLC.
UNITS = ("intensity", "amplitude", "db", "complex", "real", "imag")
NPY_HEADER_BYTES = 256  # fixed-size .npy header, so the tile count can be filled in when writing ends


def write_text_atomic(path, text):
    """Write a text file under a temporary name, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def npy_header(shape, dtype):
    """A version-1.0 .npy header of exactly NPY_HEADER_BYTES bytes for a C-ordered array."""
    header = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
    header = header.encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(header) - 1
    if pad < 0:
        raise ValueError(f"array shape {shape} does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    body = header + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


class SplitWriter:
    """Append tiles to a new split folder; the folder appears, complete, only when close() succeeds.

        with SplitWriter("data/x/train", meta) as w:
            w.add(image (C, H, W), label (H, W), source="scene.tif", row=0, col=512)

    meta must hold "unit" (one of UNITS), "channels" (names, in order) and "class_names"; everything
    else (sensor, band, ...) is copied into meta.json as given. Every tile is checked: shape, finite
    pixels, label values in [0, num_classes) or 255; a bad tile raises ValueError naming its source
    and nothing is left on disk.
    """

    def __init__(self, path, meta):
        for key in ("unit", "channels", "class_names"):
            if key not in meta:
                raise ValueError(f"split meta for {path} lacks {key!r}")
        if meta["unit"] not in UNITS:
            raise ValueError(f"unit {meta['unit']!r} for {path} is not one of {UNITS}")
        self.path = os.path.abspath(path)
        self.meta = dict(meta)
        self.num_classes = len(meta["class_names"])
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.files = {name: open(os.path.join(self.tmp, f"{name}.npy"), "wb") for name in ("images", "labels")}
        self.hashes = {name: hashlib.sha256() for name in self.files}
        for f in self.files.values():
            f.write(b"\0" * NPY_HEADER_BYTES)               # placeholder, rewritten by close()
        self.tiles = open(os.path.join(self.tmp, "tiles.jsonl"), "w")
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
        for name, array in (("images", image.astype(np.float16)), ("labels", label.astype(np.uint8))):
            data = np.ascontiguousarray(array).tobytes()
            self.files[name].write(data)
            self.hashes[name].update(data)
        self.tiles.write(json.dumps({"source": source, **info}) + "\n")
        self.count += 1

    def close(self):
        """Write headers and meta.json, then move the folder into place (replacing an older one)."""
        if self.count == 0:
            self.abort()
            raise ValueError(f"no tiles were written to {self.path}")
        C, H, W = self.tile_shape
        arrays = (("images", (self.count, C, H, W), np.float16), ("labels", (self.count, H, W), np.uint8))
        for name, shape, dtype in arrays:
            f = self.files[name]
            f.seek(0)
            f.write(npy_header(shape, dtype))
            f.close()
        self.tiles.close()
        meta = {
            **self.meta,
            "format_version": FORMAT_VERSION,
            "num_tiles": self.count,
            "tile_shape": [C, H, W],
            "ignore_index": IGNORE,
            "sha256": {f"{name}.npy": h.hexdigest() for name, h in self.hashes.items()},  # of the array data
        }
        with open(os.path.join(self.tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        old = f"{self.path}.old-{os.getpid()}"
        if os.path.exists(self.path):
            os.replace(self.path, old)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self):
        """Remove everything written so far."""
        for f in (*self.files.values(), self.tiles):
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Split:
    """A prepared split, memory-mapped: images (N, C, H, W) float16, labels (N, H, W) uint8, meta dict."""

    def __init__(self, path, verify=False):
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"split folder {path} does not exist (run prepare.py first)")
        for name in ("meta.json", "images.npy", "labels.npy"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"split {path} is incomplete: {name} is missing")
        with open(meta_path) as f:
            self.meta = json.load(f)
        try:
            self.images = np.load(os.path.join(path, "images.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"split {path}: cannot map its arrays ({e}); the files are truncated or corrupt") from e
        n = self.meta.get("num_tiles")
        if self.images.shape[0] != n or self.labels.shape != (n, *self.images.shape[2:]):
            raise ValueError(f"split {path}: images {self.images.shape} and labels {self.labels.shape} do not "
                             f"match meta.json ({n} tiles)")
        if verify:
            self.verify()

    def verify(self):
        """Recompute the sha256 of both arrays and compare with meta.json."""
        for name, array in (("images.npy", self.images), ("labels.npy", self.labels)):
            digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
            if digest != self.meta["sha256"][name]:
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


# -----------------------------------------------------------------------------
# Helpers for the converters


def read_tiff(path, bands=None):
    """Read a (Geo)TIFF as (C, H, W) plus its GeoTIFF tags. Clear errors for missing, truncated or
    compressed-without-codec files, and a wrong band count when `bands` is given."""
    import tifffile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            array = page.asarray()
            geo = geotiff_tags(page)
            planar = page.planarconfig
    except (ValueError, KeyError, IndexError, OSError, tifffile.TiffFileError) as e:
        if "imagecodecs" in str(e):
            raise RuntimeError(f"{path}: compressed with a codec that needs the optional package imagecodecs "
                               f"(pip install imagecodecs): {e}") from e
        raise ValueError(f"{path}: cannot read TIFF ({e}); the file may be truncated or corrupt") from e
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and planar == 1 and array.shape[-1] < array.shape[0]:  # contig: (H, W, C)
        array = np.moveaxis(array, -1, 0)
    if bands is not None and array.shape[0] != bands:
        raise ValueError(f"{path}: expected {bands} band(s), found {array.shape[0]} (array shape {array.shape})")
    return array, geo


GEOTIFF_TAGS = {33550: "ModelPixelScale", 33922: "ModelTiepoint", 34264: "ModelTransformation",
                34735: "GeoKeyDirectory", 34736: "GeoDoubleParams", 34737: "GeoAsciiParams", 42113: "GDAL_NODATA"}


def geotiff_tags(page):
    """{name: value} of the GeoTIFF tags of a tifffile page (JSON-friendly lists), {} if none."""
    tags = {}
    for code, name in GEOTIFF_TAGS.items():
        if code in page.tags:
            value = page.tags[code].value
            tags[name] = value if isinstance(value, str) else list(np.asarray(value).ravel().tolist())
    return tags


def shift_geotags(geo, row, col):
    """GeoTIFF tags of a tile cut at (row, col) pixels: the tiepoint or transformation moves with it."""
    geo = dict(geo)
    if "ModelTiepoint" in geo and "ModelPixelScale" in geo:
        i, j, k, x, y, z = geo["ModelTiepoint"][:6]
        sx, sy = geo["ModelPixelScale"][:2]
        geo["ModelTiepoint"] = [0.0, 0.0, k, x + (col - i) * sx, y - (row - j) * sy, z]
    elif "ModelTransformation" in geo:
        m = list(geo["ModelTransformation"])
        m[3] += m[0] * col + m[1] * row
        m[7] += m[4] * col + m[5] * row
        geo["ModelTransformation"] = m
    return geo


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


def load_batch(split, indices):
    """Tiles `indices` of a Split as torch tensors: images (B, C, H, W) float32 in the split's unit,
    labels (B, H, W) int64. Indices are read in sorted order (sequential on disk), returned as asked."""
    import torch

    indices = np.asarray(indices)
    order = np.argsort(indices)
    images = np.empty((len(indices), *split.images.shape[1:]), np.float16)
    labels = np.empty((len(indices), *split.labels.shape[1:]), np.uint8)
    images[order] = split.images[indices[order]]
    labels[order] = split.labels[indices[order]]
    return torch.from_numpy(images).float(), torch.from_numpy(labels).long()


class TiffWindows:
    """Windows of a large (Geo)TIFF with bounded memory: an uncompressed contiguous image is memory-
    mapped; a striped or tiled (compressed) one is read strip by strip or tile by tile, decoding only
    the segments a window touches (a small cache keeps the last ones for overlapping windows).

        scene = TiffWindows("scene.tif"); window = scene.read(y0, y1, x0, x1)   # (C, y1-y0, x1-x0)
    """

    def __init__(self, path, cache_segments=64):
        import tifffile

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: file not found")
        try:
            self.tif = tifffile.TiffFile(path)
            page = self.page = self.tif.pages[0]
        except (ValueError, OSError, tifffile.TiffFileError) as e:
            raise ValueError(f"{path}: cannot read TIFF ({e}); the file may be truncated or corrupt") from e
        self.path = path
        self.height, self.width, self.bands = page.imagelength, page.imagewidth, page.samplesperpixel
        self.dtype, self.geo = page.dtype, geotiff_tags(page)
        self.separate = page.planarconfig == 2 and self.bands > 1
        self.memmap = None
        if page.is_contiguous and page.compression == 1:
            try:
                self.memmap = tifffile.memmap(path, page=0, mode="r")
            except (ValueError, OSError):
                self.memmap = None
        self.chunk = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, self.width)
        self.grid = (-(-self.height // self.chunk[0]), -(-self.width // self.chunk[1]))
        self.cache, self.cache_size = {}, cache_segments

    @property
    def nodata(self):
        """GDAL_NODATA as a number, or None."""
        value = self.geo.get("GDAL_NODATA")
        try:
            return float(str(value).strip("\x00 ")) if value is not None else None
        except ValueError:
            return None

    def _segment(self, index):
        """Decoded strip/tile `index` as (rows, cols, samples)."""
        if index not in self.cache:
            page, fh = self.page, self.tif.filehandle
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
            try:
                segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            except (ValueError, NotImplementedError, KeyError) as e:
                hint = " (pip install imagecodecs for this compression)" if "imagecodecs" in str(e) else ""
                raise RuntimeError(f"{self.path}: cannot decode segment {index}: {e}{hint}") from e
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[index] = segment[0]                      # drop the depth axis
        return self.cache[index]

    def read(self, y0, y1, x0, x1):
        """Pixels of rows y0..y1-1 and columns x0..x1-1 (clipped to the image) as (C, h, w)."""
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, self.height), min(x1, self.width)
        if self.memmap is not None:
            m = self.memmap
            if m.ndim == 2:
                return np.asarray(m[y0:y1, x0:x1])[None]
            if self.separate:                                        # (C, H, W) on disk
                return np.asarray(m[:, y0:y1, x0:x1])
            return np.moveaxis(np.asarray(m[y0:y1, x0:x1]), -1, 0)   # (H, W, C) on disk
        out = np.empty((self.bands, y1 - y0, x1 - x0), self.dtype)
        (ch, cw), (rows, cols) = self.chunk, self.grid
        planes = range(self.bands) if self.separate else [None]
        for plane in planes:
            for r in range(y0 // ch, (y1 - 1) // ch + 1):
                for c in range(x0 // cw, (x1 - 1) // cw + 1):
                    index = (plane or 0) * rows * cols + r * cols + c
                    seg = self._segment(index)                  # (rows, cols, samples)
                    sy0, sy1 = max(y0, r * ch), min(y1, r * ch + ch, self.height)
                    sx0, sx1 = max(x0, c * cw), min(x1, c * cw + cw, self.width)
                    part = seg[sy0 - r * ch:sy1 - r * ch, sx0 - c * cw:sx1 - c * cw]   # (h, w, samples)
                    target = out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
                    if plane is None:
                        target[...] = np.moveaxis(part, -1, 0)
                    else:
                        target[plane] = part[..., 0]
        return out

    def close(self):
        self.tif.close()
