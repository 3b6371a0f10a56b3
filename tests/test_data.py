"""The prepared-split format (nanosar/data.py): round trips, atomic writes, clear errors, tiling helpers."""

import os

import numpy as np
import pytest

from nanosar.data import (
    CLASSES_7,
    IGNORE,
    Split,
    SplitWriter,
    cut_tiles,
    remap_labels,
    shift_geotags,
    tile_positions,
)

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
