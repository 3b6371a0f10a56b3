"""
Converters from the published on-disk layouts of 8 real SAR segmentation datasets into nanosar's
prepared-split format (nanosar/data.py): one function per dataset, read top to bottom.

    convert_<name>(root, out, split="train", tile=512, overlap=64, taxonomy="7class") -> out/<split>

Each converter finds the files of its layout under `root`, pairs every SAR image with its label by
name, reads both (read_tiff), checks that their sizes match, remaps the labels, converts the pixels to
the unit it declares in meta.json, cuts tiles with overlap (padding scenes smaller than a tile with
label 255) and writes them with SplitWriter, GeoTIFF tags shifted to each tile. Any error names the
offending file and leaves nothing behind.

taxonomy="7class" maps every dataset to the CrossEarth-SAR pre-training classes CLASSES_7 = (0 other,
1 building, 2 road, 3 water, 4 bare_land, 5 forest, 6 cropland; 255 ignore); taxonomy="native" keeps
the dataset's own classes (ids 0..K-1 in the order of its class list). The tables sit next to each
converter; entries marked (?) are judgement calls, explained there.

Layouts marked ASSUMED below were not published in a form we could check; they follow community
loaders or plausible guesses, and must be checked against the real download (LAYOUT[name] says so
in prepare.py --help). Unknown label values always raise, so a wrong guess fails loudly.
"""

import glob
import json
import os

import numpy as np

from nanosar.data import CLASSES_7, IGNORE, SplitWriter, cut_tiles, read_tiff, remap_labels, shift_geotags

TAXONOMIES = ("7class", "native")
F16_MAX = float(np.finfo(np.float16).max)  # 65504: larger uint16 DN would overflow the split's float16
C_BAND, X_BAND = 0.0555, 0.0311  # wavelengths in m: GF-3 / Sentinel-1 (5.4 GHz), Capella / Umbra (9.65 GHz)

# -----------------------------------------------------------------------------
# Shared helpers


def _check(root, taxonomy, tile, overlap):
    """Validate the common arguments; returns root as an absolute path."""
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"taxonomy must be one of {TAXONOMIES}, got {taxonomy!r}")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return root


def _find(root, pattern, exts=(".tif", ".tiff")):
    """Sorted files under root matching a glob pattern (** = any depth) with one of `exts`; none is an error."""
    files = sorted(p for p in glob.glob(os.path.join(root, pattern), recursive=True) if p.lower().endswith(exts))
    if not files:
        raise FileNotFoundError(f"{root}: no files matching {pattern} with extension {'/'.join(exts)}; "
                                f"is this the right folder and layout? (see LAYOUT in nanosar/convert.py)")
    return files


def _label_path(image, folder, stem, exts=(".tif", ".tiff")):
    """The first existing folder/stem+ext; FileNotFoundError naming the image and the expected label."""
    for ext in exts:
        if os.path.isfile(os.path.join(folder, stem + ext)):
            return os.path.join(folder, stem + ext)
    raise FileNotFoundError(f"{image} has no label: expected {os.path.join(folder, stem + exts[0])}")


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _sibling(path, name):
    """folder/<name> next to the folder holding `path`: _sibling("a/sar_images/x.tif", "labels") = "a/labels"."""
    return os.path.join(os.path.dirname(os.path.dirname(path)), name)


def _keep_listed(images, list_path):
    """The images whose stem is listed in a split list file (one name a line, first comma-separated field);
    all images when there is no such file; none listed present is an error naming the list."""
    if list_path is None or not os.path.isfile(list_path):
        return images
    with open(list_path) as f:
        names = {_stem(line.split(",")[0].strip()) for line in f if line.strip()}
    kept = [p for p in images if _stem(p) in names]
    if not kept:
        raise FileNotFoundError(f"{list_path}: none of its {len(names)} listed files is present "
                                f"next to {images[0]}")
    return kept


