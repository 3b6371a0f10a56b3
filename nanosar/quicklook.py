"""
Quicklooks of eval.py --predict's outputs as PNG, with numpy and zlib only: the class map in a fixed
palette over a legend strip (a swatch and the name of every class, in a built-in 5x7 bitmap font), and
the routing maps of the MoE blocks side by side.

    write_png("mask.png", class_quicklook("mask.tif", ["other", "building", ...]))   # (H, W, 3) uint8
    write_png("mask.routing.png", routing_mosaic(maps, blocks, n_experts))

The class map is read from its GeoTIFF segment by segment and downsampled by taking every k-th pixel
(nearest, so every pixel shown is a real prediction), so that map and legend fit 2048 x 2048 pixels:
memory is one segment plus the quicklook. No-data (255) is black.
"""

import struct
import zlib

import numpy as np

from nanosar.files import write_atomic
from nanosar.geotiff import PNG_SIGNATURE, TiffWindows

MAX_SIDE = 2048                    # pixels on the long side of a quicklook
NODATA = 255                       # class / expert id of no-data, drawn black
# colours by class id (tab10-like, then more); ids past the list get colours drawn from a seeded generator
PALETTE = [(128, 128, 128), (220, 40, 40), (255, 200, 0), (30, 100, 230), (200, 150, 90), (20, 110, 40),
           (150, 220, 90), (150, 80, 200), (0, 200, 200), (230, 100, 190), (140, 80, 30), (255, 150, 150),
           (120, 120, 0), (0, 0, 128), (0, 128, 128), (255, 128, 0)]

# -----------------------------------------------------------------------------
# PNG writing


def png_chunk(kind, body):
    """One PNG chunk: length, type, body, CRC-32 of type and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(rgb):
    """(H, W, 3) uint8 -> the bytes of an 8-bit RGB PNG, every row with filter 0 (none), one IDAT chunk."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    H, W, _ = rgb.shape
    rows = np.concatenate([np.zeros((H, 1), np.uint8), rgb.reshape(H, W * 3)], axis=1)   # filter byte first
    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)         # 8 bits, colour type 2 (RGB), no interlace
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + png_chunk(b"IEND", b""))


def write_png(path, rgb):
    """Write (H, W, 3) uint8 as an RGB PNG under a temporary name, then rename it into place."""
    data = png_bytes(rgb)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)


# -----------------------------------------------------------------------------
# colours and text


def palette():
    """(256, 3) uint8 colour of every id: PALETTE, seeded colours after it, black for NODATA."""
    colours = np.array([np.random.default_rng(i).integers(40, 256, 3) for i in range(256)], np.uint8)
    colours[:len(PALETTE)] = PALETTE
    colours[NODATA] = 0
    return colours


# 5x7 glyphs, upper case: a character, then its 7 rows top down, each a base-32 digit whose 5 bits are the
# row's pixels (16 = leftmost). Lower case is drawn as upper case; other characters as '?'.
FONT = dict((g[0], g[1:]) for g in """
AEHHVHHH BUHHUHHU CEHGGGHE DUHHHHHU EVGGUGGV FVGGUGGG GEHGNHHF HHHHVHHH IE44444E J72222IC KHIKOKIH LGGGGGGV
MHRLLHHH NHPLJHHH OEHHHHHE PUHHUGGG QEHHHLID RUHHUKIH SFGGE11U TV444444 UHHHHHHE VHHHHHA4 WHHHLLLA XHHA4AHH
YHHA4444 ZV1248GV 0EHJLPHE 14C4444E 2EH1248V 3U11E11U 426AIV22 5VGU11HE 668GUHHE 7V124888 8EHHEHHE 9EHHF12C
-000E000 _000000V .00000CC :0CC0CC0 (2488842 )8422248 /11248GG +044V440 =00V0V00 %PP248JJ ?EH12404
""".split())
FONT[" "] = "0000000"


def text_mask(text, scale=2):
    """(7 scale, 6 scale len(text)) bool: the text in the 5x7 font, a blank column after each character."""
    if not text:
        return np.zeros((7 * scale, 0), bool)
    glyphs = []
    for ch in text.upper():
        rows = [int(digit, 32) for digit in FONT.get(ch, FONT["?"])]
        glyphs.append(((2 * np.array(rows))[:, None] >> np.arange(5, -1, -1)) & 1)   # (7, 6): 5 pixels, a blank
    return np.concatenate(glyphs, axis=1).astype(bool).repeat(scale, 0).repeat(scale, 1)


