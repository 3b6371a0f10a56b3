"""The prepared-split format (nanosar/data.py): round trips, atomic writes, clear errors, tiling helpers,
and the faults of real runs: killed writers, full disks, damaged meta.json, labels that do not fit the
classes; and the raster files it is made from (nanosar/geotiff.py): damaged or unusual TIFFs, PNGs decoded
without a codec (palette indices kept), JPEGs through an optional decoder."""

import builtins
import errno
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tifffile

from nanosar import data, geotiff
from nanosar.data import CLASSES_7, IGNORE, Split, SplitWriter, cut_tiles, remap_labels, tile_positions
from nanosar.geotiff import TiffWindows, read_image, read_png, read_tiff, shift_geotags

META = dict(unit="db", channels=["VV", "VH"], class_names=list(CLASSES_7), sensor="test")


def write(path, n=4, meta=META, rng=np.random.default_rng(0)):
    images = (rng.standard_normal((n, 2, 16, 16)) * 4 - 12).astype(np.float32)
    labels = rng.integers(0, 7, (n, 16, 16)).astype(np.uint8)
    labels[:, 0, 0] = IGNORE
    with SplitWriter(path, meta) as w:
        for i in range(n):
            w.add(images[i], labels[i], source=f"scene{i}.tif", row=i, col=0)
    return images, labels