def _read(path, bands=None):
    """(C, H, W) array and GeoTIFF tags: TIFF via read_tiff; PNG/JPEG via the optional imagecodecs."""
    if path.lower().endswith((".tif", ".tiff")):
        return read_tiff(path, bands)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        import imagecodecs
    except ImportError:
        raise RuntimeError(f"{path}: reading PNG/JPEG needs the optional package imagecodecs "
                           f"(pip install imagecodecs)") from None
    try:
        array = imagecodecs.imread(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode image ({e}); the file may be truncated or corrupt") from e
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if bands is not None and array.shape[0] != bands:
        raise ValueError(f"{path}: expected {bands} band(s), found {array.shape[0]} (array shape {array.shape})")
    return array, {}


def _gray(array):
    """(C, H, W) -> (1, H, W) when a grey image was stored as RGB (3 equal bands, within 2 DN for JPEG)."""
    if array.shape[0] == 3 and all(np.abs(b.astype(np.int32) - array[0]).max() <= 2 for b in array[1:]):
        return array[:1]
    return array


def _amplitude(array):
    """Detected amplitude / DN (C, H, W) -> float32; uint16 DN above 65504 (saturated) clipped to float16 max."""
    return np.minimum(array.astype(np.float32), F16_MAX)


def _label_ids(array, path):
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


def _colors_to_ids(rgb, palette, path):
    """An RGB label (3, H, W) -> (H, W) ids with {(r, g, b): id}; unknown colours raise naming the file."""
    code = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2].astype(np.int64)
    ids = np.full(code.shape, -1, np.int64)
    for (r, g, b), cls in palette.items():
        ids[code == (r << 16 | g << 8 | b)] = cls
    if (ids < 0).any():
        bad = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in np.unique(code[ids < 0])[:8].tolist()]
        raise ValueError(f"{path}: unknown label colours {bad}; expected {sorted(palette)}")
    return ids


def _mask_invalid(image, label, invalid):
    """Set label 255 where `invalid` (H, W) and fill those pixels of each band with that band's minimum over
    the valid pixels (0 if none), so the split holds finite values. image (C, H, W) float32, in place."""
    label[invalid] = IGNORE
    for band in image:
        valid = band[~invalid]
        band[invalid] = valid.min() if valid.size else 0.0
    return image, label


def _dn_loader(mapping, palette=None):
    """load(image, label) for detected-amplitude datasets: (C, H, W) DN as float (grey-as-RGB -> 1 band),
    labels as 1-band values (or RGB colours, with `palette`) remapped with `mapping`, GeoTIFF tags."""
    def load(image_path, label_path):
        image, geo = _read(image_path)
        label, _ = _read(label_path)
        if palette and label.shape[0] == 3:
            ids = _colors_to_ids(label, palette, label_path)
        else:
            ids = _label_ids(label, label_path)
        return _amplitude(_gray(image)), remap_labels(ids, mapping, label_path), geo
    return load


def _taxonomy(taxonomy, to7, native, native_names):
    """(value -> id mapping, class names) for the chosen taxonomy."""
    return (to7, list(CLASSES_7)) if taxonomy == "7class" else (native, list(native_names))


def _meta(dataset, converter, root, taxonomy, mapping, class_names, **fields):
    """meta.json content: required keys + sensor description + provenance (label remap as {str: id})."""
    return {"dataset": dataset, **fields, "class_names": class_names,
            "provenance": {"root": root, "converter": converter, "taxonomy": taxonomy,
                           "label_remap": {str(k): int(v) for k, v in mapping.items()}}}


def _write(out, split, meta, pairs, load, tile, overlap):
    """Read each (image, label) pair with load(image, label) -> (image (C, H, W) float in meta["unit"],
    label (H, W) ids, geotags), tile it and append the tiles to out/<split>. meta["channels"] = None means
    "SAR" for 1 band or band1..bandC, from the first scene. On any error nothing is left on disk."""
    path = os.path.join(out, split)
    new_dirs, d = [], os.path.abspath(out)  # folders this call creates, removed again on failure
    while not os.path.exists(d):
        new_dirs.append(d)
        d = os.path.dirname(d)
    writer = None
    try:
        for image_path, label_path in pairs:
            image, label, geo = load(image_path, label_path)
            if image.shape[1:] != label.shape:
                raise ValueError(f"{image_path}: image size {image.shape[1:]} does not match the size "
                                 f"{label.shape} of its label {label_path}")
            if writer is None:
                if meta["channels"] is None:
                    C = image.shape[0]
                    meta = {**meta, "channels": ["SAR"] if C == 1 else [f"band{i + 1}" for i in range(C)]}
                writer = SplitWriter(path, meta)
            for row, col, img, lbl in cut_tiles(image, label, tile, overlap):
                info = {"label_file": label_path, "row": row, "col": col}
                if geo:
                    info["geo"] = shift_geotags(geo, row, col)
                writer.add(img, lbl, source=image_path, **info)
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        for d in new_dirs:  # deepest first; stop at the first folder that is not empty
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    return path


