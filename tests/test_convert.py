"""Dataset converters (nanosar/convert.py) on tiny fake copies of each published layout, written here: the public
names, dtypes, band counts and palettes, small sizes. Tiles of T=32 pixels with overlap OV=8 (stride 24): an axis
of 40 px gives starts [0, 8], 48 -> [0, 16], 70 -> [0, 24, 38], 90 -> [0, 24, 48, 58] (the last tile is aligned with
the edge); a scene below 32 px is padded."""

import glob
import hashlib
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

from nanosar import convert, geotiff
from nanosar.data import CLASSES_7, IGNORE, Split

T, OV = 32, 8  # tile size and overlap
SX, SY, X0, Y0 = 0.5, 0.5, 595000.0, 5753000.0  # a UTM 31N grid of 0.5 m pixels (Rotterdam)
WHU_TRAIN, WHU_TRAIN2, WHU_TEST = "NH49E004021", "NH49E005014", "NH49E001014"  # sheets of the official division


def geokeys(epsg):
    """A GeoKeyDirectory: projected (UTM 326xx) or geographic (4326) CRS, PixelIsArea."""
    projected = epsg != 4326
    return [1, 1, 0, 3, 1024, 0, 1, 1 if projected else 2, 1025, 0, 1, 1, 3072 if projected else 2048, 0, 1, epsg]


def tif(path, array, geo=False, epsg=32631, tie=(X0, Y0), scale=(SX, SY), planar="separate"):
    """Write (H, W) or (C, H, W) as one TIFF page (bands planar, or interleaved with planar="contig"),
    optionally georeferenced."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tags = []
    if geo:
        keys = geokeys(epsg)
        tags = [(33550, "d", 3, (*scale, 0.0), True), (33922, "d", 6, (0, 0, 0, *tie, 0), True),
                (34735, "H", len(keys), keys, True)]
    array = np.asarray(array)
    kw = {}
    if array.ndim == 3:
        kw = dict(photometric="minisblack", planarconfig=planar)
        if planar == "contig":
            array = np.moveaxis(array, 0, -1)                       # (H, W, C) on disk
            kw["photometric"] = "rgb" if array.shape[-1] == 3 else "minisblack"
    tifffile.imwrite(path, array, extratags=tags, **kw)
    return str(path)


def palette_png(path, indices, palette):
    """Write (H, W) uint8 indices as an 8-bit palette PNG (colour type 3, PLTE of (r, g, b) entries)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    H, W = indices.shape
    rows = b"".join(b"\0" + row.astype(np.uint8).tobytes() for row in indices)     # filter 0 per row
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel())) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def tiles(split_path):
    with open(os.path.join(split_path, "tiles.jsonl")) as f:
        return [json.loads(line) for line in f]


def find(records, source_end, row, col):
    """Index of the tile cut at (row, col) from the scene whose path ends with source_end."""
    return next(i for i, r in enumerate(records)
                if r["source"].endswith(source_end) and (r["row"], r["col"]) == (row, col))


def check_meta(split, dataset, unit, channels):
    m = split.meta
    for key in ("dataset", "sensor", "band", "wavelength_m", "polarizations", "incidence_deg", "pixel_spacing_m",
                "looks", "provenance", "unit", "channels", "class_names", "radiometry", "report"):
        assert key in m, key
    assert (m["dataset"], m["unit"], m["channels"]) == (dataset, unit, channels)
    assert m["provenance"]["taxonomy"] in ("7class", "native") and m["provenance"]["label_remap"]
    assert m["provenance"]["converter"].startswith("convert_")
    assert (unit != "dn" or "dn_scale" in m) and m.get("dn_scale") is None  # no release ships calibration
    assert split.images.shape[1:] == (len(channels), T, T) and split.labels.shape[1:] == (T, T)


def check_clean(tmp_path, out):
    """A failed conversion leaves neither the output folder nor a temporary one."""
    assert not os.path.exists(out)
    assert not glob.glob(os.path.join(tmp_path, "**", "*.tmp-*"), recursive=True)


# -----------------------------------------------------------------------------
# One fake dataset per converter


