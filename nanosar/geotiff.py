"""
Raster files in, with their georeferencing: (Geo)TIFF with tifffile (whole images, or windows of scenes
larger than memory), the PNG and JPEG files some datasets ship, and the small amount of GIS the
converters need (GeoTIFF tags moved with a tile, GeoJSON polygons burnt into a mask in pixel coordinates,
WGS84 lon/lat -> UTM). No GDAL, rasterio or pyproj: tifffile, numpy and zlib; JPEG needs the optional
Pillow (or imagecodecs).

Files from the wild are truncated (interrupted downloads), corrupt, or declare sizes their bytes cannot
hold; every such file is a ValueError "<path>: truncated or corrupt TIFF (...)" (or PNG), a codec that is
not installed a RuntimeError naming the package to install.
"""

import json
import os
import struct
import zlib

import numpy as np

# -----------------------------------------------------------------------------
# 1. TIFF: whole images

# The largest decoded / stored size ratio a valid segment can reach, per TIFF compression code: deflate
# (8, 32946) 1032:1, PackBits (32773) 128:1, LZW (5) < 4096:1. Other codecs are not bounded here.
MAX_COMPRESSION_RATIO = {5: 4096, 8: 1032, 32946: 1032, 32773: 128}


def tiff_error(path, error, segment=None):
    """The exception to raise for a TIFF that tifffile could not read or decode: RuntimeError when an
    optional codec (imagecodecs) is missing, else ValueError naming the file (and the segment)."""
    if "imagecodecs" in str(error):
        return RuntimeError(f"{path}: compressed with a codec that needs the optional package imagecodecs "
                            f"(pip install imagecodecs): {error}")
    where = "" if segment is None else f"segment {segment}: "
    kind = type(error).__name__ if type(error).__module__ == "builtins" else \
        f"{type(error).__module__.split('.')[0]}.{type(error).__name__}"          # e.g. zlib.error
    return ValueError(f"{path}: truncated or corrupt TIFF ({where}{kind}: {error})")


def open_tiff(path):
    """A tifffile.TiffFile whose first page's strips or tiles all lie inside the file (check_tiff_segments)."""
    import tifffile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:                       # tifffile raises many types on damaged headers
        raise tiff_error(path, e) from e
    try:
        check_tiff_segments(tif, path)
    except BaseException:
        tif.close()
        raise
    return tif