# -----------------------------------------------------------------------------
# OpenEarthMap-SAR (DFC2025 track 1) [layout verified: cliffbb/DFC2025-OEM-SAR-Baseline]

OEM_LAYOUT = """OpenEarthMap-SAR (DFC2025 track 1, Zenodo 14622048; layout of the official baseline):
  <root>/**/sar_images/<name>.tif   1-band uint8 SAR (display-stretched amplitude)
  <root>/**/labels/<name>.tif       1-band uint8: 0 unlabelled, 1 bareland, 2 grass, 3 pavement, 4 road,
                                    5 tree, 6 water, 7 cropland, 8 building
  sar_images/ folders without a labels/ sibling (the test split) are skipped.
  Output: unit amplitude (the uint8 values, not calibrated), channel SAR."""
OEM_NAMES = ("bareland", "grass", "pavement", "road", "tree", "water", "cropland", "building")  # values 1..8
# Grass -> other (?): low vegetation is neither forest nor crop. Pavement -> other (?): parking lots and
# plazas, not the road network. 0 unlabelled -> ignore.
OEM_TO_7 = {0: IGNORE, 1: 4, 2: 0, 3: 0, 4: 2, 5: 5, 6: 3, 7: 6, 8: 1}
OEM_NATIVE = {0: IGNORE, **{v: v - 1 for v in range(1, 9)}}


def convert_openearthmap_sar(root, out, split="train", tile=512, overlap=64, taxonomy="7class"):
    """OpenEarthMap-SAR -> out/<split>: (1, tile, tile) uint8 amplitude as float, labels per OEM_TO_7."""
    root = _check(root, taxonomy, tile, overlap)
    images = _find(root, "**/sar_images/*")
    labelled = [p for p in images if os.path.isdir(_sibling(p, "labels"))]
    if not labelled:
        raise FileNotFoundError(f"{root}: {len(images)} SAR images but no labels/ folder next to any sar_images/ "
                                f"(the OEM-SAR test split has no labels)")
    pairs = [(p, _label_path(p, _sibling(p, "labels"), _stem(p))) for p in labelled]
    mapping, names = _taxonomy(taxonomy, OEM_TO_7, OEM_NATIVE, OEM_NAMES)
    meta = _meta("OpenEarthMap-SAR", "convert_openearthmap_sar", root, taxonomy, mapping, names,
                 sensor="airborne + satellite X-band (Umbra/Capella class, unconfirmed)", band="X",
                 wavelength_m=X_BAND, polarizations=None, channels=["SAR"], unit="amplitude",
                 radiometry="display-stretched uint8, not calibrated", incidence_deg=None,
                 pixel_spacing_m=[0.15, 0.5], looks=None)
    return _write(out, split, meta, pairs, _dn_loader(mapping), tile, overlap)


# -----------------------------------------------------------------------------
# WHU-OPT-SAR [classes verified: AmberHen/WHU-OPT-SAR-dataset; folder names from community loaders]

WHU_LAYOUT = """WHU-OPT-SAR (GF-3 C-band, 5 m, 100 scenes of 5556x3704, map-sheet names like NH49E004021.tif):
  <root>/sar/<sheet>.tif   SAR amplitude DN
  <root>/lbl/<sheet>.tif   1-band uint8 in steps of 10: 0 background, 10 farmland, 20 city, 30 village,
                           40 water, 50 forest, 60 road, 70 others
  ASSUMED: the folder names sar/ and lbl/ come from community loaders; check against the real download.
  optical/ is not used. Output: unit amplitude (DN as stored), channel SAR (or band1..bandC)."""
WHU_NAMES = ("farmland", "city", "village", "water", "forest", "road", "others")  # values 10..70
# 0 background -> ignore (community mmseg loaders use reduce_zero_label, i.e. 0 is not a class).
# city and village -> building (?): both are built-up areas, not building footprints; others -> other.
WHU_TO_7 = {0: IGNORE, 10: 6, 20: 1, 30: 1, 40: 3, 50: 5, 60: 2, 70: 0}
WHU_NATIVE = {0: IGNORE, **{10 * (i + 1): i for i in range(7)}}