def legend_strip(entries, width, scale=2):
    """(h, W, 3) uint8 white strip of legend entries (rgb, label): a swatch and its label each, flowing
    into rows no wider than `width` (W = width, or the widest entry if wider)."""
    size, pad = 7 * scale, 3 * scale                              # swatch side = text height
    pieces = []
    for colour, label in entries:
        text = text_mask(label, scale)
        piece = np.full((size + 2, size + pad + text.shape[1], 3), 255, np.uint8)
        piece[:size + 2, :size + 2] = 0                           # a black frame, visible around white or black
        piece[1:size + 1, 1:size + 1] = colour
        piece[1:size + 1, size + pad:][text] = 0
        pieces.append(piece)
    W = max([width] + [p.shape[1] + 2 * pad for p in pieces])
    rows, row, used = [], [], pad
    for piece in pieces:
        if row and used + piece.shape[1] > W - pad:
            rows.append(row)
            row, used = [], pad
        row.append((used, piece))
        used += piece.shape[1] + 3 * pad
    rows.append(row)
    strip = np.full((pad + len(rows) * (size + 2 + pad), W, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = pad + r * (size + 2 + pad)
        for x, piece in row:
            strip[y:y + piece.shape[0], x:x + piece.shape[1]] = piece
    return strip


def with_legend(image, entries):
    """image (h, w, 3) on top of its legend strip, on a white canvas as wide as the wider of the two; the
    image stays at the top left."""
    strip = legend_strip(entries, image.shape[1])
    canvas = np.full((image.shape[0] + strip.shape[0], strip.shape[1], 3), 255, np.uint8)
    canvas[:image.shape[0], :image.shape[1]] = image
    canvas[image.shape[0]:] = strip
    return canvas


# -----------------------------------------------------------------------------
# the quicklooks


def subsample_step(height, width, max_side=MAX_SIDE):
    """The k of taking every k-th pixel so that the long side is at most max_side."""
    return max(1, -(-max(height, width) // max_side))


def every_kth_pixel(tif, k):
    """(ceil(H / k), ceil(W / k)) uint8: pixels (i k, j k) of the one-band TiffWindows `tif`, read one strip or
    tile at a time."""
    H, W, (rows, cols) = tif.height, tif.width, tif.chunk
    out = np.empty((-(-H // k), -(-W // k)), np.uint8)
    for y0 in range(0, H, rows):
        for x0 in range(0, W, cols):
            part = tif.read(y0, y0 + rows, x0, x0 + cols)[0]
            dy, dx = -y0 % k, -x0 % k                                 # the first kept row and column in it
            kept = part[dy::k, dx::k]
            out[(y0 + dy) // k:(y0 + dy) // k + kept.shape[0], (x0 + dx) // k:(x0 + dx) // k + kept.shape[1]] = kept
    return out


def class_quicklook(path, class_names, max_side=MAX_SIDE):
    """(h, w, 3) uint8 quicklook of the class GeoTIFF `path`: every k-th pixel in palette(), over a legend of
    every class ("id name") and no-data, k the smallest step for which both fit max_side x max_side."""
    colours = palette()
    entries = [(colours[i], f"{i} {name}") for i, name in enumerate(class_names)] + [(colours[NODATA], "no data")]
    tif = TiffWindows(path, cache_segments=1)
    try:
        H, W = tif.height, tif.width
        k = subsample_step(H, W, max_side)
        while -(-H // k) + legend_strip(entries, -(-W // k)).shape[0] > max_side and k < max(H, W):
            k += 1
        return with_legend(colours[every_kth_pixel(tif, k)], entries)
    finally:
        tif.close()


def routing_mosaic(maps, blocks, n_experts, max_side=MAX_SIDE, gap=8):
    """(h, w, 3) uint8: the routing maps (L, h, w) of MoE blocks `blocks` (expert ids, 255 no-data) side by
    side in palette(), each titled "block i", over a legend of the experts. Small maps are enlarged (an
    integer factor, nearest), large ones subsampled (every k-th patch) so that all fits max_side x max_side."""
    L, h, w = maps.shape
    colours = palette()
    entries = [(colours[e], f"expert {e}") for e in range(n_experts)] + [(colours[NODATA], "no data")]
    zoom, title = max(1, 256 // max(h, w)), 7 * 2 + 2 * gap

    def size(k):
        """(height, width) of the mosaic and its legend with every k-th (enlarged) patch."""
        width = L * (-(-w * zoom // k) + gap) + gap
        return title + -(-h * zoom // k) + legend_strip(entries, width).shape[0], width

    k = 1
    while max(size(k)) > max_side and k < max(h, w) * zoom:
        k += 1
    tiles = maps.repeat(zoom, 1).repeat(zoom, 2)[:, ::k, ::k]
    mosaic = np.full((title + tiles.shape[1], L * (tiles.shape[2] + gap) + gap, 3), 255, np.uint8)
    for i, (block, tile) in enumerate(zip(blocks, tiles)):
        x = gap + i * (tile.shape[1] + gap)
        text = text_mask(f"block {block}")[:, :tile.shape[1]]
        mosaic[gap:gap + text.shape[0], x:x + text.shape[1]][text] = 0
        mosaic[title:, x:x + tile.shape[1]] = colours[tile]
    return with_legend(mosaic, entries)
