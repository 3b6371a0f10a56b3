"""nanosar/quicklook.py: the PNG writer, the 5x7 font, the class-map quicklook and the routing mosaic."""

import struct
import zlib

import numpy as np

from nanosar import quicklook as Q
from nanosar.geotiff import read_png, write_tiled_geotiff


def png_chunks(data):
    """[(type, body, stored CRC)] of a PNG's bytes, parsed independently of the writer."""
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        chunks.append((kind, body, struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]))
        pos += 12 + length
    return chunks


def test_png_round_trips_and_every_chunk_has_its_crc(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype(np.uint8)
    path = str(tmp_path / "x.png")
    Q.write_png(path, rgb)
    np.testing.assert_array_equal(np.moveaxis(read_png(path), 0, -1), rgb)
    data = open(path, "rb").read()
    chunks = png_chunks(data)
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and [c[0] for c in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert all(zlib.crc32(kind + body) == crc for kind, body, crc in chunks)
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (53, 37, 8, 2, 0, 0, 0)     # 8-bit RGB, not interlaced
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_font_draws_every_character_distinctly():
    assert set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:()/+=%? ") <= set(Q.FONT)
    glyphs = {ch: Q.text_mask(ch, 1).tobytes() for ch in Q.FONT}
    assert len(set(glyphs.values())) == len(glyphs)                    # no two characters look alike
    mask = Q.text_mask("road 2", scale=2)
    assert mask.shape == (14, 6 * 2 * 6) and not mask[:, 10:12].any()  # a blank column after each character
    np.testing.assert_array_equal(Q.text_mask("Ab"), Q.text_mask("AB"))
    i = Q.text_mask("I", 1)[:, :5]
    assert i[:, 2].all() and i[0].sum() == 3 and i[3].sum() == 1       # a serif I: bars on top and bottom


def test_class_quicklook_is_the_palette_of_every_kth_pixel_within_2048(tmp_path):
    """A 5000 x 300 class map (tiles of 256) -> every 3rd pixel (ceil(5000 / 2048) = 3), colour by class."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 7, (5000, 300)).astype(np.uint8)
    classes[100:400, :50] = 255
    tif = str(tmp_path / "mask.tif")
    padded = np.pad(classes, ((0, -5000 % 256), (0, -300 % 256)))       # whole tiles of 256
    tiles = (padded[y:y + 256, x:x + 256] for y in range(0, 5000, 256) for x in range(0, 300, 256))
    write_tiled_geotiff(tif, tiles, classes.shape, 256, {}, 255)
    names = ["other", "building", "road", "water", "bare_land", "forest", "cropland"]
    look = Q.class_quicklook(tif, names)
    assert look.shape[0] > 1667 and max(look.shape[:2]) <= 2048
    np.testing.assert_array_equal(look[:1667, :100], Q.palette()[classes[::3, ::3]])
    assert (look[34:133, :17] == 0).all()                              # rows 102..396, columns 0..48: no-data
    legend = look[1667:]
    for colour in Q.palette()[:7]:                                     # a swatch of every class
        assert (legend == colour).all(-1).sum() >= 14 * 14
    tall = str(tmp_path / "tall.tif")
    write_tiled_geotiff(tall, (np.full((256, 256), 3, np.uint8) for _ in range(8)), (2048, 40), 256, {}, 255)
    tall_look = Q.class_quicklook(tall, names)                          # 2048 rows and a legend: every 2nd
    assert tall_look.shape[0] <= 2048 and (tall_look[:1024, :20] == Q.palette()[3]).all()
    png = str(tmp_path / "mask.png")
    Q.write_png(png, look)
    np.testing.assert_array_equal(np.moveaxis(read_png(png), 0, -1), look)


def test_routing_mosaic_puts_each_blocks_map_side_by_side():
    maps = np.random.default_rng(0).integers(0, 6, (3, 13, 12)).astype(np.uint8)
    maps[:, 0, 0] = 255
    mosaic = Q.routing_mosaic(maps, [1, 3, 5], 6)
    zoom = 256 // 13                                                  # small maps are enlarged
    colours = Q.palette()
    title, gap = 14 + 16, 8
    for b in range(3):
        x = gap + b * (12 * zoom + gap)
        tile = mosaic[title:title + 13 * zoom, x:x + 12 * zoom]
        np.testing.assert_array_equal(tile, colours[maps[b].repeat(zoom, 0).repeat(zoom, 1)])
    assert (mosaic[gap:gap + 14] == 0).any() and max(mosaic.shape[:2]) <= 2048
    large = Q.routing_mosaic(np.zeros((24, 400, 500), np.uint8), list(range(24)), 6)
    assert max(large.shape[:2]) <= 2048                              # subsampled, legend included