def convert_whu_opt_sar(root, out, split="train", tile=512, overlap=64, taxonomy="7class"):
    """WHU-OPT-SAR -> out/<split>: SAR amplitude DN as float, labels per WHU_TO_7 (value 40 -> water 3)."""
    root = _check(root, taxonomy, tile, overlap)
    pairs = [(p, _label_path(p, os.path.join(root, "lbl"), _stem(p))) for p in _find(root, "sar/*")]
    mapping, names = _taxonomy(taxonomy, WHU_TO_7, WHU_NATIVE, WHU_NAMES)
    meta = _meta("WHU-OPT-SAR", "convert_whu_opt_sar", root, taxonomy, mapping, names,
                 sensor="GF-3", band="C", wavelength_m=C_BAND, polarizations=None, channels=None,
                 unit="amplitude", radiometry="GF-3 DN as stored, not calibrated", incidence_deg=None,
                 pixel_spacing_m=5.0, looks=None)
    return _write(out, split, meta, pairs, _dn_loader(mapping), tile, overlap)


# -----------------------------------------------------------------------------
# FUSAR-Map [ASSUMED layout: from community loaders of the Google Drive zip, not from the authors]

FUSAR_LAYOUT = """FUSAR-Map (GF-3 single-pol, ~3 m, 1024x1024 tiles):
  <root>/SAR_1024/<city>_..._SAR_<n>.tif     SAR amplitude DN
  <root>/LAB_1024/<city>_..._Label_<n>.tif   RGB colours (black others, red building, green vegetation,
                                             blue water, yellow road) or 1-band ids 0..4 in that order
  <root>/<split>.txt                         optional: the SAR file names of the split
  ASSUMED: folder names, naming and colours come from community loaders, not from the authors; check
  against the real download. Output: unit amplitude (DN as stored), channel SAR."""
FUSAR_NAMES = ("others", "building", "vegetation", "water", "road")
FUSAR_PALETTE = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3, (255, 255, 0): 4}
# vegetation -> forest (?): FUSAR-Map does not separate trees from crops; others -> other.
FUSAR_TO_7 = {0: 0, 1: 1, 2: 5, 3: 3, 4: 2}
FUSAR_NATIVE = {i: i for i in range(5)}


def convert_fusar_map(root, out, split="train", tile=512, overlap=64, taxonomy="7class"):
    """FUSAR-Map -> out/<split>: SAR amplitude DN as float, colour or id labels per FUSAR_TO_7."""
    root = _check(root, taxonomy, tile, overlap)
    images = _keep_listed(_find(root, "SAR_1024/*"), os.path.join(root, f"{split}.txt"))
    pairs = [(p, _label_path(p, os.path.join(root, "LAB_1024"), _stem(p).replace("_SAR_", "_Label_"))) for p in images]
    mapping, names = _taxonomy(taxonomy, FUSAR_TO_7, FUSAR_NATIVE, FUSAR_NAMES)
    meta = _meta("FUSAR-Map", "convert_fusar_map", root, taxonomy, mapping, names,
                 sensor="GF-3", band="C", wavelength_m=C_BAND, polarizations=None, channels=None,
                 unit="amplitude", radiometry="GF-3 DN as stored, not calibrated", incidence_deg=None,
                 pixel_spacing_m=3.0, looks=None,
                 label_palette={",".join(map(str, rgb)): i for rgb, i in FUSAR_PALETTE.items()})
    return _write(out, split, meta, pairs, _dn_loader(mapping, FUSAR_PALETTE), tile, overlap)


# -----------------------------------------------------------------------------
# AIR-PolSAR-Seg-2.0 [ASSUMED layout: the dataset is distributed via Journal of Radars, naming unpublished]

AIRPOLSAR_LAYOUT = """AIR-PolSAR-Seg-2.0 (GF-3 QPSI L1A complex SLC, C-band, 8 m):
  <root>/**/<name>_HH.tif, _HV.tif, _VH.tif, _VV.tif   SLC per pol: 2 bands int16 (I, Q) or 1 complex band
  <root>/**/<name>_label.tif                           1-band ids: 0 water, 1 vegetation, 2 bare land,
                                                       3 building, 4 road, 5 mountain
  ASSUMED: the whole layout and the label values (naming is unpublished); check against the real download.
  Output (argument representation): amplitude = |I + jQ| of HH, HV, VH, VV (default, single look);
  complex = re, im of one pol (argument pol, default HH); real or imag = one component of one pol."""