def check_tiff_segments(tif, path):
    """ValueError naming `path` unless the first page's strips / tiles (segments) are as many as its size
    needs, lie inside the file, and hold enough bytes: their rows' worth when uncompressed, at least
    1 / MAX_COMPRESSION_RATIO of it when compressed. A truncated file or a header declaring 60000 x 60000
    pixels over a few hundred bytes fails here, before anything is allocated or memory-mapped. Segments of
    0 bytes are sparse (GDAL SPARSE_OK) and read as 0."""
    try:
        page = tif.pages[0]
        H, W, S, bits = page.imagelength, page.imagewidth, page.samplesperpixel, page.bitspersample
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
    except Exception as e:
        raise tiff_error(path, e) from e

    def corrupt(detail):
        return ValueError(f"{path}: truncated or corrupt TIFF ({detail})")

    if page.imagedepth != 1:
        raise ValueError(f"{path}: a 3-D TIFF (ImageDepth {page.imagedepth}) is not a SAR scene; give a 2-D image")
    planes, samples = (S, 1) if page.planarconfig == 2 else (1, S)        # separate planes or interleaved
    rows, cols = (page.tilelength, page.tilewidth) if page.is_tiled else (min(page.rowsperstrip or H, H), W)
    if min(H, W, S, bits, rows, cols) <= 0:
        raise corrupt(f"declares {H} x {W} pixels x {S} samples of {bits} bits in segments of {rows} x {cols}")
    grid = (-(-H // rows), -(-W // cols))                                 # segments down, across
    n = planes * grid[0] * grid[1]
    if len(offsets) != n or len(counts) != n:
        raise corrupt(f"{len(offsets)} strips/tiles for an image of {H} x {W} x {S} that needs {n}")
    row_bytes = -(-cols * samples * bits // 8)
    if page.is_tiled:
        need = np.full(n, rows * row_bytes, np.int64)                     # tiles are always whole
    else:
        strip_rows = np.minimum(rows, H - np.arange(grid[0]) * rows)      # the last strip may be shorter
        need = np.tile(strip_rows * row_bytes, planes)
    stored = counts > 0
    ends = offsets + counts
    beyond = np.flatnonzero(stored & (ends > tif.filehandle.size))
    if beyond.size:
        i = int(beyond[0])
        raise corrupt(f"segment {i} ends at byte {int(ends[i])}, beyond the file's {tif.filehandle.size} bytes; "
                      f"{beyond.size} of {n} segments are cut off")
    if page.compression == 1:
        short = np.flatnonzero(stored & (counts < need))
        detail = "holds {} bytes, its rows need {}"
    else:
        ratio = MAX_COMPRESSION_RATIO.get(int(page.compression))
        short = np.flatnonzero(stored & (counts * ratio + 1024 < need)) if ratio else np.empty(0, int)
        detail = "holds {} compressed bytes, which cannot expand to the {} its rows need"
    if short.size:
        i = int(short[0])
        raise corrupt(f"{H} x {W} pixels declared; segment {i} " + detail.format(int(counts[i]), int(need[i])))


def read_tiff(path, bands=None):
    """Read a (Geo)TIFF's first page as (C, H, W) plus its GeoTIFF tags. C = samples per pixel, taken from
    the file's own SamplesPerPixel and PlanarConfiguration (interleaved or separate planes). Clear errors
    for missing, truncated, corrupt or compressed-without-codec files, and a wrong band count when
    `bands` is given."""
    with open_tiff(path) as tif:
        page = tif.pages[0]
        geo = geotiff_tags(page)
        shaped = page.shaped                  # (separate samples, depth, H, W, interleaved samples)
        try:
            array = page.asarray()
        except MemoryError:
            raise MemoryError(f"{path}: {shaped[2]} x {shaped[3]} pixels of {page.dtype} do not fit in memory; "
                              f"cut the scene into smaller files") from None
        except Exception as e:               # zlib.error, tifffile's reshape errors, codec errors, ...
            raise tiff_error(path, e) from e
    planes, _, H, W, samples = shaped
    array = np.moveaxis(array.reshape(planes, H, W, samples), -1, 1)       # (planes, samples, H, W)
    array = array.reshape(planes * samples, H, W)                          # one of the two is 1
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


def parse_nodata(value):
    """GDAL_NODATA (an ASCII tag such as "-9999" or "nan") as a float; None if absent or not a number."""
    try:
        return float(str(value).strip("\x00 ")) if value is not None else None
    except ValueError:
        return None


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


# -----------------------------------------------------------------------------
# 2. TIFF: windows of scenes larger than memory


TAG_TYPES = {"ModelPixelScale": 12, "ModelTiepoint": 12, "ModelTransformation": 12, "GeoKeyDirectory": 3,
             "GeoDoubleParams": 12, "GeoAsciiParams": 2}   # TIFF types: 12 double, 3 short, 2 ascii


def geotiff_extratags(geo, nodata):
    """tifffile extratags of the georeferencing tags `geo` (geotiff_tags) plus GDAL_NODATA = nodata."""
    codes = {name: code for code, name in GEOTIFF_TAGS.items()}
    extratags = [(codes[name], TAG_TYPES[name], 0 if TAG_TYPES[name] == 2 else len(value), value, True)
                 for name, value in geo.items() if name in TAG_TYPES]
    return extratags + [(codes["GDAL_NODATA"], 2, 0, str(nodata), True)]


def write_tiled_geotiff(path, tiles, shape, tile, geo, nodata):
    """Write a (H, W) uint8 GeoTIFF tile by tile: `tiles` yields (tile, tile) arrays in row-major tile order
    (so memory stays one tile), deflate-compressed, with the georeferencing tags `geo` (geotiff_tags of
    the input) and GDAL_NODATA = nodata. BigTIFF when the image passes 2 GiB."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=shape[0] * shape[1] > 2**31) as writer:
        writer.write(tiles, shape=shape, dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     extratags=geotiff_extratags(geo, nodata), photometric="minisblack")


def write_band_geotiff(path, bands, geo, nodata, description=None):
    """Write bands (B, H, W) uint8, held in memory, as one deflate-compressed GeoTIFF of B separate planes
    with the georeferencing tags `geo`, GDAL_NODATA = nodata and an optional ImageDescription."""
    import tifffile

    tifffile.imwrite(path, np.asarray(bands, np.uint8), photometric="minisblack", planarconfig="separate",
                     compression="zlib", extratags=geotiff_extratags(geo, nodata), description=description,
                     metadata=None)


def coarsen_geotags(geo, factor):
    """GeoTIFF tags of a grid whose cells are factor x factor pixels of the grid `geo` describes, with the
    same origin (cell (0, 0) covers pixels [0, factor) x [0, factor)): the pixel size times factor, a
    tiepoint's raster position moved to the coarse grid (with RasterPixelIsPoint, whose raster positions
    are pixel centres: fine pixel i = factor i' + (factor - 1) / 2)."""
    geo = dict(geo)
    offset = (factor - 1) / 2 if geokeys(geo).get(1025) == 2 else 0.0
    if "ModelPixelScale" in geo:
        sx, sy, *rest = geo["ModelPixelScale"]
        geo["ModelPixelScale"] = [sx * factor, sy * factor, *rest]
    if "ModelTiepoint" in geo:
        i, j, *rest = geo["ModelTiepoint"]
        geo["ModelTiepoint"] = [(i - offset) / factor, (j - offset) / factor, *rest]
    if "ModelTransformation" in geo:
        m = list(geo["ModelTransformation"])
        m[3], m[7] = m[3] + (m[0] + m[1]) * offset, m[7] + (m[4] + m[5]) * offset
        m[0], m[1], m[4], m[5] = m[0] * factor, m[1] * factor, m[4] * factor, m[5] * factor
        geo["ModelTransformation"] = m
    return geo


class TiffWindows:
    """Windows of a large (Geo)TIFF with bounded memory: an uncompressed contiguous image is memory-
    mapped; a striped or tiled (compressed) one is read strip by strip or tile by tile, decoding only
    the segments a window touches (a small cache keeps the last ones for overlapping windows).
    Opening checks that every segment lies inside the file (check_tiff_segments); a segment that fails
    to decode raises ValueError naming the file and the segment.

        scene = TiffWindows("scene.tif"); window = scene.read(y0, y1, x0, x1)   # (C, y1-y0, x1-x0)
    """

    def __init__(self, path, cache_segments=64):
        import tifffile

        self.tif = open_tiff(path)
        page = self.page = self.tif.pages[0]
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
        self.chunk = (page.tilelength, page.tilewidth) if page.is_tiled else (min(page.rowsperstrip or self.height,
                                                                                   self.height), self.width)
        self.grid = (-(-self.height // self.chunk[0]), -(-self.width // self.chunk[1]))
        self.cache, self.cache_size = {}, cache_segments

    @property
    def nodata(self):
        """GDAL_NODATA as a number, or None."""
        return parse_nodata(self.geo.get("GDAL_NODATA"))

    def _segment(self, index):
        """Decoded strip/tile `index` as (rows, cols, samples); a sparse (0-byte) one is all 0."""
        if index not in self.cache:
            page, fh = self.page, self.tif.filehandle
            if page.databytecounts[index] == 0:
                samples = 1 if self.separate else self.bands
                segment = np.zeros((*self.chunk, samples), self.dtype)
            else:
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
                try:
                    segment = page.decode(data, index, jpegtables=page.jpegtables)[0][0]   # drop the depth axis
                except Exception as e:                 # zlib.error, reshape errors, codec errors, ...
                    raise tiff_error(self.path, e, index) from e
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[index] = segment
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


# -----------------------------------------------------------------------------
# 3. PNG and JPEG (DDHR-SK's JPEG SAR and palette-PNG labels, some label folders of other datasets)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples: grey, RGB, palette, grey+alpha, RGBA


def read_png(path):
    """A PNG as (C, H, W) uint8 (uint16 for 16-bit samples), decoded with zlib alone. A palette image gives
    its palette INDICES (C = 1), which is how label PNGs store class ids; grey C = 1, grey + alpha 2, RGB 3,
    RGBA 4. Adam7-interlaced files are refused (ValueError), as are truncated or corrupt ones."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file (no PNG signature)")
    header, idat, pos = None, [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = data[pos + 8:pos + 8 + length] if kind == b"IHDR" else header
        if kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length                                    # length, type, body, CRC
    if header is None or len(header) != 13 or not idat:
        raise ValueError(f"{path}: truncated or corrupt PNG (no IHDR or no IDAT chunk)")
    W, H, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if color not in PNG_CHANNELS or depth not in (1, 2, 4, 8, 16) or interlace:
        raise ValueError(f"{path}: PNG colour type {color}, {depth} bits{', interlaced' if interlace else ''} is "
                         f"not supported; re-save it non-interlaced")
    C = PNG_CHANNELS[color]
    stride, bpp = -(-W * C * depth // 8), max(1, C * depth // 8)      # bytes per row, per pixel
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as e:
        raise ValueError(f"{path}: truncated or corrupt PNG (zlib.error: {e})") from e
    if raw.size != H * (stride + 1):
        raise ValueError(f"{path}: truncated or corrupt PNG ({raw.size} bytes of pixels, {H} x {W} need "
                         f"{H * (stride + 1)})")
    rows = raw.reshape(H, stride + 1)
    out = png_unfilter(rows[:, 0], rows[:, 1:], bpp, path)             # (H, stride) bytes
    if depth < 8:                                                      # several pixels per byte, MSB first
        out = np.unpackbits(out, axis=1).reshape(H, -1, depth)[:, :W]
        out = (out * (1 << np.arange(depth - 1, -1, -1, dtype=np.uint8))).sum(-1, dtype=np.uint8)
    elif depth == 16:
        out = out.view(">u2").astype(np.uint16)
    return np.moveaxis(out.reshape(H, W, C), -1, 0)


def png_unfilter(filters, rows, bpp, path):
    """Undo the PNG row filters. filters: (H,) 0 none, 1 sub, 2 up, 3 average, 4 Paeth; rows: (H, stride)
    uint8 filtered bytes; bpp: bytes per pixel (>= 1). Returns (H, stride) uint8. Sum and differences wrap
    modulo 256; average and Paeth depend on the byte decoded just before, so they run byte by byte."""
    out = np.empty_like(rows)
    prev = np.zeros(rows.shape[1], np.uint8)
    for y, (kind, row) in enumerate(zip(filters.tolist(), rows)):
        if kind == 0:
            out[y] = row
        elif kind == 1:                                              # + the byte bpp to the left
            out[y] = np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).ravel()
        elif kind == 2:                                              # + the byte above
            out[y] = row + prev
        elif kind in (3, 4):
            cur, up = bytearray(row.tobytes()), prev.tolist()
            for i in range(len(cur)):
                a = cur[i - bpp] if i >= bpp else 0                  # left, above, above-left
                b, c = up[i], (up[i - bpp] if i >= bpp else 0)
                if kind == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 255
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            out[y] = np.frombuffer(bytes(cur), np.uint8)
        else:
            raise ValueError(f"{path}: truncated or corrupt PNG (row {y} has filter type {kind})")
        prev = out[y]
    return out


def read_jpeg(path):
    """A JPEG as (C, H, W) uint8 with the optional Pillow (or imagecodecs); RuntimeError naming the file and
    the package to install when neither is there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        from PIL import Image

        def decode(p):
            with Image.open(p) as image:
                return np.asarray(image)
    except ImportError:
        try:
            import imagecodecs
            decode = imagecodecs.imread
        except ImportError:
            raise RuntimeError(f"{path}: reading JPEG needs the optional package Pillow (pip install pillow) "
                               f"or imagecodecs") from None
    try:
        array = decode(path)
    except Exception as e:                   # each decoder has its own error types
        raise ValueError(f"{path}: cannot decode JPEG ({type(e).__name__}: {e}); truncated or corrupt") from e
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def read_image(path, bands=None):
    """(C, H, W) array and GeoTIFF tags ({} for PNG / JPEG) of a .tif/.tiff, .png or .jpg/.jpeg file;
    ValueError naming the file when `bands` is given and the band count differs."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tif", ".tiff"):
        return read_tiff(path, bands)
    if ext not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"{path}: not a TIFF, PNG or JPEG file")
    array = read_png(path) if ext == ".png" else read_jpeg(path)
    if bands is not None and array.shape[0] != bands:
        raise ValueError(f"{path}: expected {bands} band(s), found {array.shape[0]} (array shape {array.shape})")
    return array, {}


# -----------------------------------------------------------------------------
# 4. GIS for SpaceNet 6: GeoJSON polygons -> pixel mask, lon/lat -> UTM, GeoKeys


def rasterize_polygons(polygons, shape):
    """Burn polygons into a (H, W) uint8 mask: 1 where a pixel centre is inside, else 0.

    polygons: list of polygons, each a list of rings, each ring an (N, 2) array of (x = col, y = row)
    pixel coordinates (pixel (r, c) covers [c, c+1) x [r, r+1), its centre is (c + 0.5, r + 0.5)).
    Inside = odd number of ring-edge crossings (even-odd rule over all rings, so holes work).
    """
    H, W = shape
    mask = np.zeros((H, W), np.uint8)
    for rings in polygons:
        rings = [np.asarray(r, np.float64)[:, :2] for r in rings if len(r) >= 3]
        if not rings:
            continue
        pts = np.concatenate(rings)
        c0, c1 = max(int(np.ceil(pts[:, 0].min() - 0.5)), 0), min(int(np.floor(pts[:, 0].max() - 0.5)), W - 1)
        r0, r1 = max(int(np.ceil(pts[:, 1].min() - 0.5)), 0), min(int(np.floor(pts[:, 1].max() - 0.5)), H - 1)
        if c0 > c1 or r0 > r1:
            continue
        y, x = np.mgrid[r0:r1 + 1, c0:c1 + 1] + 0.5  # (h, w) pixel centres of the bounding box
        inside = np.zeros(x.shape, bool)
        for ring in rings:
            for (x1, y1), (x2, y2) in zip(ring, np.roll(ring, -1, axis=0)):
                if y1 == y2:
                    continue  # a horizontal edge never crosses the horizontal ray
                crosses = (y1 > y) != (y2 > y)
                inside ^= crosses & (x < x1 + (y - y1) * (x2 - x1) / (y2 - y1))
        mask[r0:r1 + 1, c0:c1 + 1] |= inside
    return mask


def lonlat_to_utm(lon, lat, zone, north=True):
    """WGS84 lon, lat (degrees) -> UTM easting, northing (m) in `zone` (Snyder 1987 series, mm-level within
    a zone; no pyproj needed)."""
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    phi, lam = np.radians(lat), np.radians(lon) - np.radians(6 * zone - 183)
    N = a / np.sqrt(1 - e2 * np.sin(phi) ** 2)
    T, C, A = np.tan(phi) ** 2, ep2 * np.cos(phi) ** 2, lam * np.cos(phi)
    M = a * ((1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256) * phi
             - (3 * e2 / 8 + 3 * e2**2 / 32 + 45 * e2**3 / 1024) * np.sin(2 * phi)
             + (15 * e2**2 / 256 + 45 * e2**3 / 1024) * np.sin(4 * phi) - 35 * e2**3 / 3072 * np.sin(6 * phi))
    x = k0 * N * (A + (1 - T + C) * A**3 / 6 + (5 - 18 * T + T**2 + 72 * C - 58 * ep2) * A**5 / 120) + 500000.0
    y = k0 * (M + N * np.tan(phi) * (A**2 / 2 + (5 - T + 9 * C + 4 * C**2) * A**4 / 24
                                     + (61 - 58 * T + T**2 + 600 * C - 330 * ep2) * A**6 / 720))
    return x, (y if north else y + 10000000.0)


def geokeys(geo):
    """{GeoKey id: value} of the GeoKeyDirectory's short-valued keys."""
    d = geo.get("GeoKeyDirectory") or []
    return {int(d[i]): int(d[i + 3]) for i in range(4, len(d) - 3, 4) if d[i + 1] == 0}


def geojson_polygons(path, geo, image_path):
    """Polygons of a GeoJSON file as lists of (N, 2) rings in the pixel coordinates of the image. An empty
    file (0 bytes or blank: SpaceNet 6's tiles without buildings) has no polygons."""
    try:
        with open(path) as f:
            text = f.read()
        doc = json.loads(text) if text.strip() else {"features": []}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read GeoJSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("features", []), list):
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection (a JSON object with a list of features)")
    name = ((doc.get("crs") or {}).get("properties") or {}).get("name", "CRS84")  # RFC 7946 default: lon/lat
    code = name.rsplit(":", 1)[-1]
    src = 4326 if name.endswith("CRS84") else int(code) if code.isdigit() else None
    keys = geokeys(geo)
    dst = keys.get(3072) or keys.get(2048)  # ProjectedCSTypeGeoKey or GeographicTypeGeoKey
    if src is not None and src == dst:
        to_crs = None
    elif src == 4326 and dst is not None and (32601 <= dst <= 32660 or 32701 <= dst <= 32760):
        def to_crs(xy):
            return np.stack(lonlat_to_utm(xy[:, 0], xy[:, 1], dst % 100, dst < 32700), 1)
    else:
        raise ValueError(f"{path}: GeoJSON CRS {name!r} (EPSG {src}) cannot be mapped onto the CRS (EPSG {dst}) "
                         f"of {image_path}; only equal CRSs or lon/lat over UTM are supported")
    shift = 0.5 if keys.get(1025) == 2 else 0.0  # RasterPixelIsPoint: tiepoints refer to pixel centres
    if "ModelTransformation" in geo:
        m = np.asarray(geo["ModelTransformation"], np.float64)
        inv = np.linalg.inv(np.array([[m[0], m[1]], [m[4], m[5]]]))
        def to_pixel(xy):
            return (xy - m[[3, 7]]) @ inv.T + shift
    elif "ModelTiepoint" in geo and "ModelPixelScale" in geo:
        i, j, _, X, Y, _ = geo["ModelTiepoint"][:6]
        sx, sy = geo["ModelPixelScale"][:2]
        def to_pixel(xy):
            return np.stack([i + (xy[:, 0] - X) / sx, j + (Y - xy[:, 1]) / sy], 1) + shift
    else:
        raise ValueError(f"{image_path}: no GeoTIFF georeferencing, cannot place the polygons of {path}")
    polygons = []
    try:
        for feature in doc.get("features", []):
            g = feature.get("geometry") or {}
            if g.get("type") not in ("Polygon", "MultiPolygon"):
                continue  # points and lines carry no area
            for rings in [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]:
                rings = [np.asarray(r, np.float64)[:, :2] for r in rings]
                polygons.append([to_pixel(r if to_crs is None else to_crs(r)) for r in rings])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed GeoJSON features ({type(e).__name__}: {e})") from e
    return polygons