def test_round_trip_is_exact_in_float16_and_zero_copy(tmp_path):
    images, labels = write(str(tmp_path / "s"))
    split = Split(str(tmp_path / "s"), verify=True)
    assert len(split) == 4 and split.unit == "db" and split.channels == ["VV", "VH"]
    assert isinstance(split.images, np.memmap) and split.images.dtype == np.float16
    np.testing.assert_array_equal(split.images, images.astype(np.float16))
    np.testing.assert_array_equal(split.labels, labels)
    assert split.meta["sensor"] == "test" and split.meta["tile_shape"] == [2, 16, 16]
    assert np.abs(split.images.astype(np.float32) - images).max() < 0.01   # dB in float16: < 0.01 dB
    lines = (tmp_path / "s" / "tiles.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"source": "scene2.tif"' in lines[2]


def test_rewriting_replaces_the_split_atomically(tmp_path):
    write(str(tmp_path / "s"), n=4)
    write(str(tmp_path / "s"), n=2)
    assert len(Split(str(tmp_path / "s"), verify=True)) == 2
    assert os.listdir(tmp_path) == ["s"]


@pytest.mark.parametrize("image, label, message", [
    (np.full((2, 16, 16), np.nan), np.zeros((16, 16), np.uint8), r"bad\.tif \(tile 1\): 512 NaN or infinite"),
    (np.zeros((1, 16, 16)), np.zeros((16, 16), np.uint8), r"bad\.tif.*\(C=2, H, W\).*\['VV', 'VH'\]"),
    (np.zeros((2, 16, 16)), np.zeros((16, 15), np.uint8), r"bad\.tif.*label size \(16, 15\) does not match"),
    (np.zeros((2, 16, 16)), np.full((16, 16), 9, np.uint8), r"bad\.tif.*unknown label values \[9\]"),
    (np.full((2, 16, 16), 1e6), np.zeros((16, 16), np.uint8), r"bad\.tif.*overflow float16"),
])
def test_bad_tiles_raise_naming_the_source_and_leave_nothing(tmp_path, image, label, message):
    with pytest.raises(ValueError, match=message):
        with SplitWriter(str(tmp_path / "s"), META) as w:
            w.add(np.zeros((2, 16, 16)), np.zeros((16, 16), np.uint8), source="good.tif")
            w.add(image, label, source="bad.tif")
    assert os.listdir(tmp_path) == []


def test_missing_truncated_and_corrupt_splits_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Split(str(tmp_path / "nope"))
    write(str(tmp_path / "s"))
    labels = tmp_path / "s" / "labels.npy"
    data = labels.read_bytes()
    labels.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Split(str(tmp_path / "s"))
    labels.write_bytes(data[:-1] + bytes([(data[-1] + 1) % 256]))
    with pytest.raises(ValueError, match="labels.npy checksum mismatch"):
        Split(str(tmp_path / "s"), verify=True)
    os.remove(tmp_path / "s" / "meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        Split(str(tmp_path / "s"))


def test_meta_must_declare_unit_channels_and_classes(tmp_path):
    with pytest.raises(ValueError, match="unit"):
        SplitWriter(str(tmp_path / "s"), dict(META, unit="sigma0"))
    with pytest.raises(ValueError, match="lacks 'channels'"):
        SplitWriter(str(tmp_path / "s"), dict(unit="db", class_names=["a"]))


def test_dn_splits_record_their_scale(tmp_path):
    write(str(tmp_path / "dn"), meta=dict(META, unit="dn"))
    assert Split(str(tmp_path / "dn")).meta["dn_scale"] is None           # uncalibrated, scale unknown
    write(str(tmp_path / "sim"), meta=dict(META, unit="dn", dn_scale=316.0))
    assert Split(str(tmp_path / "sim")).meta["dn_scale"] == 316.0
    write(str(tmp_path / "db"))
    assert "dn_scale" not in Split(str(tmp_path / "db")).meta                # calibrated units need none
    with pytest.raises(ValueError, match=r"dn_scale for .*bad must be a positive number or None"):
        SplitWriter(str(tmp_path / "bad"), dict(META, unit="dn", dn_scale=-1))


def test_tiling_arithmetic_and_padding():
    assert tile_positions(100, 32, 8) == [0, 24, 48, 68]
    assert tile_positions(32, 32, 8) == [0] and tile_positions(20, 32, 8) == [0]
    image, label = np.arange(2 * 20 * 40).reshape(2, 20, 40).astype(np.float32), np.ones((20, 40), np.uint8)
    tiles = list(cut_tiles(image, label, 32, 8))
    assert [(r, c) for r, c, _, _ in tiles] == [(0, 0), (0, 8)]
    _, _, img, lbl = tiles[1]
    assert img.shape == (2, 32, 32) and (lbl[20:] == IGNORE).all() and (lbl[:20] == 1).all()
    np.testing.assert_array_equal(img[:, :20], image[:, :, 8:40])


def test_shift_geotags_golden():
    geo = {"ModelPixelScale": [10.0, 10.0, 0.0], "ModelTiepoint": [0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0]}
    tile = shift_geotags(geo, row=64, col=32)
    assert tile["ModelTiepoint"] == [0.0, 0.0, 0.0, 500320.0, 3999360.0, 0.0]
    affine = {"ModelTransformation": [2.0, 0.0, 0.0, 100.0, 0.0, -2.0, 0.0, 50.0] + [0.0] * 8}
    assert shift_geotags(affine, 10, 5)["ModelTransformation"][3] == 110.0
    assert shift_geotags(affine, 10, 5)["ModelTransformation"][7] == 30.0


def test_remap_labels_golden_and_unknown_value():
    mapping = {0: IGNORE, 10: 6, 20: 1, 40: 3}
    out = remap_labels(np.array([[0, 10], [20, 40]]), mapping, "x.tif")
    np.testing.assert_array_equal(out, [[255, 6], [1, 3]])
    with pytest.raises(ValueError, match=r"x\.tif: unknown label values \[30\]"):
        remap_labels(np.array([[30, 10]]), mapping, "x.tif")


# -----------------------------------------------------------------------------
# Killed writers and full disks


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_nearest_colour_golden():
    rgb = np.array([[[0, 40, 41, 230, 128]], [[255, 215, 214, 250, 128]], [[255, 255, 255, 255, 128]]], np.uint8)
    values, per_colour, unmatched = data.nearest_colours(rgb, {(0, 255, 255): 0, (255, 255, 255): IGNORE}, 40)
    assert values.tolist() == [[0, 0, IGNORE, IGNORE, IGNORE]]  # largest channel difference to cyan 0, 40, 41
    assert per_colour.tolist() == [2, 1] and unmatched == 2     # 41 and grey match nothing; 230,250,255 is white


def test_a_writer_removes_the_debris_of_dead_writers_of_its_split_only(tmp_path):
    dead, live = dead_pid(), os.getppid()
    for name in (f"s.tmp-{dead}", f"s.old-{dead}", f"s.tmp-{live}", f"t.tmp-{dead}"):
        os.makedirs(tmp_path / name)
    write(str(tmp_path / "s"))
    # a live process's temporary stays, and so does the debris of other splits (their writers clean it)
    assert sorted(os.listdir(tmp_path)) == sorted(["s", f"s.tmp-{live}", f"t.tmp-{dead}"])
    assert len(Split(str(tmp_path / "s"), verify=True)) == 4


class FullDisk:
    """Stands in for open() in nanosar.data: files opened for writing accept `budget` bytes in all and then
    fail like a full disk (ENOSPC); a file named in `fail_on_close` fails when close() flushes it."""

    def __init__(self, budget=float("inf"), fail_on_close=()):
        self.budget, self.fail_on_close = budget, fail_on_close

    def __call__(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return f if "r" in mode else LimitedFile(f, self, os.path.basename(path) in self.fail_on_close)


class LimitedFile:
    def __init__(self, f, disk, fail_on_close):
        self.f, self.disk, self.unflushed = f, disk, fail_on_close

    def write(self, data):
        if len(data) > self.disk.budget:
            self.unflushed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.budget -= len(data)
        return self.f.write(data)

    def seek(self, *args):
        return self.f.seek(*args)

    def close(self):
        self.f.close()
        if self.unflushed:                                   # like a BufferedWriter: closed, then raises
            self.unflushed = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.parametrize("disk", [FullDisk(budget=3000), FullDisk(fail_on_close=("labels.npy",)),
                                  FullDisk(fail_on_close=("meta.json",))],
                         ids=["while adding", "flushing at close", "writing meta.json"])
def test_a_full_disk_is_one_clear_error_and_leaves_the_previous_split(tmp_path, monkeypatch, disk):
    _, old_labels = write(str(tmp_path / "s"), n=2)
    monkeypatch.setattr(data, "open", disk, raising=False)
    with pytest.raises(OSError, match=re.escape(str(tmp_path / "s")) + ": no space left on the device") as e:
        write(str(tmp_path / "s"), n=4)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["s"]                                   # no temporary left behind
    old = Split(str(tmp_path / "s"), verify=True)
    assert len(old) == 2 and np.array_equal(old.labels, old_labels)


def test_abort_on_a_full_disk_removes_the_temporary_without_raising(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "open", FullDisk(fail_on_close=("images.npy", "labels.npy", "tiles.jsonl")),
                        raising=False)
    w = SplitWriter(str(tmp_path / "s"), META)
    w.add(np.zeros((2, 16, 16)), np.zeros((16, 16), np.uint8))
    w.abort()
    w.abort()                                                              # twice is harmless
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# Damaged meta.json and labels that do not fit the classes


def edit_meta(path, change):
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    change(meta)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def test_meta_json_that_is_not_json_or_lacks_keys_is_a_clear_error(tmp_path):
    path = str(tmp_path / "s")
    write(path)
    meta_path = os.path.join(path, "meta.json")
    text = open(meta_path).read()
    open(meta_path, "w").write(text[: len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(meta_path) + r" is not valid JSON \(.*\): re-run prepare.py"):
        Split(path)
    open(meta_path, "w").write(text)
    edit_meta(path, lambda m: m.pop("unit"))
    with pytest.raises(ValueError, match=re.escape(meta_path) + " lacks 'unit': re-run prepare.py"):
        Split(path)
    open(meta_path, "w").write("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        Split(path)


def test_meta_records_the_label_values_and_pixels_per_class(tmp_path):
    _, labels = write(str(tmp_path / "s"))
    meta = Split(str(tmp_path / "s")).meta
    assert meta["label_values"] == np.unique(labels).tolist()
    assert meta["class_pixels"] == np.bincount(labels.ravel(), minlength=256)[:7].tolist()


def test_label_values_outside_the_classes_fail_when_the_split_is_opened(tmp_path):
    path = str(tmp_path / "s")
    write(path)
    # meta.json's classes cut to 3 while the labels hold ids up to 6: caught from meta.json alone
    edit_meta(path, lambda m: m.update(class_names=["a", "b", "c"]))
    with pytest.raises(ValueError, match=re.escape(path) + r": label values \[3, 4, 5, 6\] are neither class ids"):
        Split(path)
    # an older split (no label_values in meta.json) whose labels.npy holds a 9: found by scanning the labels
    write(path)
    edit_meta(path, lambda m: m.pop("label_values"))
    labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r+")
    labels[3, 5, 5] = 9
    labels.flush()
    del labels
    with pytest.raises(ValueError, match=re.escape(path) + r": label values \[9\] .* 7 classes"):
        Split(path)


def test_a_label_edited_after_meta_json_fails_when_its_tile_is_read(tmp_path):
    """meta.json lists the label values, so opening the split cannot see a labels.npy changed later (a tile
    edited by hand): reading that tile is the one-line error, for train.py and eval.py alike."""
    path = str(tmp_path / "s")
    _, labels = write(path)
    edited = np.load(os.path.join(path, "labels.npy"), mmap_mode="r+")
    edited[2, 7, 3] = 9
    edited.flush()
    del edited
    split = Split(path)                                                  # meta.json still says 0..6 and 255
    _, ok = data.load_batch(split, [3, 1, 0])                            # 255 (ignore) is fine
    np.testing.assert_array_equal(ok.numpy(), labels[[3, 1, 0]])
    with pytest.raises(ValueError, match=re.escape(path) + r": tile 2 has label value 9, .* 7 classes .* re-run "
                                         r"prepare\.py") as error:
        data.load_batch(split, [0, 3, 2])
    assert "\n" not in str(error.value)


# -----------------------------------------------------------------------------
# TIFFs: the file's own band layout, and damaged files


@pytest.mark.parametrize("shape, planar, bands_first", [
    ((3, 5, 2), "contig", lambda a: np.moveaxis(a, -1, 0)),    # 3 x 5 pixels, 2 bands interleaved
    ((2, 5, 3), "contig", lambda a: np.moveaxis(a, -1, 0)),    # 2 x 5 pixels, 3 bands: more bands than rows
    ((2, 3, 5), "separate", lambda a: a),                      # 2 band planes of 3 x 5
    ((3, 5), None, lambda a: a[None]),                         # 1 band
])
def test_read_tiff_takes_the_band_layout_from_the_file(tmp_path, shape, planar, bands_first):
    array = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    path = str(tmp_path / "x.tif")
    tifffile.imwrite(path, array, photometric="minisblack", planarconfig=planar)
    image, _ = read_tiff(path)
    np.testing.assert_array_equal(image, bands_first(array))
    scene = TiffWindows(path)
    np.testing.assert_array_equal(scene.read(0, scene.height, 0, scene.width), bands_first(array))
    scene.close()


def patch_tags(path, **values):
    """Overwrite the values of LONG/SHORT tags (e.g. ImageWidth=60000) of a TIFF's first page in place."""
    with tifffile.TiffFile(path) as tif:
        tags = {name: (tif.pages[0].tags[name].offset, int(tif.pages[0].tags[name].dtype)) for name in values}
    raw = bytearray(open(path, "rb").read())
    for name, (offset, dtype) in tags.items():
        struct.pack_into({3: "<H", 4: "<I"}[dtype], raw, offset + 8, values[name])   # a classic IFD entry's value
    open(path, "wb").write(bytes(raw))


def damaged_tiff(tmp_path, kind):
    """A small TIFF damaged in one way: truncated (uncompressed strip / zlib tiles), a zlib tile with bad
    bytes, or a header declaring 60000 x 60000 pixels over a few hundred bytes (uncompressed or zlib)."""
    path = str(tmp_path / f"{kind}.tif")
    image = (np.arange(64 * 80).reshape(64, 80) % 251).astype(np.uint8)
    if kind == "truncated":
        tifffile.imwrite(path, image)
    elif kind in ("truncated_zlib", "bad_zlib_tile"):
        tifffile.imwrite(path, image, tile=(16, 16), compression="zlib")
    else:                                                       # one strip, to be declared 60000 x 60000
        tifffile.imwrite(path, np.zeros((16, 16), np.float32), compression="zlib" if kind == "huge_zlib" else None)
    raw = open(path, "rb").read()
    if kind.startswith("truncated"):
        open(path, "wb").write(raw[: len(raw) * 2 // 3])
    elif kind == "bad_zlib_tile":
        with tifffile.TiffFile(path) as tif:
            offset = tif.pages[0].dataoffsets[3]
        open(path, "wb").write(raw[:offset] + b"\xff" * 8 + raw[offset + 8:])
    else:
        patch_tags(path, ImageWidth=60000, ImageLength=60000, RowsPerStrip=60000)
    return path


@pytest.mark.parametrize("kind, detail", [
    ("truncated", r"segment 0 ends at byte \d+, beyond the file's \d+ bytes"),
    ("truncated_zlib", r"segment \d+ ends at byte \d+, beyond the file's \d+ bytes"),
    ("bad_zlib_tile", r"zlib.error"),
    ("huge", r"60000 x 60000 pixels declared; segment 0 holds 1024 bytes"),
    ("huge_zlib", r"60000 x 60000 pixels declared; segment 0 holds \d+ compressed bytes"),
])
def test_damaged_tiffs_are_clear_errors_naming_the_file(tmp_path, kind, detail):
    path = damaged_tiff(tmp_path, kind)
    assert os.path.getsize(path) < (1500 if kind.startswith("huge") else 6000)   # 60000 x 60000 over ~1 kB
    with pytest.raises(ValueError, match=re.escape(path) + r": truncated or corrupt TIFF \(.*" + detail):
        read_tiff(path)
    where = r"segment 3: " if kind == "bad_zlib_tile" else r".*"           # windows decode segment by segment
    with pytest.raises(ValueError, match=re.escape(path) + r": truncated or corrupt TIFF \(" + where + detail):
        TiffWindows(path).read(0, 64, 0, 80)


# -----------------------------------------------------------------------------
# PNG decoded with zlib alone (palette indices kept), JPEG through an optional decoder


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def png_file(path, array, color, depth=8, palette=None, filters=(0,), interlace=0):
    """Encode (H, W) or (H, W, C) samples as a PNG, row y filtered with filters[y % len(filters)] (the
    encoder side of the five PNG filters, written out byte by byte as the specification states them)."""
    array = np.asarray(array)
    H, W = array.shape[:2]
    raw_rows = []
    for row in array.reshape(H, W, -1):
        if depth < 8:
            bits = ((row[:, 0, None] >> np.arange(depth - 1, -1, -1)) & 1).astype(np.uint8).ravel()
            raw_rows.append(np.packbits(bits).tobytes())
        else:
            raw_rows.append(row.astype(">u2" if depth == 16 else np.uint8).tobytes())
    bpp = max(1, array.reshape(H, W, -1).shape[-1] * depth // 8)
    out, prev = b"", bytes(len(raw_rows[0]))
    for y, raw in enumerate(raw_rows):
        kind = filters[y % len(filters)]
        left = lambda i: raw[i - bpp] if i >= bpp else 0          # noqa: E731
        upleft = lambda i: prev[i - bpp] if i >= bpp else 0       # noqa: E731
        pred = [0 if kind == 0 else left(i) if kind == 1 else prev[i] if kind == 2 else
                (left(i) + prev[i]) // 2 if kind == 3 else paeth(left(i), prev[i], upleft(i)) for i in range(len(raw))]
        out += bytes([kind]) + bytes((r - p) & 255 for r, p in zip(raw, pred))
        prev = raw

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, depth, color, 0, 0, interlace))
    if palette is not None:
        body += chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel()))
    with open(path, "wb") as f:
        f.write(geotiff.PNG_SIGNATURE + body + chunk(b"IDAT", zlib.compress(out)) + chunk(b"IEND", b""))
    return str(path)


RNG = np.random.default_rng(3)


@pytest.mark.parametrize("color, depth, shape", [
    (3, 8, (9, 7)),          # palette, 8 bits: the label PNGs (DDHR-SK)
    (3, 4, (5, 9)),          # palette, 4 bits: two pixels a byte, an odd width
    (3, 1, (4, 11)),         # palette, 1 bit: a binary mask
    (0, 8, (6, 5)),          # grey
    (0, 16, (4, 6)),         # grey, 16 bits
    (2, 8, (5, 6, 3)),       # RGB
    (6, 8, (4, 5, 4)),       # RGBA
])
def test_png_decoder_all_filters(tmp_path, color, depth, shape):
    array = RNG.integers(0, 1 << depth, shape).astype(np.uint16 if depth == 16 else np.uint8)
    palette = [(i, 255 - i, 7) for i in range(1 << depth)] if color == 3 else None
    path = png_file(tmp_path / "x.png", array, color, depth, palette, filters=(0, 1, 2, 3, 4))
    decoded = read_png(path)
    expected = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    assert decoded.dtype == (np.uint16 if depth == 16 else np.uint8)
    np.testing.assert_array_equal(decoded, expected)            # palette images: the indices, not colours
    try:
        from PIL import Image                                    # the same file through Pillow, when installed
    except ImportError:
        return
    np.testing.assert_array_equal(np.asarray(Image.open(path)).reshape(shape), array)


def test_png_damage_and_unsupported_files_are_clear_errors(tmp_path):
    path = png_file(tmp_path / "x.png", np.zeros((4, 4), np.uint8), 0)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-30])                            # cut inside IDAT
    with pytest.raises(ValueError, match=re.escape(path) + r": truncated or corrupt PNG"):
        read_png(path)
    interlaced = png_file(tmp_path / "i.png", np.zeros((4, 4), np.uint8), 0, interlace=1)
    with pytest.raises(ValueError, match=r"i\.png: PNG colour type 0, 8 bits, interlaced is not supported"):
        read_png(interlaced)
    open(tmp_path / "n.png", "wb").write(b"GIF89a")
    with pytest.raises(ValueError, match=r"n\.png: not a PNG file"):
        read_png(str(tmp_path / "n.png"))
    with pytest.raises(ValueError, match=r"g\.png: expected 3 band\(s\), found 1"):
        read_image(png_file(tmp_path / "g.png", np.zeros((4, 4), np.uint8), 0), bands=3)
    with pytest.raises(ValueError, match=r"x\.bmp: not a TIFF, PNG or JPEG file"):
        read_image(str(tmp_path / "x.bmp"))