AIRPOLSAR_NAMES = ("water", "vegetation", "bare_land", "building", "road", "mountain")
# vegetation -> forest (?): crops are not separated; mountain -> other (?): terrain, not land cover.
AIRPOLSAR_TO_7 = {0: 3, 1: 5, 2: 4, 3: 1, 4: 2, 5: 0}
AIRPOLSAR_NATIVE = {i: i for i in range(6)}
QUAD = ("HH", "HV", "VH", "VV")


def _slc(path):
    """A complex SLC file -> (H, W) complex64: 2 real bands (I, Q) or 1 complex band."""
    array, geo = _read(path)
    if array.shape[0] == 2 and array.dtype.kind in "iuf":
        return (array[0].astype(np.float32) + 1j * array[1].astype(np.float32)).astype(np.complex64), geo
    if array.shape[0] == 1 and array.dtype.kind == "c":
        return array[0].astype(np.complex64), geo
    raise ValueError(f"{path}: expected a complex SLC as 2 bands (I, Q) or 1 complex band, "
                     f"found {array.shape[0]} band(s) of {array.dtype}")


def convert_air_polsar_seg2(root, out, split="train", tile=512, overlap=64, taxonomy="7class",
                            representation="amplitude", pol="HH"):
    """AIR-PolSAR-Seg-2.0 -> out/<split>: (4, tile, tile) amplitude of HH HV VH VV, or (2, ...) re/im
    ("complex"), or (1, ...) "real" / "imag" of `pol`; SLC DN units (not calibrated), single look."""
    root = _check(root, taxonomy, tile, overlap)
    if representation not in ("amplitude", "complex", "real", "imag") or pol not in QUAD:
        raise ValueError(f"representation must be amplitude/complex/real/imag and pol one of {QUAD}, "
                         f"got {representation!r}, {pol!r}")
    pols = QUAD if representation == "amplitude" else (pol,)
    anchors = _find(root, f"**/*_{pols[0]}.*")
    pairs = [(p, _label_path(p, os.path.dirname(p), _stem(p)[:-len(pols[0])] + "label")) for p in anchors]
    mapping, names = _taxonomy(taxonomy, AIRPOLSAR_TO_7, AIRPOLSAR_NATIVE, AIRPOLSAR_NAMES)

    def load(anchor_path, label_path):
        zs, geo = [], {}
        for p in pols:
            path = anchor_path[:anchor_path.rfind(f"_{pols[0]}.")] + f"_{p}" + os.path.splitext(anchor_path)[1]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{anchor_path}: the {p} file {path} is missing")
            z, g = _slc(path)
            geo = geo or g
            if zs and z.shape != zs[0].shape:
                raise ValueError(f"{path}: size {z.shape} differs from {anchor_path} {zs[0].shape}")
            zs.append(z)
        z = np.stack(zs)  # (P, H, W) complex64
        image = {"amplitude": np.abs(z), "complex": np.concatenate([z.real, z.imag]),
                 "real": z.real, "imag": z.imag}[representation]
        label, _ = _read(label_path)
        return image.astype(np.float32), remap_labels(_label_ids(label, label_path), mapping, label_path), geo

    channels = {"amplitude": list(QUAD), "complex": ["re", "im"], "real": [pol], "imag": [pol]}[representation]
    meta = _meta("AIR-PolSAR-Seg-2.0", "convert_air_polsar_seg2", root, taxonomy, mapping, names,
                 sensor="GF-3 QPSI", band="C", wavelength_m=C_BAND, polarizations=list(pols), channels=channels,
                 unit=representation, radiometry="L1A SLC DN, not calibrated", incidence_deg=None,
                 pixel_spacing_m=8.0, looks=1)
    return _write(out, split, meta, pairs, load, tile, overlap)


# -----------------------------------------------------------------------------
# DDHR-SK (DDHRNet, Ren et al. 2022, Pohang / South Korea subset) [ASSUMED: community mmseg configs]

