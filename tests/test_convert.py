"""Dataset converters (nanosar/convert.py) on tiny fake copies of each published layout, written here with
tifffile. Tiles of T=32 pixels with overlap OV=8 (stride 24): an axis of 40 px gives starts [0, 8], 48 -> [0, 16],
70 -> [0, 24, 38], 90 -> [0, 24, 48, 58] (the last tile is aligned with the edge); a scene below 32 px is padded."""

import glob
import json
import os
import re

import numpy as np
import pytest
import tifffile

from nanosar import convert
from nanosar.data import CLASSES_7, IGNORE, Split

T, OV = 32, 8  # tile size and overlap
SX, SY, X0, Y0 = 0.5, 0.5, 595000.0, 5753000.0  # a UTM 31N grid of 0.5 m pixels (Rotterdam)


def geokeys(epsg):
    """A GeoKeyDirectory: projected (UTM 326xx) or geographic (4326) CRS, PixelIsArea."""
    projected = epsg != 4326
    return [1, 1, 0, 3, 1024, 0, 1, 1 if projected else 2, 1025, 0, 1, 1, 3072 if projected else 2048, 0, 1, epsg]


def tif(path, array, geo=False, epsg=32631, tie=(X0, Y0), scale=(SX, SY)):
    """Write (H, W) or (C, H, W) as one TIFF page (bands planar), optionally georeferenced."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tags = []
    if geo:
        keys = geokeys(epsg)
        tags = [(33550, "d", 3, (*scale, 0.0), True), (33922, "d", 6, (0, 0, 0, *tie, 0), True),
                (34735, "H", len(keys), keys, True)]
    kw = dict(photometric="minisblack", planarconfig="separate") if np.ndim(array) == 3 else {}
    tifffile.imwrite(path, np.asarray(array), extratags=tags, **kw)
    return str(path)


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
                "looks", "provenance", "unit", "channels", "class_names"):
        assert key in m, key
    assert (m["dataset"], m["unit"], m["channels"]) == (dataset, unit, channels)
    assert m["provenance"]["taxonomy"] in ("7class", "native") and m["provenance"]["label_remap"]
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
    sar = np.full((70, 90), 200, np.uint8)
    tif(root / "train/regionA/sar_images/a1.tif", sar, geo=True)
    tif(root / "train/regionA/labels/a1.tif", label)
    tif(root / "train/regionB/sar_images/b1.tif", np.ones((40, 48), np.uint8))
    tif(root / "train/regionB/labels/b1.tif", np.full((40, 48), 8, np.uint8))
    tif(root / "test/regionC/sar_images/c1.tif", np.ones((40, 48), np.uint8))  # no labels/: skipped
    split = Split(convert.convert_openearthmap_sar(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 12 + 4
    check_meta(split, "OpenEarthMap-SAR", "amplitude", ["SAR"])
    records = tiles(split.path)
    i = find(records, "a1.tif", 0, 0)
    assert split.labels[i][0, :9].tolist() == [IGNORE, 4, 0, 0, 2, 5, 3, 6, 1]  # 8 building -> 1, 6 water -> 3
    assert float(split.images[i].max()) == 200.0
    g = records[find(records, "a1.tif", 24, 48)]["geo"]
    assert g["ModelTiepoint"][3:5] == [X0 + 48 * SX, Y0 - 24 * SY]
    native = Split(convert.convert_openearthmap_sar(root, tmp_path / "nat", tile=T, overlap=OV, taxonomy="native"))
    assert native.class_names == list(convert.OEM_NAMES)
    assert native.labels[i][0, :9].tolist() == [IGNORE, 0, 1, 2, 3, 4, 5, 6, 7]


def test_whu_opt_sar(tmp_path):
    root = tmp_path / "WHU"
    label = np.full((70, 90), 40, np.uint8)
    label[0, :8] = [0, 10, 20, 30, 40, 50, 60, 70]
    tif(root / "sar/NH49E004021.tif", np.full((70, 90), 17, np.uint8), geo=True)
    tif(root / "lbl/NH49E004021.tif", label)
    tif(root / "optical/NH49E004021.tif", np.zeros((3, 70, 90), np.uint8))
    split = Split(convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 12
    check_meta(split, "WHU-OPT-SAR", "amplitude", ["SAR"])
    assert split.labels[0][0, :8].tolist() == [IGNORE, 6, 1, 1, 3, 5, 2, 0]  # 40 -> water 3
    assert split.labels[0][5, 5] == CLASSES_7.index("water")
    native = Split(convert.convert_whu_opt_sar(root, tmp_path / "nat", "val", tile=T, overlap=OV, taxonomy="native"))
    assert native.labels[0][0, :8].tolist() == [IGNORE, 0, 1, 2, 3, 4, 5, 6]
    assert native.class_names == list(convert.WHU_NAMES) and native.path.endswith("val")


def test_fusar_map_colour_labels_gray_rgb_and_split_list(tmp_path):
    root = tmp_path / "FUSAR"
    sar = np.full((40, 48), 300, np.uint16)
    sar[0, 0] = 65535  # saturated DN: clipped to the float16 maximum
    rgb = np.zeros((3, 40, 48), np.uint8)
    rgb[:, 0, 1], rgb[:, 0, 2], rgb[:, 0, 3], rgb[:, 0, 4] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    tif(root / "SAR_1024/JiuJiang_01_SAR_001.tif", np.stack([sar] * 3))  # grey stored as RGB
    tif(root / "LAB_1024/JiuJiang_01_Label_001.tif", rgb)
    tif(root / "SAR_1024/JiuJiang_01_SAR_002.tif", sar)
    tif(root / "LAB_1024/JiuJiang_01_Label_002.tif", np.zeros((40, 48), np.uint8))  # 1-band ids
    (root / "train.txt").write_text("JiuJiang_01_SAR_001.tif\n")
    split = Split(convert.convert_fusar_map(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 4  # only the listed scene
    check_meta(split, "FUSAR-Map", "amplitude", ["SAR"])
    assert split.labels[0][0, :5].tolist() == [0, 1, 5, 3, 2]  # others, building, vegetation->forest, water, road
    assert float(split.images[0][0, 0, 0]) == 65504.0 and float(split.images[0][0, 1, 1]) == 300.0
    both = Split(convert.convert_fusar_map(root, tmp_path / "out", "all", tile=T, overlap=OV))
    assert len(both) == 8


def test_air_polsar_seg2_amplitude_and_complex(tmp_path):
    root = tmp_path / "AIR"
    H, W = 40, 48
    for pol, (i, q) in zip(convert.QUAD, [(3, 4), (6, 8), (5, 12), (-8, 15)]):
        iq = np.stack([np.full((H, W), i, np.int16), np.full((H, W), q, np.int16)])
        if pol == "VV":  # one file as a single complex band, the others as I/Q int16 pairs
            tif(root / f"scene1/p1_{pol}.tif", (iq[0] + 1j * iq[1]).astype(np.complex64))
        else:
            tif(root / f"scene1/p1_{pol}.tif", iq)
    label = np.zeros((H, W), np.uint8)
    label[0, :6] = np.arange(6)
    tif(root / "scene1/p1_label.tif", label)
    split = Split(convert.convert_air_polsar_seg2(root, tmp_path / "amp", tile=T, overlap=OV), verify=True)
    assert len(split) == 4
    check_meta(split, "AIR-PolSAR-Seg-2.0", "amplitude", ["HH", "HV", "VH", "VV"])
    assert split.images[0][:, 0, 0].tolist() == [5.0, 10.0, 13.0, 17.0]  # |I + jQ| per pol
    assert split.labels[0][0, :6].tolist() == [3, 5, 4, 1, 2, 0]  # water, vegetation, bare, building, road, mountain
    cplx = Split(convert.convert_air_polsar_seg2(root, tmp_path / "cplx", tile=T, overlap=OV, taxonomy="native",
                                                 representation="complex", pol="VV"))
    check_meta(cplx, "AIR-PolSAR-Seg-2.0", "complex", ["re", "im"])
    assert cplx.images[0][:, 3, 3].tolist() == [-8.0, 15.0] and cplx.meta["polarizations"] == ["VV"]
    assert cplx.labels[0][0, :6].tolist() == [0, 1, 2, 3, 4, 5]
    os.remove(root / "scene1/p1_VH.tif")
    with pytest.raises(FileNotFoundError, match=r"VH file .*p1_VH\.tif is missing"):
        convert.convert_air_polsar_seg2(root, tmp_path / "bad", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "bad")


def test_ddhr_sk(tmp_path):
    root = tmp_path / "DDHR-DATA/korea"
    label = np.full((20, 30), IGNORE, np.uint8)
    label[0, :5] = np.arange(5)
    tif(root / "GF3/1.tif", np.full((20, 30), 90, np.uint8))  # smaller than a tile: padded, label 255
    tif(root / "label/1.tif", label)
    tif(root / "GF3/2.tif", np.full((20, 30), 90, np.uint8))
    tif(root / "label/2.tif", label)
    (root / "val.txt").write_text("2\n")
    split = Split(convert.convert_ddhr_sk(root, tmp_path / "out", "val", tile=T, overlap=OV), verify=True)
    assert len(split) == 1 and tiles(split.path)[0]["source"].endswith("2.tif")
    check_meta(split, "DDHR-SK", "amplitude", ["SAR"])
    assert split.labels[0][0, :5].tolist() == [1, 2, 5, 3, 6]  # buildings, roads, greenery, water, farmland
    assert (split.labels[0][20:] == IGNORE).all() and (split.labels[0][:, 30:] == IGNORE).all()
    assert len(Split(convert.convert_ddhr_sk(root, tmp_path / "out", "train", tile=T, overlap=OV))) == 2  # no list


def test_sarbud_dual_band_and_255_masks(tmp_path):
    root = tmp_path / "SARBuD"
    label = np.zeros((40, 48), np.uint8)
    label[:10, :10] = 255
    tif(root / "train/images/x.tif", np.stack([np.full((40, 48), 7, np.uint16), np.full((40, 48), 3, np.uint16)]))
    tif(root / "train/labels/x.tif", label)
    split = Split(convert.convert_sarbud(root, tmp_path / "out", tile=T, overlap=OV), verify=True)
    assert len(split) == 4
    check_meta(split, "SARBuD-1.0", "amplitude", ["band1", "band2"])
    assert split.labels[0][:10, :10].min() == 1 and split.labels[0][10:].max() == 0
    assert split.images[0][:, 0, 0].tolist() == [7.0, 3.0]


def test_sen1floods11_db_nan_and_split_csv(tmp_path):
    root = tmp_path / "sen1floods11"
    hand = root / "v1.1/data/flood_events/HandLabeled"
    image = np.stack([np.full((70, 90), -9.3, np.float32), np.full((70, 90), -17.3, np.float32)])
    image[1, 5, 6] = np.nan
    image[1, 0, 0] = -25.0
    label = np.zeros((70, 90), np.int16)
    label[1, :3] = [-1, 0, 1]
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
    assert abs(img[1, 9, 9] - (-17.3)) < 0.01 and abs(img[0, 9, 9] - (-9.3)) < 0.01  # dB within float16 precision
    g = tiles(split.path)[find(tiles(split.path), "Bolivia_103757_S1Hand.tif", 38, 24)]["geo"]
    assert np.allclose(g["ModelTiepoint"][3:5], [-63.0 + 24 * 8.983e-5, -14.0 - 38 * 8.983e-5])
    assert len(Split(convert.convert_sen1floods11(hand, tmp_path / "all", "train", tile=T, overlap=OV))) == 16


def sn6_tree(root, image, geojson, name="20190804111224_20190804111453_tile_1", **geo):
    aoi = root / "SN6_buildings/train/train/AOI_11_Rotterdam"
    tif(aoi / f"SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_{name}.tif", image, geo=True, **geo)
    os.makedirs(aoi / "geojson_buildings", exist_ok=True)
    (aoi / f"geojson_buildings/SN6_Train_AOI_11_Rotterdam_Buildings_{name}.geojson").write_text(json.dumps(geojson))
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


def utm_to_lonlat(x, y, zone=31):
    """Inverse of convert.lonlat_to_utm by Newton iterations (test helper only)."""
    lon, lat = np.full_like(x, 6 * zone - 183.0), np.full_like(y, 52.0)
    for _ in range(20):
        fx, fy = convert.lonlat_to_utm(lon, lat, zone)
        d = 1e-6
        ax, ay = convert.lonlat_to_utm(lon + d, lat, zone)
        bx, by = convert.lonlat_to_utm(lon, lat + d, zone)
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
    x, y = convert.lonlat_to_utm(0.0, 0.0, 31)  # the equator 3 deg west of zone 31's central meridian
    assert abs(x - 166021.443) < 0.01 and abs(y) < 1e-6
    # on the central meridian northing = 0.9996 x meridian arc length, integrated numerically here
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    phi = np.linspace(0, np.radians(52.0), 200001)
    dm = a * (1 - e2) / (1 - e2 * np.sin(phi) ** 2) ** 1.5  # dM/dphi, the meridian radius of curvature
    arc = ((dm[1:] + dm[:-1]) / 2 * np.diff(phi)).sum()  # trapezoid rule
    x, y = convert.lonlat_to_utm(3.0, 52.0, 31)
    assert abs(x - 500000.0) < 1e-6 and abs(y - 0.9996 * arc) < 0.01
    assert abs(convert.lonlat_to_utm(3.0, -52.0, 31, north=False)[1] - (1e7 - 0.9996 * arc)) < 0.01


def test_rasterize_golden_square_triangle_hole():
    sq = convert.rasterize_polygons([[np.array([(1, 1), (5, 1), (5, 4), (1, 4)])]], (6, 7))
    expected = np.zeros((6, 7), np.uint8)
    expected[1:4, 1:5] = 1  # pixel centres (c + 0.5, r + 0.5) with 1 < x < 5, 1 < y < 4
    assert (sq == expected).all()
    tri = convert.rasterize_polygons([[np.array([(0, 0), (8.2, 0), (0, 8.2)])]], (10, 10))
    r, c = np.mgrid[:10, :10]
    assert (tri == (r + c <= 7)).all() and tri.sum() == 36
    holed = convert.rasterize_polygons([[np.array([(0, 0), (10, 0), (10, 10), (0, 10)]),
                                         np.array([(3, 3), (7, 3), (7, 7), (3, 7)])]], (12, 12))
    assert holed.sum() == 100 - 16 and holed[5, 5] == 0 and holed[0, 0] == 1
    clipped = convert.rasterize_polygons([[np.array([(-5, -5), (3, -5), (3, 2), (-5, 2)])]], (4, 4))
    assert clipped.sum() == 6 and clipped[:2, :3].all()  # outside the image is dropped


# -----------------------------------------------------------------------------
# Bad input: a clear error naming the offending file, and nothing left on disk


def whu(root, names=("a",), size=(40, 48), label_size=None, label_value=40):
    for name in names:
        tif(root / f"sar/{name}.tif", np.ones(size, np.uint8))
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
    tif(root / "sar/b.tif", np.ones((40, 48), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"sar/b\.tif has no label: expected .*lbl/b\.tif"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_size_mismatch_after_good_scene(tmp_path):
    root = whu(tmp_path / "WHU")  # a.tif converts fine, so the writer is open when b.tif fails
    whu(root, ("b",), size=(40, 48), label_size=(40, 40))
    with pytest.raises(ValueError, match=r"sar/b\.tif: image size \(40, 48\) does not match .*lbl/b\.tif"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_truncated_tiff(tmp_path):
    root = whu(tmp_path / "WHU", ("a", "b"))
    path = root / "sar/b.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_unknown_label_value(tmp_path):
    root = whu(tmp_path / "WHU")
    whu(root, ("b",), label_value=45)
    with pytest.raises(ValueError, match=r"lbl/b\.tif: unknown label values \[45\]"):
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
    root = tmp_path / "SARBuD"
    tif(root / "image/a.tif", np.ones((40, 48), np.uint16))
    tif(root / "label/a.tif", np.zeros((40, 48), np.uint8))
    tif(root / "image/b.tif", np.ones((2, 40, 48), np.uint16))
    tif(root / "label/b.tif", np.zeros((40, 48), np.uint8))
    with pytest.raises(ValueError, match=r"image/b\.tif .*image must be \(C=1"):
        convert.convert_sarbud(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_compressed_files_need_imagecodecs(tmp_path):
    try:
        import imagecodecs  # noqa: F401
        pytest.skip("imagecodecs is installed")
    except ImportError:
        pass
    root = whu(tmp_path / "WHU")  # an LZW-compressed SAR file: an uncompressed one with its Compression tag patched
    path = root / "sar/a.tif"
    entry = b"\x03\x01\x03\x00\x01\x00\x00\x00\x01\x00"  # tag 259 Compression, SHORT, 1 value: 1 (none)
    path.write_bytes(path.read_bytes().replace(entry, entry[:-2] + b"\x05\x00"))  # 5 = LZW
    with pytest.raises(RuntimeError, match=r"sar/a\.tif: compressed with a codec that needs .*imagecodecs"):
        convert.convert_whu_opt_sar(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")
    root = tmp_path / "DDHR"
    os.makedirs(root / "GF3")
    os.makedirs(root / "label")
    (root / "GF3/1.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "label/1.png").write_bytes(b"\x89PNG")
    with pytest.raises(RuntimeError, match=r"1\.jpg.*imagecodecs"):
        convert.convert_ddhr_sk(root, tmp_path / "out", tile=T, overlap=OV)
    check_clean(tmp_path, tmp_path / "out")


def test_registry_and_layouts():
    assert set(convert.CONVERTERS) == set(convert.LAYOUT) and len(convert.CONVERTERS) == 8
    for name in ("fusar_map", "air_polsar_seg2", "ddhr_sk", "sarbud", "whu_opt_sar"):
        assert "ASSUMED" in convert.LAYOUT[name], name