def test_openearthmap_sar(tmp_path):
    root = tmp_path / "OEM"
    label = np.zeros((70, 90), np.uint8)
    label[0, :9] = np.arange(9)  # every OEM value once: 0 unlabelled, 1 bareland ... 8 building
    label[5, :] = 8
    sar = np.full((70, 90), 200, np.uint8)
    sar[5, 3:7] = 0  # no-data pixels of a labelled row
    tif(root / "train/regionA/sar_images/a1.tif", sar, geo=True)
    tif(root / "train/regionA/labels/a1.tif", label)
    tif(root / "train/regionB/sar_images/b1.tif", np.ones((40, 48), np.uint8))
    tif(root / "train/regionB/labels/b1.tif", np.full((40, 48), 8, np.uint8))
    tif(root / "test/regionC/sar_images/c1.tif", np.ones((40, 48), np.uint8))  # no labels/: skipped
    split = Split(convert.convert_openearthmap_sar(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 12 + 4
    check_meta(split, "OpenEarthMap-SAR", "dn", ["SAR"])
    records = tiles(split.path)
    i = find(records, "a1.tif", 0, 0)
    assert split.labels[i][0, :9].tolist() == [IGNORE, 4, 0, 0, 2, 5, 3, 6, 1]  # 8 building -> 1, 6 water -> 3
    assert split.labels[i][5, 2:8].tolist() == [1, IGNORE, IGNORE, IGNORE, IGNORE, 1]  # DN 0 = no-data
    assert split.meta["report"]["nodata_pixels"] == 4
    assert float(split.images[i].max()) == 200.0
    g = records[find(records, "a1.tif", 24, 48)]["geo"]
    assert g["ModelTiepoint"][3:5] == [X0 + 48 * SX, Y0 - 24 * SY]
    native = Split(convert.convert_openearthmap_sar(root, tmp_path / "nat", tile=T, overlap=OV, taxonomy="native"))
    assert native.class_names == list(convert.OEM.names)
    assert native.labels[i][0, :9].tolist() == [IGNORE, 0, 1, 2, 3, 4, 5, 6, 7]


def test_whu_opt_sar_official_division_and_nodata(tmp_path):
    root = tmp_path / "WHU"
    label = np.full((70, 90), 40, np.uint8)
    label[0, :8] = [0, 10, 20, 30, 40, 50, 60, 70]
    sar = np.full((70, 90), 17, np.uint8)
    sar[:, -3:] = 0  # a zero-filled border: no-data
    for sheet in (WHU_TRAIN, WHU_TEST, "NH49E999999"):  # a train sheet, a test sheet, one in neither list
        tif(root / f"sar/{sheet}.tif", sar, geo=True)
        tif(root / f"lbl/{sheet}.tif", label)
        tif(root / f"optical/{sheet}.tif", np.zeros((3, 70, 90), np.uint8))
    split = Split(convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 12 and {r["source"] for r in tiles(split.path)} == {str(root / f"sar/{WHU_TRAIN}.tif")}
    check_meta(split, "WHU-OPT-SAR", "dn", ["SAR"])
    assert split.meta["split_list"].endswith(os.path.join("nanosar", "splits", "whu_opt_sar_division.txt"))
    assert split.meta["report"]["split_list"] == {"path": split.meta["split_list"], "listed": 80, "found": 1}
    assert split.meta["report"]["nodata_pixels"] == 3 * 70  # the zero border, counted once per scene pixel
    assert split.labels[0][0, :8].tolist() == [IGNORE, 6, 1, 1, 3, 5, 2, 0]  # 40 -> water 3
    assert split.labels[0][5, 5] == CLASSES_7.index("water")
    last = find(tiles(split.path), f"{WHU_TRAIN}.tif", 38, 58)
    assert (split.labels[last][:, -3:] == IGNORE).all() and (split.labels[last][:, :-3] != IGNORE).all()
    test = Split(convert.convert_whu_opt_sar(root, tmp_path / "test", "test", tile=T, overlap=OV, taxonomy="native"))
    assert {r["source"] for r in tiles(test.path)} == {str(root / f"sar/{WHU_TEST}.tif")}
    assert test.labels[0][0, :8].tolist() == [IGNORE, 0, 1, 2, 3, 4, 5, 6]
    assert test.class_names == list(convert.WHU.names) and test.path.endswith("test")
    everything = Split(convert.convert_whu_opt_sar(root, tmp_path / "all", "all", tile=T, overlap=OV))
    assert len(everything) == 36 and everything.meta["split_list"] is None  # --split all: every sheet
    with open(convert.WHU_DIVISION, "rb") as f:
        assert split.meta["split_source"] == {"list": "whu_opt_sar_division.txt",
                                              "sha256": hashlib.sha256(f.read()).hexdigest()}
    assert everything.meta["split_source"]["list"] is None
    with pytest.raises(FileNotFoundError, match=r"split 'val' of WHU-OPT-SAR needs its list of images: the official "
                                                r"division has train and test .*--split-list FILE.*--split all"):
        convert.convert_whu_opt_sar(root, tmp_path / "val", "val", tile=T, overlap=OV)
    with pytest.raises(ValueError, match="--split all takes every image"):
        convert.convert_whu_opt_sar(root, tmp_path / "x", "all", tile=T, overlap=OV, split_list=convert.WHU_DIVISION)
    assert not (tmp_path / "val").exists() and not (tmp_path / "x").exists()



def test_declared_nodata_of_a_dn_product_is_written_as_zero(tmp_path):
    root = tmp_path / "WHU"
    sar = np.full((40, 48), 30, np.uint8)
    sar[:, :4] = 255                                                      # the file's GDAL_NODATA
    os.makedirs(root / "sar")
    tifffile.imwrite(root / f"sar/{WHU_TRAIN}.tif", sar, extratags=[(42113, "s", 0, "255", True)])
    tif(root / f"lbl/{WHU_TRAIN}.tif", np.full((40, 48), 40, np.uint8))
    split = Split(convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV))
    assert (split.images[0][0, :, :4] == 0).all() and (split.labels[0][:, :4] == IGNORE).all()
    assert (split.images[0][0, :, 4:] == 30).all() and split.meta["report"]["nodata_pixels"] == 160

@pytest.mark.parametrize("sar_dir, lab_dir, label_name", [
    ("SAR_1024", "LAB_1024", "JiuJiang_01_Label_{}"),     # both spellings of the folders appear in the wild
    ("sar_1024", "lab_1024", "JiuJiang_01_SAR_{}"),       # and a label named like its SAR file
])
def test_fusar_map_folders_any_case_colour_labels_and_split_list(tmp_path, sar_dir, lab_dir, label_name):
    root = tmp_path / "FUSAR"
    sar = np.full((40, 48), 120, np.uint8)  # 8-bit display stretch
    rgb = np.zeros((3, 40, 48), np.uint8)
    rgb[:, 0, 1], rgb[:, 0, 2], rgb[:, 0, 3], rgb[:, 0, 4] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    tif(root / f"{sar_dir}/JiuJiang_01_SAR_001.tif", np.stack([sar] * 3), planar="contig")  # grey stored as RGB
    tif(root / f"{lab_dir}/{label_name.format('001')}.tif", rgb, planar="contig")
    tif(root / f"{sar_dir}/JiuJiang_01_SAR_002.tif", sar)
    tif(root / f"{lab_dir}/{label_name.format('002')}.tif", np.zeros((40, 48), np.uint8))  # 1-band ids
    (root / "train.txt").write_text("JiuJiang_01_SAR_001.tif\n")
    split = Split(convert.convert_fusar_map(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 4  # only the listed scene
    check_meta(split, "FUSAR-Map", "dn", ["SAR"])
    assert split.meta["pixel_spacing_m"] == 1.02 and "display stretch" in split.meta["radiometry"]
    assert split.labels[0][0, :5].tolist() == [4, 1, 5, 3, 2]  # bare land, building, vegetation->forest, water, road
    assert split.meta["class_names"] == list(CLASSES_7)
    native = Split(convert.convert_fusar_map(root, tmp_path / "native", tile=T, overlap=OV, taxonomy="native"))
    assert native.class_names == ["bare_land", "building", "vegetation", "water", "road"]
    assert native.labels[0][0, :5].tolist() == [0, 1, 2, 3, 4]
    assert float(split.images[0][0, 1, 1]) == 120.0
    both = Split(convert.convert_fusar_map(root, tmp_path / "out", "all", tile=T, overlap=OV))
    assert len(both) == 8


# AIR-PolSAR-Seg-2.0: {bj,sh,gz}_{hh,hv,vh,vv}.tiff, 2-band int16 (real, imaginary) interleaved, RGB labels in
# modified/. IQ per polarization below: |z| = 5, 10, 13, 17.
AIR_IQ = {"hh": (3, 4), "hv": (6, 8), "vh": (5, 12), "vv": (-8, 15)}
CYAN, GREEN, RED, YELLOW, BLUE, MAGENTA, WHITE = ((0, 255, 255), (0, 255, 0), (255, 0, 0), (255, 255, 0),
                                                  (0, 0, 255), (255, 0, 255), (255, 255, 255))


def air_scene(folder, tag, label_name, colours, H=40, W=48):
    """One scene: 4 polarization files with a zero-filled border (columns 0-1) and a no-data pixel at (10, 10),
    and an RGB label of `colours` (3, H, W), white over the border."""
    for pol, (i, q) in AIR_IQ.items():
        iq = np.stack([np.full((H, W), i, np.int16), np.full((H, W), q, np.int16)])
        iq[:, :, :2] = 0
        iq[:, 10, 10] = 0
        tif(folder / f"{tag}_{pol}.tiff", iq, planar="contig")
    colours = np.array(colours, np.uint8)
    colours[:, :, :2] = np.array(WHITE, np.uint8)[:, None, None]
    tif(folder / "modified" / label_name, colours, planar="contig")


def air_tree(root):
    bj = np.zeros((3, 40, 48), np.uint8) + np.array(CYAN, np.uint8)[:, None, None]
    for k, colour in enumerate((CYAN, GREEN, RED, YELLOW, BLUE, MAGENTA)):
        bj[:, 0, 4 + k] = colour
    air_scene(root / "AIR-PolSAR-Seg-2.0" / "Beijing", "bj", "bj_gt_modify.tiff", bj)
    tif(root / "AIR-PolSAR-Seg-2.0/Beijing/modified/bj_gt.tiff", np.zeros((3, 40, 48), np.uint8), planar="contig")
    tif(root / "AIR-PolSAR-Seg-2.0/Beijing/modified/bj_hh.tiff", np.zeros((40, 48), np.uint8))  # a rendering
    os.makedirs(root / "__MACOSX/AIR-PolSAR-Seg-2.0/Beijing")
    (root / "__MACOSX/AIR-PolSAR-Seg-2.0/Beijing/._bj_hh.tiff").write_bytes(b"\0\5\x16\7")   # zip debris
    sh = np.zeros((3, 40, 48), np.uint8) + np.array((10, 240, 250), np.uint8)[:, None, None]  # compressed cyan
    sh[:, 20:24, 20:24] = np.array((128, 128, 128), np.uint8)[:, None, None]  # 16 pixels of no palette colour
    sh[:, 30:32, 30:32] = np.array((250, 250, 250), np.uint8)[:, None, None]  # near white: unlabelled
    air_scene(root / "AIR-PolSAR-Seg-2.0" / "Shanghai", "sh", "sh_gt.tiff", sh)


def test_air_polsar_seg2_public_layout_colour_tolerance_and_report(tmp_path):
    air_tree(tmp_path / "AIR")
    split = Split(convert.convert_air_polsar_seg2(tmp_path / "AIR", tmp_path / "amp", tile=T, overlap=OV), verify=True)
    assert len(split) == 8  # 2 scenes x 4 tiles; the rendering in modified/ and the zip debris are not scenes
    check_meta(split, "AIR-PolSAR-Seg-2.0", "dn", ["HH", "HV", "VH", "VV"])
    records = tiles(split.path)
    bj, sh = find(records, "bj_hh.tiff", 0, 0), find(records, "sh_hh.tiff", 0, 0)
    assert records[bj]["label_file"].endswith(os.path.join("modified", "bj_gt_modify.tiff"))  # before bj_gt.tiff
    assert split.images[bj][:, 5, 5].tolist() == [5.0, 10.0, 13.0, 17.0]  # |re + j im| per polarization
    assert split.labels[bj][0, 4:10].tolist() == [3, 5, 4, 1, 2, 0]  # the guessed palette, in CLASSES_7 ids
    assert (split.labels[bj][:, :2] == IGNORE).all() and split.labels[bj][10, 10] == IGNORE  # border, no-data
    assert (split.labels[sh][:10, 2:] == 3).all()  # near-duplicate colours take the nearest palette colour
    report = split.meta["report"]
    assert report["nodata_pixels"] == 2  # (10, 10) of each scene; the border is white (unlabelled) already
    sh_label = str(tmp_path / "AIR/AIR-PolSAR-Seg-2.0/Shanghai/modified/sh_gt.tiff")
    assert report["labels"][sh_label]["unmatched_pixels"] == 16
    assert report["labels"][sh_label]["pixels_per_colour"]["255,255,255 unlabelled"] == 2 * 40 + 4
    assert report["labels"][sh_label]["mean_hh_amplitude_per_class"]["water"] == pytest.approx(5.0, abs=0.2)
    assert split.labels[find(records, "sh_hh.tiff", 8, 16)][12:16, 4:8].tolist() == [[IGNORE] * 4] * 4  # unmatched
    native = Split(convert.convert_air_polsar_seg2(tmp_path / "AIR", tmp_path / "cplx", tile=T, overlap=OV,
                                                   taxonomy="native", representation="complex", pol="VV",
                                                   scenes="bj"))
    check_meta(native, "AIR-PolSAR-Seg-2.0", "complex", ["re", "im"])
    assert len(native) == 4 and native.meta["polarizations"] == ["VV"]
    assert native.images[0][:, 3, 3].tolist() == [-8.0, 15.0]
    assert native.labels[0][0, 4:10].tolist() == [0, 1, 2, 3, 4, 5]
    assert native.class_names == list(convert.AIRPOLSAR.names)
    imag = Split(convert.convert_air_polsar_seg2(tmp_path / "AIR", tmp_path / "imag", tile=T, overlap=OV,
                                                 representation="imag", pol="HV", scenes=["SH"]))
    assert imag.meta["unit"] == "imag" and imag.images[0][0, 5, 5] == 8.0 and len(imag) == 4


def test_air_polsar_seg2_missing_files_are_clear_errors(tmp_path):
    air_tree(tmp_path / "AIR")
    scene = tmp_path / "AIR/AIR-PolSAR-Seg-2.0/Shanghai"
    os.remove(scene / "sh_vh.tiff")
    with pytest.raises(FileNotFoundError, match=r"sh_hh\.tiff has no VH file: expected .*Shanghai/sh_vh\.tiff"):
        convert.convert_air_polsar_seg2(tmp_path / "AIR", tmp_path / "bad", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "bad")
    os.remove(scene / "modified/sh_gt.tiff")
    with pytest.raises(FileNotFoundError, match=r"sh_hh\.tiff has no label: expected .*sh_gt_modify\.tiff"):
        convert.convert_air_polsar_seg2(tmp_path / "AIR", tmp_path / "bad", tile=T, overlap=OV, scenes="sh")
    with pytest.raises(FileNotFoundError, match=r"no <tag>_hh\.tiff scene of \['gz'\]"):
        convert.convert_air_polsar_seg2(tmp_path / "AIR", tmp_path / "bad", tile=T, overlap=OV, scenes="gz")
    check_clean(tmp_path, tmp_path / "bad")


# DDHR-SK: korea/{GF2,GF3}/<id>.jpg, korea/label/<id>.png (palette PNG); ids from the authors' lists
DDHR_IDS = {"6133": "train", "5352": "train", "5434": "val", "999999": None}
DDHR_PALETTE = [(128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)] + [(0, 0, 0)] * 250 + [(255,) * 3]


def ddhr_tree(root, write_jpeg):
    label = np.full((32, 32), 2, np.uint8)
    label[0, :6] = [0, 1, 2, 3, 4, 255]
    for i, name in enumerate(DDHR_IDS):
        sar = np.full((32, 32), 90 + i, np.uint8)
        sar[20, 20] = 0  # no-data
        write_jpeg(root / f"GF3/{name}.jpg", np.stack([sar] * 3))  # grey SAR stored as 3 equal channels
        write_jpeg(root / f"GF2/{name}.jpg", np.zeros((3, 32, 32), np.uint8))
        palette_png(root / f"label/{name}.png", label, DDHR_PALETTE)


def stand_in_jpeg(path, array):
    """The test's stand-in for a JPEG file (no codec here): the array, read back by the patched decoder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, array)


def test_ddhr_sk_official_lists_and_palette_indices(tmp_path, monkeypatch):
    root = tmp_path / "DDHR-DATA/korea"
    ddhr_tree(root, stand_in_jpeg)
    monkeypatch.setattr(geotiff, "read_jpeg", lambda path: np.load(path))
    split = Split(convert.convert_ddhr_sk(root, tmp_path / "out", tile=T), verify=True)
    assert sorted(os.path.basename(r["source"]) for r in tiles(split.path)) == ["5352.jpg", "6133.jpg"]
    check_meta(split, "DDHR-SK", "dn", ["SAR"])
    assert split.meta["split_list"].endswith("ddhr_sk_trainM.txt")
    assert split.labels[0][0, :6].tolist() == [1, 2, 5, 3, 6, IGNORE]  # buildings, roads, greenery, water, farmland
    assert split.labels[0][20, 20] == IGNORE and split.meta["report"]["nodata_pixels"] == 2
    val = Split(convert.convert_ddhr_sk(root, tmp_path / "out", "val", tile=T, taxonomy="native"))
    assert [os.path.basename(r["source"]) for r in tiles(val.path)] == ["5434.jpg"]
    assert val.labels[0][0, :6].tolist() == [0, 1, 2, 3, 4, IGNORE]
    assert len(Split(convert.convert_ddhr_sk(root, tmp_path / "out", "all", tile=T))) == 4  # no list: every id


def test_ddhr_sk_jpeg_without_a_decoder_is_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "DDHR-DATA/korea"
    ddhr_tree(root, stand_in_jpeg)
    monkeypatch.setitem(sys.modules, "PIL", None)          # neither optional decoder importable
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    with pytest.raises(RuntimeError, match=r"GF3/\d+\.jpg: reading JPEG needs the optional package Pillow"):
        convert.convert_ddhr_sk(root, tmp_path / "out", tile=T)
    check_clean(tmp_path, tmp_path / "out")


def test_ddhr_sk_real_jpeg_and_png_files(tmp_path):
    Image = pytest.importorskip("PIL.Image")

    def write_jpeg(path, array):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.moveaxis(array, 0, -1)).save(path, quality=95)

    root = tmp_path / "korea"
    ddhr_tree(root, write_jpeg)
    label = np.asarray(Image.open(root / "label/6133.png"))                      # what DDHRNet's reader sees
    image = Image.fromarray(label, mode="P")
    image.putpalette([c for rgb in DDHR_PALETTE for c in rgb])
    image.save(root / "label/6133.png")                                          # a palette PNG written by Pillow
    split = Split(convert.convert_ddhr_sk(root, tmp_path / "out", tile=T))
    assert split.labels[0][0, :6].tolist() == [1, 2, 5, 3, 6, IGNORE]
    assert abs(float(split.images[0][0, 5, 5]) - 91) <= 3                        # lossy JPEG, within a few DN


def test_sarbud_labelimgs_hh_only_and_padding(tmp_path):
    root = tmp_path / "SARBuD"
    label = np.zeros((40, 48), np.uint8)
    label[:10, :10] = 255
    hh = np.full((40, 48), 700, np.uint16)
    hh[0, 0] = 65535  # saturated DN: clipped to the float16 maximum
    tif(root / "SARimgs/GF3_a_0001.tif", hh)
    tif(root / "Labelimgs/GF3_a_0001.tif", label)
    tif(root / "SARimgs/GF3_a_0002.tif", np.full((28, 28), 300, np.uint16))  # a smaller tile: padded, label 255
    palette_png(root / "Labelimgs/GF3_a_0002.png", np.ones((28, 28), np.uint8), [(0, 0, 0), (255, 255, 255)])
    split = Split(convert.convert_sarbud(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 5
    check_meta(split, "SARBuD-1.0", "dn", ["HH"])
    assert split.meta["polarizations"] == ["HH"] and split.meta["pixel_spacing_m"] == 10.0
    i, j = find(tiles(split.path), "0001.tif", 0, 0), find(tiles(split.path), "0002.tif", 0, 0)
    assert split.labels[i][:10, :10].min() == 1 and split.labels[i][10:].max() == 0
    assert float(split.images[i][0, 0, 0]) == 65504.0 and float(split.images[i][0, 1, 1]) == 700.0
    assert (split.labels[j][:28, :28] == 1).all() and (split.labels[j][28:] == IGNORE).all()
    tif(root / "SARimgs/GF3_a_0003.tif", np.ones((2, 40, 48), np.uint16))   # dual-pol: not this release
    tif(root / "Labelimgs/GF3_a_0003.tif", label)
    with pytest.raises(ValueError, match=r"GF3_a_0003\.tif: expected 1 band\(s\), found 2"):
        convert.convert_sarbud(root, tmp_path / "bad", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "bad")


def s1_chip(nan=True):
    image = np.stack([np.full((70, 90), -9.3, np.float32), np.full((70, 90), -17.3, np.float32)])
    if nan:
        image[1, 5, 6] = np.nan
    image[1, 0, 0] = -25.0
    label = np.zeros((70, 90), np.int16)
    label[1, :3] = [-1, 0, 1]
    return image, label


def test_sen1floods11_db_nan_and_split_csv(tmp_path):
    root = tmp_path / "sen1floods11"
    hand = root / "v1.1/data/flood_events/HandLabeled"
    image, label = s1_chip()
    tif(hand / "S1Hand/Bolivia_103757_S1Hand.tif", image, geo=True, epsg=4326, tie=(-63.0, -14.0),
        scale=(8.983e-5, 8.983e-5))
    tif(hand / "LabelHand/Bolivia_103757_LabelHand.tif", label)
    tif(hand / "S1Hand/Spain_7370579_S1Hand.tif", image[:, :40, :48])
    tif(hand / "LabelHand/Spain_7370579_LabelHand.tif", label[:40, :48])
    os.makedirs(root / "v1.1/splits/flood_handlabeled")
    (root / "v1.1/splits/flood_handlabeled/flood_test_data.csv").write_text(
        "Bolivia_103757_S1Hand.tif,Bolivia_103757_LabelHand.tif\n")
    split = Split(convert.convert_sen1floods11(root, tmp_path / "out", "test", tile=T, overlap=OV), verify=True)
    assert len(split) == 12  # Spain is not in the test list
    check_meta(split, "Sen1Floods11", "db", ["VV", "VH"])
    assert split.meta["split_list"].endswith("flood_test_data.csv")
    lbl, img = split.labels[0], split.images[0].astype(np.float32)
    assert lbl[1, :3].tolist() == [IGNORE, 0, 3]  # -1 nodata -> ignore, water -> 3
    # the NaN pixel: ignored, and every band set to that band's minimum finite value
    assert lbl[5, 6] == IGNORE and img[1, 5, 6] == -25.0 and img[0, 5, 6] == np.float16(-9.3)
    assert split.meta["report"]["nodata_pixels"] == 1
    assert abs(img[1, 9, 9] - (-17.3)) < 0.01 and abs(img[0, 9, 9] - (-9.3)) < 0.01  # dB within float16 precision
    g = tiles(split.path)[find(tiles(split.path), "Bolivia_103757_S1Hand.tif", 38, 24)]["geo"]
    assert np.allclose(g["ModelTiepoint"][3:5], [-63.0 + 24 * 8.983e-5, -14.0 - 38 * 8.983e-5])
    # the train list is missing: refused (it would hold the test chips too), not silently every chip
    with pytest.raises(FileNotFoundError, match=r"split 'train' of Sen1Floods11 needs its list of images: the "
                                                r"official flood_train_data.csv .*--split all"):
        convert.convert_sen1floods11(root, tmp_path / "train", "train", tile=T, overlap=OV)
    assert len(Split(convert.convert_sen1floods11(hand, tmp_path / "all", "all", tile=T, overlap=OV))) == 16
    assert split.meta["split_source"]["list"] == "flood_test_data.csv" and len(split.meta["split_source"]["sha256"]) == 64


def test_sen1floods11_repository_sample_layout(tmp_path):
    sample = tmp_path / "Sen1Floods11/sample"  # the repository's own sample/ folder
    image, label = s1_chip(nan=False)
    tif(sample / "S1/Spain_7370579_S1Hand.tif", image)
    tif(sample / "S1/Spain_7370579_S1.tif", np.zeros((2, 70, 90), np.float32))  # an older, unlabelled product
    tif(sample / "Labels/Spain_7370579_LabelHand.tif", label)
    tif(sample / "QC/Spain_7370579_QC.tif", np.zeros((70, 90), np.uint8))
    tif(sample / "S2/Spain_7370579_S2Hand.tif", np.zeros((13, 70, 90), np.uint16))
    split = Split(convert.convert_sen1floods11(tmp_path / "Sen1Floods11", tmp_path / "out", "all", tile=T, overlap=OV))
    assert len(split) == 12 and {os.path.basename(r["source"]) for r in tiles(split.path)} == {
        "Spain_7370579_S1Hand.tif"}
    assert split.labels[0][1, :3].tolist() == [IGNORE, 0, 3] and split.meta["split_list"] is None


def test_a_db_dataset_holding_linear_values_is_refused(tmp_path):
    sample = tmp_path / "s1f/sample"
    image, label = s1_chip(nan=False)
    tif(sample / "S1/Spain_7370579_S1Hand.tif", np.abs(image) * 20)  # values up to 500: not dB
    tif(sample / "Labels/Spain_7370579_LabelHand.tif", label)
    with pytest.raises(ValueError, match=r"Spain_7370579_S1Hand\.tif: values up to 500 declared as dB.*look like DN"):
        convert.convert_sen1floods11(tmp_path / "s1f", tmp_path / "out", "all", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_a_dn_dataset_holding_db_values_is_refused(tmp_path):
    root = tmp_path / "WHU"
    tif(root / f"sar/{WHU_TRAIN}.tif", np.full((40, 48), -12.5, np.float32))  # a sheet someone converted to dB
    tif(root / f"lbl/{WHU_TRAIN}.tif", np.full((40, 48), 40, np.uint8))
    with pytest.raises(ValueError, match=rf"{WHU_TRAIN}\.tif: negative values .* declared as dn.*look like dB"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def sn6_tree(root, image, geojson, name="20190804111224_20190804111453_tile_1", **geo):
    """geojson: a dict, or the file's text as it is ("" for the release's 0-byte files)."""
    aoi = root / "SN6_buildings/train/train/AOI_11_Rotterdam"
    tif(aoi / f"SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_{name}.tif", image, geo=True, **geo)
    os.makedirs(aoi / "geojson_buildings", exist_ok=True)
    text = geojson if isinstance(geojson, str) else json.dumps(geojson)
    (aoi / f"geojson_buildings/SN6_Train_AOI_11_Rotterdam_Buildings_{name}.geojson").write_text(text)
    test = root / "SN6_buildings/test/test_public/AOI_11_Rotterdam/SAR-Intensity"
    tif(test / f"SN6_Test_Public_AOI_11_Rotterdam_SAR-Intensity_{name}.tif", image, geo=True, **geo)  # skipped


def square(x0, y0, x1, y1):
    return [[[x0, y0, 0.0], [x1, y0, 0.0], [x1, y1, 0.0], [x0, y1, 0.0], [x0, y0, 0.0]]]


def sn6_image(C=4):
    image = np.full((C, 70, 90), 40.0, np.float32)
    image[:, :, 0] = 0.0  # a nodata column
    image[0, 5, 5] = 20.0
    return image


def test_spacenet6_utm_geojson(tmp_path):
    # building over pixel rows 10..19, cols 20..29 (polygon on pixel boundaries), in the image's UTM CRS
    poly = square(X0 + 20 * SX, Y0 - 10 * SY, X0 + 30 * SX, Y0 - 20 * SY)
    sn6_tree(tmp_path / "sn6", sn6_image(), {"type": "FeatureCollection", "crs": {"type": "name", "properties": {
        "name": "urn:ogc:def:crs:EPSG::32631"}}, "features": [{"type": "Feature", "geometry": {
            "type": "Polygon", "coordinates": poly}}, {"type": "Feature", "geometry": None}]})
    split = Split(convert.convert_spacenet6(tmp_path / "sn6", tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 12
    check_meta(split, "SpaceNet6", "db", ["HH", "HV", "VH", "VV"])
    lbl = split.labels[0]
    assert (lbl[10:20, 20:30] == 1).all() and (lbl == 1).sum() == 100
    assert (lbl[:, 0] == IGNORE).all() and (lbl[:, 1:] != IGNORE).all()
    img = split.images[0].astype(np.float32)
    assert img[0, 3, 0] == 20.0 and img[1, 3, 0] == 40.0  # nodata filled with each band's minimum valid value
    native = Split(convert.convert_spacenet6(tmp_path / "sn6", tmp_path / "nat", tile=T, overlap=OV, taxonomy="native"))
    assert native.class_names == ["background", "building"] and (native.labels[0] == lbl).all()


def test_spacenet6_empty_geojson_file_is_an_empty_mask(tmp_path):
    sn6_tree(tmp_path / "sn6", sn6_image(), "")  # 0 bytes: a tile without buildings
    split = Split(convert.convert_spacenet6(tmp_path / "sn6", tmp_path / "out", tile=T, overlap=OV))
    assert len(split) == 12 and set(np.unique(split.labels[0]).tolist()) == {0, IGNORE}
    assert split.meta["report"]["nodata_pixels"] == 70  # the nodata column


def utm_to_lonlat(x, y, zone=31):
    """Inverse of geotiff.lonlat_to_utm by Newton iterations (test helper only)."""
    lon, lat = np.full_like(x, 6 * zone - 183.0), np.full_like(y, 52.0)
    for _ in range(20):
        fx, fy = geotiff.lonlat_to_utm(lon, lat, zone)
        d = 1e-6
        ax, ay = geotiff.lonlat_to_utm(lon + d, lat, zone)
        bx, by = geotiff.lonlat_to_utm(lon, lat + d, zone)
        J = np.array([[(ax - fx) / d, (bx - fx) / d], [(ay - fy) / d, (by - fy) / d]]).transpose(2, 0, 1)
        step = np.linalg.solve(J, np.stack([x - fx, y - fy], 1)[..., None])[..., 0]
        lon, lat = lon + step[:, 0], lat + step[:, 1]
    return lon, lat


def test_spacenet6_lonlat_geojson_over_utm_image(tmp_path):
    corners = np.array(square(X0 + 20.2 * SX, Y0 - 10.2 * SY, X0 + 29.8 * SX, Y0 - 19.8 * SY)[0])
    lon, lat = utm_to_lonlat(corners[:, 0], corners[:, 1])
    sn6_tree(tmp_path / "sn6", sn6_image(), {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "MultiPolygon", "coordinates": [[np.stack([lon, lat], 1).tolist()]]}}]})
    split = Split(convert.convert_spacenet6(tmp_path / "sn6", tmp_path / "out", tile=T, overlap=OV))
    lbl = split.labels[0]
    assert (lbl[10:20, 20:30] == 1).all() and (lbl == 1).sum() == 100


def test_utm_golden():
    x, y = geotiff.lonlat_to_utm(0.0, 0.0, 31)  # the equator 3 deg west of zone 31's central meridian
    assert abs(x - 166021.443) < 0.01 and abs(y) < 1e-6
    # on the central meridian northing = 0.9996 x meridian arc length, integrated numerically here
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    phi = np.linspace(0, np.radians(52.0), 200001)
    dm = a * (1 - e2) / (1 - e2 * np.sin(phi) ** 2) ** 1.5  # dM/dphi, the meridian radius of curvature
    arc = ((dm[1:] + dm[:-1]) / 2 * np.diff(phi)).sum()  # trapezoid rule
    x, y = geotiff.lonlat_to_utm(3.0, 52.0, 31)
    assert abs(x - 500000.0) < 1e-6 and abs(y - 0.9996 * arc) < 0.01
    assert abs(geotiff.lonlat_to_utm(3.0, -52.0, 31, north=False)[1] - (1e7 - 0.9996 * arc)) < 0.01


def test_rasterize_golden_square_triangle_hole():
    sq = geotiff.rasterize_polygons([[np.array([(1, 1), (5, 1), (5, 4), (1, 4)])]], (6, 7))
    expected = np.zeros((6, 7), np.uint8)
    expected[1:4, 1:5] = 1  # pixel centres (c + 0.5, r + 0.5) with 1 < x < 5, 1 < y < 4
    assert (sq == expected).all()
    tri = geotiff.rasterize_polygons([[np.array([(0, 0), (8.2, 0), (0, 8.2)])]], (10, 10))
    r, c = np.mgrid[:10, :10]
    assert (tri == (r + c <= 7)).all() and tri.sum() == 36
    holed = geotiff.rasterize_polygons([[np.array([(0, 0), (10, 0), (10, 10), (0, 10)]),
                                         np.array([(3, 3), (7, 3), (7, 7), (3, 7)])]], (12, 12))
    assert holed.sum() == 100 - 16 and holed[5, 5] == 0 and holed[0, 0] == 1
    clipped = geotiff.rasterize_polygons([[np.array([(-5, -5), (3, -5), (3, 2), (-5, 2)])]], (4, 4))
    assert clipped.sum() == 6 and clipped[:2, :3].all()  # outside the image is dropped


# -----------------------------------------------------------------------------
# Bad input: a clear error naming the offending file, and nothing left on disk


def whu(root, names=(WHU_TRAIN,), size=(40, 48), label_size=None, label_value=40, bands=1):
    for name in names:
        tif(root / f"sar/{name}.tif", np.ones((bands, *size) if bands > 1 else size, np.uint8))
        tif(root / f"lbl/{name}.tif", np.full(label_size or size, label_value, np.uint8))
    return root


def test_missing_and_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nowhere does not exist"):
        convert.convert_whu_opt_sar(tmp_path / "nowhere", tmp_path / "out")
    os.makedirs(tmp_path / "empty/sar")
    with pytest.raises(FileNotFoundError, match=r"empty: no files matching sar/\*"):
        convert.convert_whu_opt_sar(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"empty: no files matching \*\*/SAR-Intensity/\*"):
        convert.convert_spacenet6(tmp_path / "empty", tmp_path / "out")
    tif(tmp_path / "test_only/SAR-Intensity/x.tif", np.zeros((4, 8, 8), np.float32))
    with pytest.raises(FileNotFoundError, match=r"test_only: no SAR-Intensity/ folder with a geojson_buildings"):
        convert.convert_spacenet6(tmp_path / "test_only", tmp_path / "out")
    check_clean(tmp_path, tmp_path / "out")


def test_split_list_naming_nothing_present(tmp_path):
    root = whu(tmp_path / "WHU", ("NH49E999999",))
    with pytest.raises(FileNotFoundError, match=r"whu_opt_sar_division\.txt: none of its 20 files of split 'test'"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", "test", tile=T, overlap=OV)
    (tmp_path / "mine.txt").write_text("NH49E999999.tif\n")
    assert len(Split(convert.convert_whu_opt_sar(root, tmp_path / "out", "test", tile=T, overlap=OV,
                                                 split_list=str(tmp_path / "mine.txt")))) == 4


def test_bad_arguments(tmp_path):
    root = whu(tmp_path / "WHU")
    with pytest.raises(ValueError, match="taxonomy"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", taxonomy="13class")
    with pytest.raises(ValueError, match="overlap"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=32, overlap=32)
    with pytest.raises(ValueError, match="representation"):
        convert.convert_air_polsar_seg2(root, tmp_path / "out", representation="pauli")
    check_clean(tmp_path, tmp_path / "out")


def test_image_without_label(tmp_path):
    root = whu(tmp_path / "WHU")
    tif(root / f"sar/{WHU_TRAIN2}.tif", np.ones((40, 48), np.uint8))
    with pytest.raises(FileNotFoundError, match=rf"sar/{WHU_TRAIN2}\.tif has no label: expected .*lbl/{WHU_TRAIN2}"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_size_mismatch_after_good_scene(tmp_path):
    root = whu(tmp_path / "WHU")  # the first sheet converts fine, so the writer is open when the second fails
    whu(root, (WHU_TRAIN2,), size=(40, 48), label_size=(40, 40))
    with pytest.raises(ValueError, match=rf"sar/{WHU_TRAIN2}\.tif: image size \(40, 48\) does not match .*lbl/"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_truncated_tiff(tmp_path):
    root = whu(tmp_path / "WHU", (WHU_TRAIN, WHU_TRAIN2))
    path = root / f"sar/{WHU_TRAIN2}.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_unknown_label_value(tmp_path):
    root = whu(tmp_path / "WHU")
    whu(root, (WHU_TRAIN2,), label_value=45)
    with pytest.raises(ValueError, match=rf"lbl/{WHU_TRAIN2}\.tif: unknown label values \[45\]"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_unknown_label_colour(tmp_path):
    root = tmp_path / "FUSAR"
    tif(root / "SAR_1024/X_SAR_1.tif", np.ones((40, 48), np.uint8))
    tif(root / "LAB_1024/X_Label_1.tif", np.full((3, 40, 48), 7, np.uint8))
    with pytest.raises(ValueError, match=r"X_Label_1\.tif: unknown label colours \[\(7, 7, 7\)\]"):
        convert.convert_fusar_map(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_nan_where_not_allowed(tmp_path):
    image = sn6_image()
    image[2, 30, 30] = np.nan
    sn6_tree(tmp_path / "sn6", image, {"type": "FeatureCollection", "features": []})
    with pytest.raises(ValueError, match=r"SAR-Intensity_20190804111224_20190804111453_tile_1\.tif: 1 NaN"):
        convert.convert_spacenet6(tmp_path / "sn6", tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_wrong_band_count(tmp_path):
    sn6_tree(tmp_path / "sn6", sn6_image(C=3), {"type": "FeatureCollection", "features": []})
    with pytest.raises(ValueError, match=r"SAR-Intensity_.*_tile_1\.tif: expected 4 band\(s\), found 3"):
        convert.convert_spacenet6(tmp_path / "sn6", tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_inconsistent_band_count_across_scenes(tmp_path):
    root = whu(tmp_path / "WHU")
    whu(root, (WHU_TRAIN2,), bands=2)
    with pytest.raises(ValueError, match=rf"sar/{WHU_TRAIN2}\.tif .*image must be \(C=1"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_compressed_files_need_imagecodecs(tmp_path):
    try:
        import imagecodecs  # noqa: F401
        pytest.skip("imagecodecs is installed")
    except ImportError:
        pass
    root = whu(tmp_path / "WHU")  # an LZW-compressed SAR file: an uncompressed one with its Compression tag patched
    path = root / f"sar/{WHU_TRAIN}.tif"
    entry = b"\x03\x01\x03\x00\x01\x00\x00\x00\x01\x00"  # tag 259 Compression, SHORT, 1 value: 1 (none)
    path.write_bytes(path.read_bytes().replace(entry, entry[:-2] + b"\x05\x00"))  # 5 = LZW
    with pytest.raises(RuntimeError, match=rf"sar/{WHU_TRAIN}\.tif: compressed with a codec that needs .*imagecodecs"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_registry_and_layouts():
    assert set(convert.CONVERTERS) == set(convert.LAYOUT) and len(convert.CONVERTERS) == 8
    for name, text in convert.LAYOUT.items():
        assert "Source:" in text and "Output: unit" in text and "<root>" in text, name
    for name in ("fusar_map", "air_polsar_seg2", "ddhr_sk", "sarbud", "whu_opt_sar", "spacenet6"):
        assert "UNVERIFIED" in convert.LAYOUT[name] or "NOT PUBLISHED" in convert.LAYOUT[name], name
    gf3 = ("whu_opt_sar", "fusar_map", "air_polsar_seg2", "ddhr_sk", "sarbud")  # GF-3 digital numbers: never amplitude
    assert all("Output: unit dn" in convert.LAYOUT[name] for name in gf3)


def run_prepare(*args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "prepare.py", *map(str, args)], cwd=repo, capture_output=True, text=True)


def test_prepare_reports_bad_input_in_one_line_with_exit_status_2(tmp_path):
    result = run_prepare("whu_opt_sar", "--root", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"prepare.py: error: dataset folder {tmp_path / 'nowhere'} does not exist; "
                                     f"give the folder of the downloaded dataset (prepare.py --root)")
    root = whu(tmp_path / "WHU")
    path = root / f"sar/{WHU_TRAIN}.tif"
    path.write_bytes(path.read_bytes()[:300])
    result = run_prepare("whu_opt_sar", "--root", root, "--out", tmp_path / "out", "--tile", T, "--overlap", OV)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"prepare.py: error: {path}: truncated or corrupt TIFF (")
    check_clean(tmp_path, tmp_path / "out")


def test_prepare_prints_what_it_wrote_and_dropped(tmp_path):
    root = tmp_path / "WHU"
    sar = np.full((40, 48), 9, np.uint8)
    sar[0, :5] = 0
    tif(root / f"sar/{WHU_TEST}.tif", sar)
    tif(root / f"lbl/{WHU_TEST}.tif", np.full((40, 48), 40, np.uint8))
    result = run_prepare("whu_opt_sar", "--root", root, "--out", tmp_path / "out", "--split", "test", "--tile", T,
                         "--overlap", OV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"wrote {tmp_path / 'out' / 'test'}: 4 tiles of 1x32x32 in unit dn; 1 of 20 "
                                     f"images listed in {convert.WHU_DIVISION}; label 255 on 5 no-data pixels")


def test_malformed_geojson_is_a_clear_error(tmp_path):
    flat_ring = {"geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}       # a ring of numbers, not points
    sn6_tree(tmp_path / "sn6", sn6_image(), {"type": "FeatureCollection", "features": [flat_ring]})
    with pytest.raises(ValueError, match=r"_Buildings_.*\.geojson: malformed GeoJSON features"):
        convert.convert_spacenet6(tmp_path / "sn6", tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_prepare_refuses_a_split_without_its_list_and_takes_split_all(tmp_path):
    root = tmp_path / "WHU"
    for sheet in (WHU_TRAIN, "NH49E999999"):
        tif(root / f"sar/{sheet}.tif", np.full((40, 48), 9, np.uint8))
        tif(root / f"lbl/{sheet}.tif", np.full((40, 48), 40, np.uint8))
    result = run_prepare("whu_opt_sar", "--root", root, "--out", tmp_path / "out", "--split", "val", "--tile", T,
                         "--overlap", OV)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "split 'val' of WHU-OPT-SAR needs its list of images" in result.stderr and "--split all" in result.stderr
    result = run_prepare("whu_opt_sar", "--root", root, "--out", tmp_path / "out", "--split", "all", "--tile", T,
                         "--overlap", OV)
    assert result.returncode == 0, result.stderr
    split = Split(str(tmp_path / "out" / "all"))
    assert {os.path.basename(r["source"]) for r in tiles(split.path)} == {f"{WHU_TRAIN}.tif", "NH49E999999.tif"}
    assert split.meta["split_source"] == {"list": None, "images": "every image under the dataset folder"}