DDHR_LAYOUT = """DDHR-SK (DDHRNet GF-3 + GF-2 set, South-Korea / Pohang subset, SAR ~1 m):
  <root>/GF3/<id>.jpg|.tif      SAR, 8-bit grey
  <root>/label/<id>.png|.tif    1-band ids: 0 buildings, 1 roads, 2 greenery, 3 water, 4 farmland; 255 ignore
  <root>/<split>.txt            optional: the ids of the split (GF2/, the optical images, is not used)
  ASSUMED: from public mmseg configs for data/DDHR-DATA/korea, not from the authors; check against the real
  download. PNG/JPEG need the optional package imagecodecs. Output: unit amplitude (DN as stored)."""
DDHR_NAMES = ("buildings", "roads", "greenery", "water", "farmland")
# greenery -> forest (?): trees and grass together; there is no background class in this label set.
DDHR_TO_7 = {0: 1, 1: 2, 2: 5, 3: 3, 4: 6, IGNORE: IGNORE}
DDHR_NATIVE = {**{i: i for i in range(5)}, IGNORE: IGNORE}
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def convert_ddhr_sk(root, out, split="train", tile=512, overlap=64, taxonomy="7class"):
    """DDHR-SK -> out/<split>: GF-3 SAR DN as float, labels per DDHR_TO_7."""
    root = _check(root, taxonomy, tile, overlap)
    images = _keep_listed(_find(root, "GF3/*", IMAGE_EXTS), os.path.join(root, f"{split}.txt"))
    pairs = [(p, _label_path(p, os.path.join(root, "label"), _stem(p), (".png", ".tif", ".tiff"))) for p in images]
    mapping, names = _taxonomy(taxonomy, DDHR_TO_7, DDHR_NATIVE, DDHR_NAMES)
    meta = _meta("DDHR-SK", "convert_ddhr_sk", root, taxonomy, mapping, names,
                 sensor="GF-3 (paired with GF-2 optical)", band="C", wavelength_m=C_BAND, polarizations=None,
                 channels=None, unit="amplitude", radiometry="8-bit DN as stored, not calibrated",
                 incidence_deg=None, pixel_spacing_m=1.0, looks=None)
    return _write(out, split, meta, pairs, _dn_loader(mapping), tile, overlap)


# -----------------------------------------------------------------------------
# SARBuD 1.0 (GF-3 FSII built-up areas, Natl. Remote Sens. Bull. 2022) [ASSUMED layout: unpublished]

SARBUD_LAYOUT = """SARBuD 1.0 (GF-3 FSII, C-band, 10 m, built-up areas over China):
  <root>/[<split>/]image/<name>.tif        SAR amplitude DN, 1 or 2 bands of the dual-pol product
  <root>/[<split>/]label/<name>.tif|.png   0 non-built-up, 1 or 255 built-up
  ASSUMED: the whole layout (unpublished); images/ and labels/ are accepted too, and <root>/<split>/ is used
  when it exists. Check against the real download. Output: unit amplitude (DN as stored)."""
SARBUD_NAMES = ("non_built_up", "built_up")
# built-up -> building (?): built-up area includes streets and yards; 255 is read as built-up (0/255 masks).
SARBUD_TO_7 = {0: 0, 1: 1, 255: 1}
SARBUD_NATIVE = {0: 0, 1: 1, 255: 1}


def convert_sarbud(root, out, split="train", tile=512, overlap=64, taxonomy="7class"):
    """SARBuD 1.0 -> out/<split>: GF-3 amplitude DN as float, binary built-up labels."""
    root = _check(root, taxonomy, tile, overlap)
    base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    image_dir = next((d for d in ("image", "images") if os.path.isdir(os.path.join(base, d))), "image")
    label_dir = next((d for d in ("label", "labels") if os.path.isdir(os.path.join(base, d))), "label")
    pairs = [(p, _label_path(p, os.path.join(base, label_dir), _stem(p), (".tif", ".tiff", ".png")))
             for p in _find(base, f"{image_dir}/*", IMAGE_EXTS)]
    mapping, names = _taxonomy(taxonomy, SARBUD_TO_7, SARBUD_NATIVE, SARBUD_NAMES)
    meta = _meta("SARBuD-1.0", "convert_sarbud", root, taxonomy, mapping, names,
                 sensor="GF-3 FSII", band="C", wavelength_m=C_BAND, polarizations=None, channels=None,
                 unit="amplitude", radiometry="GF-3 DN as stored, not calibrated", incidence_deg=None,
                 pixel_spacing_m=10.0, looks=None)
    return _write(out, split, meta, pairs, _dn_loader(mapping), tile, overlap)


# -----------------------------------------------------------------------------
# Sen1Floods11 [layout verified: cloudtostreet/Sen1Floods11]

SEN1FLOODS11_LAYOUT = """Sen1Floods11 (Sentinel-1 IW GRD, hand-labelled chips, 512x512, 10 m, EPSG:4326):
  <root>/[v1.1/data/flood_events/]HandLabeled/S1Hand/<Country>_<chip>_S1Hand.tif
      2 bands float32 sigma0 in dB: VV, VH; NaNs occur
  <root>/[v1.1/data/flood_events/]HandLabeled/LabelHand/<Country>_<chip>_LabelHand.tif
      int16: -1 nodata, 0 not water, 1 water
  <root>/**/flood_handlabeled/flood_<split>_data.csv   the chips of the split (val = valid); all if absent
  NaN pixels get label 255 and each band's minimum finite value. Output: unit db, channels VV, VH."""
S1F_NAMES = ("not_water", "water")
# not water -> other: a water / non-water set; 7-class models trained on it learn "other" for all land.
S1F_TO_7 = {0: 0, 1: 3, IGNORE: IGNORE}  # the stored -1 (nodata) is turned into 255 first
S1F_NATIVE = {0: 0, 1: 1, IGNORE: IGNORE}


def convert_sen1floods11(root, out, split="train", tile=512, overlap=64, taxonomy="7class"):
    """Sen1Floods11 -> out/<split>: (2, tile, tile) VV, VH sigma0 in dB, water / not-water labels."""
    root = _check(root, taxonomy, tile, overlap)
    hand = next((os.path.join(root, d) for d in ("", "HandLabeled", "data/flood_events/HandLabeled",
                                                  "v1.1/data/flood_events/HandLabeled")
                 if os.path.isdir(os.path.join(root, d, "S1Hand"))), os.path.join(root, "HandLabeled"))
    lists = sorted(glob.glob(os.path.join(root, "**", "flood_handlabeled",
                                          f"flood_{'valid' if split == 'val' else split}_data.csv"), recursive=True))
    split_list = lists[0] if lists else None
    images = _keep_listed(_find(hand, "S1Hand/*_S1Hand.*"), split_list)
    pairs = [(p, _label_path(p, os.path.join(hand, "LabelHand"), _stem(p)[:-len("S1Hand")] + "LabelHand"))
             for p in images]
    mapping, names = _taxonomy(taxonomy, S1F_TO_7, S1F_NATIVE, S1F_NAMES)

    def load(image_path, label_path):
        image, geo = _read(image_path, bands=2)
        image = image.astype(np.float32)
        label = _label_ids(_read(label_path)[0], label_path)
        label = remap_labels(np.where(label == -1, IGNORE, label), mapping, label_path)
        return (*_mask_invalid(image, label, ~np.isfinite(image).all(0)), geo)

    meta = _meta("Sen1Floods11", "convert_sen1floods11", root, taxonomy, mapping, names,
                 sensor="Sentinel-1 IW GRD", band="C", wavelength_m=0.05547, polarizations=["VV", "VH"],
                 channels=["VV", "VH"], unit="db", radiometry="calibrated sigma0 dB (GEE)",
                 incidence_deg=[29.0, 46.0], pixel_spacing_m=10.0, looks=4.4,
                 split_list=split_list)
    return _write(out, split, meta, pairs, load, tile, overlap)


# -----------------------------------------------------------------------------
# SpaceNet 6 (MSAW) [layout verified: TorchGeo SpaceNet6 and its test tree]

SPACENET6_LAYOUT = """SpaceNet 6 (Capella airborne X-band, quad-pol, 0.5 m, Rotterdam, 900x900 tiles):
  <root>/**/SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_<t0>_<t1>_tile_<n>.tif
      4 bands float32 HH, HV, VH, VV, dB-scaled intensity, 0 = nodata
  <root>/**/geojson_buildings/SN6_Train_AOI_11_Rotterdam_Buildings_<t0>_<t1>_tile_<n>.geojson
      building polygons in the image's CRS, or lon/lat over a UTM image; rasterised at pixel centres
  SAR-Intensity/ folders without a geojson_buildings/ sibling (test_public) are skipped. Nodata pixels get
  label 255 and each band's minimum valid value. Output: unit db, channels HH, HV, VH, VV."""
SN6_NAMES = ("background", "building")
SN6_REMAP = {"outside": 0, "building": 1, "nodata": IGNORE}


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


def _geokeys(geo):
    """{GeoKey id: value} of the GeoKeyDirectory's short-valued keys."""
    d = geo.get("GeoKeyDirectory") or []
    return {int(d[i]): int(d[i + 3]) for i in range(4, len(d) - 3, 4) if d[i + 1] == 0}


def _geojson_polygons(path, geo, image_path):
    """Polygons of a GeoJSON file as lists of (N, 2) rings in the pixel coordinates of the image."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read GeoJSON ({e})") from e
    name = ((doc.get("crs") or {}).get("properties") or {}).get("name", "CRS84")  # RFC 7946 default: lon/lat
    code = name.rsplit(":", 1)[-1]
    src = 4326 if name.endswith("CRS84") else int(code) if code.isdigit() else None
    keys = _geokeys(geo)
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
    for feature in doc.get("features", []):
        g = feature.get("geometry") or {}
        if g.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points and lines carry no area
        for rings in [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]:
            rings = [np.asarray(r, np.float64)[:, :2] for r in rings]
            polygons.append([to_pixel(r if to_crs is None else to_crs(r)) for r in rings])
    return polygons


def convert_spacenet6(root, out, split="train", tile=512, overlap=64, taxonomy="7class"):
    """SpaceNet 6 -> out/<split>: (4, tile, tile) HH, HV, VH, VV in dB, building / other labels."""
    root = _check(root, taxonomy, tile, overlap)
    images = _find(root, "**/SAR-Intensity/*")
    images = [p for p in images if os.path.isdir(_sibling(p, "geojson_buildings"))]
    if not images:
        raise FileNotFoundError(f"{root}: no SAR-Intensity/ folder with a geojson_buildings/ sibling "
                                f"(test_public has no labels)")
    pairs = [(p, _label_path(p, _sibling(p, "geojson_buildings"), _stem(p).replace("_SAR-Intensity_", "_Buildings_"),
                             (".geojson",))) for p in images]
    names = list(CLASSES_7) if taxonomy == "7class" else list(SN6_NAMES)  # building = 1 in both

    def load(image_path, label_path):
        image, geo = _read(image_path, bands=4)
        image = image.astype(np.float32)
        if not np.isfinite(image).all():
            raise ValueError(f"{image_path}: {int((~np.isfinite(image)).sum())} NaN or infinite pixels "
                             f"(SpaceNet 6 marks nodata with 0, not NaN)")
        label = rasterize_polygons(_geojson_polygons(label_path, geo, image_path), image.shape[1:])
        nodata = float(geo["GDAL_NODATA"].strip("\0 ")) if geo.get("GDAL_NODATA") else 0.0
        return (*_mask_invalid(image, label, (image == nodata).all(0)), geo)

    meta = _meta("SpaceNet6", "convert_spacenet6", root, taxonomy, SN6_REMAP, names,
                 sensor="Capella / Metasensing airborne X-band", band="X", wavelength_m=X_BAND,
                 polarizations=list(QUAD), channels=list(QUAD), unit="db",
                 radiometry="SAR-Intensity, dB-scaled (secondary source)", incidence_deg=None,
                 pixel_spacing_m=0.5, looks=None)
    return _write(out, split, meta, pairs, load, tile, overlap)


# -----------------------------------------------------------------------------
# The table prepare.py dispatches on, and the layout text it prints in --help

CONVERTERS = {
    "openearthmap_sar": convert_openearthmap_sar,
    "whu_opt_sar": convert_whu_opt_sar,
    "fusar_map": convert_fusar_map,
    "air_polsar_seg2": convert_air_polsar_seg2,
    "ddhr_sk": convert_ddhr_sk,
    "sarbud": convert_sarbud,
    "sen1floods11": convert_sen1floods11,
    "spacenet6": convert_spacenet6,
}
LAYOUT = {
    "openearthmap_sar": OEM_LAYOUT,
    "whu_opt_sar": WHU_LAYOUT,
    "fusar_map": FUSAR_LAYOUT,
    "air_polsar_seg2": AIRPOLSAR_LAYOUT,
    "ddhr_sk": DDHR_LAYOUT,
    "sarbud": SARBUD_LAYOUT,
    "sen1floods11": SEN1FLOODS11_LAYOUT,
    "spacenet6": SPACENET6_LAYOUT,
}
