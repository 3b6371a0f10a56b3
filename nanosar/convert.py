"""
Converters from the published on-disk layouts of 8 real SAR segmentation datasets into nanosar's
prepared-split format (nanosar/data.py): one function per dataset, read top to bottom.

    convert_<name>(root, out, split="train", tile=512, overlap=64, taxonomy="7class", split_list=None)
        -> out/<split>

Each converter's docstring is its reference, printed by `prepare.py --help`: the layout it expects, the
public source of that layout, what is still unverified, and the unit it writes. The converter holds only
its dataset's specifics (which files pair with which, how to read them); everything else is the same for
all and lives in convert(): check the arguments, find the files, pick the label table, build meta.json
from the dataset's facts (a Source), read each pair, give label 255 to no-data pixels, check the values
are plausible for the unit, cut tiles with overlap (a scene smaller than a tile is padded, label 255) and
write them with SplitWriter, GeoTIFF tags shifted to each tile. Any error is one line naming the file,
and leaves nothing behind. meta.json's "report" says what was dropped (no-data pixels, unmatched label
colours) and which split list was used.

Units (nanosar/units.py): values that are not calibrated (GF-3 digital numbers, 8-bit display stretches)
are written as unit "dn" with "dn_scale": null, never as "amplitude"; none of these releases ships the
calibration constants. In a magnitude unit (dn, amplitude, intensity) a pixel that is 0, or the file's
GDAL_NODATA, in every channel is no-data (a scene's zero-filled border): it gets label 255 and value 0.

taxonomy="7class" maps every dataset to the CrossEarth-SAR pre-training classes CLASSES_7 = (0 other,
1 building, 2 road, 3 water, 4 bare_land, 5 forest, 6 cropland; 255 ignore); taxonomy="native" keeps the
dataset's own classes (ids 0..K-1 in the order of its class list). The tables sit next to each converter;
entries marked (?) are judgement calls, explained there. Unknown label values raise, so a wrong guess
about a layout fails loudly. Folder and file names are matched case-insensitively; zip debris
(__MACOSX/, ._*) is skipped.
"""

import hashlib
import inspect
import os
import re
from dataclasses import asdict, dataclass

import numpy as np

from nanosar.data import (CLASSES_7, IGNORE, SplitWriter, colours_to_ids, cut_tiles, label_ids, nearest_colours,
                          remap_labels)
from nanosar.geotiff import geojson_polygons, parse_nodata, rasterize_polygons, read_image, shift_geotags
from nanosar.units import check_plausible, nodata_mask

TAXONOMIES = ("7class", "native")
F16_MAX = float(np.finfo(np.float16).max)  # 65504: larger uint16 DN would overflow the split's float16
C_BAND, X_BAND = 0.0555, 0.0311  # wavelengths in m: GF-3 / Sentinel-1 (5.4 GHz), Capella / Umbra (9.65 GHz)
TIFF_EXTS, IMAGE_EXTS = (".tif", ".tiff"), (".tif", ".tiff", ".png", ".jpg", ".jpeg")
SPLITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")  # official lists shipped here


@dataclass(frozen=True)
class Source:
    """What meta.json says about a dataset's pixels, and its two label tables ({value on disk: class id})."""
    dataset: str
    sensor: str
    band: str
    wavelength_m: float
    unit: str                     # nanosar.units.UNITS; "dn" = not calibrated (dn_scale null)
    radiometry: str               # how the values were made, in words
    pixel_spacing_m: object       # metres, or [finest, coarsest]
    names: tuple                  # native class names, ids 0..K-1
    to_7: dict                    # value -> CLASSES_7 id (255 = ignore)
    native: dict                  # value -> native id (255 = ignore)
    polarizations: tuple = None   # None = unknown
    channels: tuple = None        # None: "SAR" for 1 band, band1..bandC (from the first scene)
    incidence_deg: tuple = None
    looks: float = None
    check_values: bool = True     # refuse values implausible for the unit (units.check_plausible)


# -----------------------------------------------------------------------------
# What every converter shares


def convert(source, root, out, split, tile, overlap, taxonomy, pairs, load, split_list=None, report=None,
            official=None, **meta):
    """Convert one dataset into out/<split>; returns the split's path.

    pairs(root) -> [(image path, label path)]: the dataset's files, found under the checked, absolute root.
    load(image path, label path, mapping) -> (image (C, H, W) float32 in source.unit, label (H, W) class ids
    after `mapping`, GeoTIFF tags, invalid (H, W) bool or None: pixels the loader found to be no-data).
    split_list: a text file naming the images of the split (first field of each line, its stem; a list
    with "train:" / "test:" sections is read at section `split`); None = every image. official: where the
    dataset's official split lists are, for datasets that have them: then a split other than "all" without
    its list is an error (it would silently hold every image, the other splits' too). report: a dict the
    loader may fill, stored as meta.json "report". meta: meta.json fields added to or overriding source's.
    meta.json "split_source" records what made the split: the list's file name and sha256, or every image.
    """
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"taxonomy must be one of {TAXONOMIES}, got {taxonomy!r}")
    if split == "all" and split_list is not None:
        raise ValueError(f"--split all takes every image, but a split list was given ({split_list}): name the "
                         f"split the list is for")
    if split != "all" and split_list is None and official is not None:
        raise FileNotFoundError(f"split {split!r} of {source.dataset} needs its list of images: {official}; give "
                                f"one with --split-list FILE, or take every image with --split all")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist; give the folder of the downloaded dataset "
                                f"(prepare.py --root)")
    report = {} if report is None else report
    found = pairs(root)
    if split_list is not None:
        names = read_list(split_list, split)
        found = [(image, label) for image, label in found if stem(image).lower() in names]
        report["split_list"] = {"path": split_list, "listed": len(names), "found": len(found)}
        if not found:
            raise FileNotFoundError(f"{split_list}: none of its {len(names)} files of split {split!r} is under {root}")
    mapping, names = (source.to_7, CLASSES_7) if taxonomy == "7class" else (source.native, source.names)
    converter = inspect.currentframe().f_back.f_code.co_name                # the calling convert_<name>
    facts = {k: v for k, v in asdict(source).items() if k not in ("names", "to_7", "native", "check_values")}
    meta = {**facts, "class_names": list(names), "split_list": split_list, "split_source": split_source(split_list),
            "provenance": {"root": root, "converter": converter, "taxonomy": taxonomy,
                           "label_remap": {str(k): int(v) for k, v in mapping.items()}},
            **({"dn_scale": None} if source.unit == "dn" else {}), **meta}
    return write_split(out, split, meta, found, lambda i, lbl: load(i, lbl, mapping), tile, overlap,
                       report, source.check_values)


def write_split(out, split, meta, pairs, load, tile, overlap, report, check_values=True):
    """Read each (image, label) pair with load(image, label) (see convert), give label 255 to no-data
    pixels (the loader's, and units.nodata_mask's: not finite, or 0 / GDAL_NODATA in every channel of a
    magnitude unit) and set them to 0 (dB: the band's minimum), check the values suit the unit, tile the
    scene and append the tiles to out/<split>. meta["channels"] None is filled from the first scene. On any
    error nothing is left on disk."""
    path = os.path.join(out, split)
    new_dirs, d = [], os.path.abspath(out)  # folders this call creates, removed again on failure
    while not os.path.exists(d):
        new_dirs.append(d)
        d = os.path.dirname(d)
    writer, report["nodata_pixels"] = None, 0
    try:
        for image_path, label_path in pairs:
            image, label, geo, invalid = load(image_path, label_path)
            if image.shape[1:] != label.shape:
                raise ValueError(f"{image_path}: image size {image.shape[1:]} does not match the size "
                                 f"{label.shape} of its label {label_path}")
            nodata = nodata_mask(image, meta["unit"], parse_nodata(geo.get("GDAL_NODATA")))
            invalid = nodata if invalid is None else nodata | invalid
            if meta["unit"] == "db":
                fill_invalid(image, invalid)     # 0 dB is a value: the band's darkest valid value instead
            else:
                image[:, invalid] = 0            # 0 is no-data in magnitude units (and 0 + 0j in complex ones)
            if check_values:
                check_plausible(image, meta["unit"], image_path)
            report["nodata_pixels"] += int((invalid & (label != IGNORE)).sum())
            label[invalid] = IGNORE
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
        if writer is None:
            raise FileNotFoundError(f"no image of split {split!r} was found")
        writer.meta["report"] = report
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


def stem(path):
    """File name without its extension: stem("a/b/NH49E004021.tif") = "NH49E004021"."""
    return os.path.splitext(os.path.basename(path))[0]


def find(root, pattern, exts=IMAGE_EXTS, required=True):
    """Sorted files under root whose path relative to root matches the glob `pattern` (* = any name part,
    ** = any folders) case-insensitively and whose name ends with one of `exts`; zip debris (__MACOSX/,
    ._*) is skipped. None found is FileNotFoundError naming root, unless required=False."""
    regex = re.compile("".join({"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(p, re.escape(p))
                               for p in re.split(r"(\*\*/|\*|\?)", pattern)), re.IGNORECASE)
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "__MACOSX"]
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if not name.startswith("._") and name.lower().endswith(exts) and regex.fullmatch(rel):
                files.append(os.path.join(folder, name))
    if required and not files:
        raise FileNotFoundError(f"{root}: no files matching {pattern} with extension {'/'.join(exts)}; is this the "
                                f"right folder and layout? (see prepare.py --help)")
    return sorted(files)


def subfolder(parent, *names):
    """The folder in `parent` named one of `names` (case-insensitive), or None."""
    if not os.path.isdir(parent):
        return None
    wanted = [n.lower() for n in names]
    found = {d.lower(): d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))}
    return next((os.path.join(parent, found[n]) for n in wanted if n in found), None)


def files_by_name(folder):
    """{lower-case file name: path} of the files in `folder` ({} if it is None or missing)."""
    if folder is None or not os.path.isdir(folder):
        return {}
    return {f.lower(): os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith("._")}


def pick(files, stems, exts, image, folder, what="label"):
    """The first of stem + ext (in the order given) in files ({lower-case name: path}, files_by_name);
    FileNotFoundError naming the image and the `what` it expected otherwise."""
    for s in stems:
        for ext in exts:
            if (s + ext).lower() in files:
                return files[(s + ext).lower()]
    raise FileNotFoundError(f"{image} has no {what}: expected {os.path.join(str(folder), stems[0] + exts[0])}")


def label_beside(image, folders, stems, exts, cache):
    """The label of `image` in the folder beside the image's own folder named one of `folders`
    (a/sar/x.tif -> a/lbl/x.*); cache: a dict kept across the images of one conversion."""
    parent = os.path.dirname(os.path.dirname(image))
    if parent not in cache:
        folder = subfolder(parent, *folders)
        cache[parent] = (folder or os.path.join(parent, folders[0]), files_by_name(folder))
    folder, files = cache[parent]
    return pick(files, stems, exts, image, folder)


def has_beside(image, folder):
    """True if the image's folder has a sibling folder named `folder` (case-insensitive)."""
    return subfolder(os.path.dirname(os.path.dirname(image)), folder) is not None


def fill_invalid(image, invalid):
    """Give the invalid pixels (H, W) of every band of image (C, H, W) that band's minimum valid value (0 if
    none): finite values at the dark end of the scene, for dB where 0 is a value. In place."""
    for band in image:
        band[invalid] = band[~invalid].min() if (~invalid).any() else 0.0
    return image


def split_source(split_list):
    """meta.json "split_source": the file name and sha256 of the list that made a split, or every image."""
    if split_list is None:
        return {"list": None, "images": "every image under the dataset folder"}
    with open(split_list, "rb") as f:
        return {"list": os.path.basename(split_list), "sha256": hashlib.sha256(f.read()).hexdigest()}


def read_list(path, section=None):
    """Lower-case stems of the files a split list names: first field (comma- or space-separated) of each
    line. A list with "<name>:" section lines (WHU-OPT-SAR's division) gives only section `section`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: split list not found (give one with --split-list)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text list of file names ({e})") from e
    if any(line.endswith(":") for line in lines):
        heads = [i for i, line in enumerate(lines) if line.endswith(":")] + [len(lines)]
        sections = {lines[a][:-1].strip().lower(): lines[a + 1:b] for a, b in zip(heads, heads[1:])}
        if section not in sections:
            raise ValueError(f"{path}: no section {section!r}; it has {sorted(sections)}")
        lines = sections[section]
    return {stem(re.split(r"[,\s]", line)[0]).lower() for line in lines}


def gray(array):
    """(C, H, W) -> (1, H, W) when a grey image was stored as RGB (3 equal bands, within 2 DN for JPEG)."""
    if array.shape[0] == 3 and all(np.abs(b.astype(np.int32) - array[0]).max() <= 2 for b in array[1:]):
        return array[:1]
    return array


def load_single_band_file(image_path, label_path, mapping, palette=None, bands=None):
    """A SAR file (grey stored as RGB -> 1 band) and a label of values (or RGB colours, with `palette`)
    -> (image float32, label ids after mapping, GeoTIFF tags, None) for convert(). uint16 DN above 65504
    (saturated) are clipped to the float16 maximum."""
    image, geo = read_image(image_path)
    image = gray(image)
    if bands is not None and image.shape[0] != bands:
        raise ValueError(f"{image_path}: expected {bands} band(s), found {image.shape[0]}")
    label, _ = read_image(label_path)
    ids = colours_to_ids(label[:3], palette, label_path) if palette and label.shape[0] in (3, 4) else \
        label_ids(label, label_path)
    return np.minimum(image.astype(np.float32), F16_MAX), remap_labels(ids, mapping, label_path), geo, None


# -----------------------------------------------------------------------------
# OpenEarthMap-SAR (DFC2025 track 1)

OEM = Source(
    "OpenEarthMap-SAR", "airborne + satellite X-band (Umbra/Capella class, unconfirmed)", "X", X_BAND, "dn",
    "display-stretched uint8, not calibrated", [0.15, 0.5],
    names=("bareland", "grass", "pavement", "road", "tree", "water", "cropland", "building"),  # values 1..8
    # Grass -> other (?): low vegetation is neither forest nor crop. Pavement -> other (?): parking lots and
    # plazas, not the road network. 0 unlabelled -> ignore.
    to_7={0: IGNORE, 1: 4, 2: 0, 3: 0, 4: 2, 5: 5, 6: 3, 7: 6, 8: 1},
    native={0: IGNORE, **{v: v - 1 for v in range(1, 9)}}, channels=("SAR",))


def convert_openearthmap_sar(root, out, split="train", tile=512, overlap=64, taxonomy="7class", split_list=None):
    """OpenEarthMap-SAR (DFC2025 track 1, Zenodo 14622048), 1024x1024 tiles:
      <root>/**/sar_images/<name>.tif   1-band uint8 SAR (display-stretched)
      <root>/**/labels/<name>.tif       1-band uint8: 0 unlabelled, 1 bareland, 2 grass, 3 pavement, 4 road,
                                        5 tree, 6 water, 7 cropland, 8 building
    sar_images/ folders without a labels/ sibling (the test split) are skipped.
    Source: the official baseline cliffbb/DFC2025-OEM-SAR-Baseline (globs */labels/* and swaps in
    sar_images). No official validation split (the baseline draws its own 90/10): give --split-list.
    Output: unit dn (the uint8 stretch, dn_scale null), channel SAR; 0 = no-data."""
    def pairs(root):
        images, cache = [p for p in find(root, "**/sar_images/*", TIFF_EXTS) if has_beside(p, "labels")], {}
        if not images:
            raise FileNotFoundError(f"{root}: no sar_images/ folder with a labels/ sibling (the OEM-SAR test split "
                                    f"has no labels)")
        return [(p, label_beside(p, ["labels"], [stem(p)], TIFF_EXTS, cache)) for p in images]
    return convert(OEM, root, out, split, tile, overlap, taxonomy, pairs, load_single_band_file, split_list)


# -----------------------------------------------------------------------------
# WHU-OPT-SAR

WHU = Source(
    "WHU-OPT-SAR", "GF-3", "C", C_BAND, "dn", "GF-3 values as distributed (bit depth and stretch unverified), "
    "not calibrated", 5.0,
    names=("farmland", "city", "village", "water", "forest", "road", "others"),  # values 10..70
    # 0 background -> ignore (community mmseg loaders use reduce_zero_label, i.e. 0 is not a class).
    # city and village -> building (?): both are built-up areas, not building footprints; others -> other.
    to_7={0: IGNORE, 10: 6, 20: 1, 30: 1, 40: 3, 50: 5, 60: 2, 70: 0},
    native={0: IGNORE, **{10 * (i + 1): i for i in range(7)}})
WHU_DIVISION = os.path.join(SPLITS, "whu_opt_sar_division.txt")


def convert_whu_opt_sar(root, out, split="train", tile=512, overlap=64, taxonomy="7class", split_list=None):
    """WHU-OPT-SAR (GF-1 optical + GF-3 SAR, 5 m, 100 map sheets of 5556x3704 px, Hubei):
      <root>/sar/<sheet>.tif   SAR values (e.g. NH49E004021.tif)
      <root>/lbl/<sheet>.tif   1-band uint8 in steps of 10: 0 background, 10 farmland, 20 city, 30 village,
                               40 water, 50 forest, 60 road, 70 others   (label/ or labels/ accepted too)
    --split train / test: the official 80 / 20 division (AmberHen/WHU-OPT-SAR-dataset "The division of the
    dataset.txt", shipped as nanosar/splits/whu_opt_sar_division.txt); --split all: every sheet; any other
    name needs --split-list.
    Source: class values from AmberHen/WHU-OPT-SAR-dataset. UNVERIFIED: the folder names sar/ and lbl/
    (community loaders; the download is a Baidu / Google Drive archive) and the SAR's bit depth.
    optical/ is not used. Output: unit dn (dn_scale null), channel SAR (or band1..bandC); 0 = no-data."""
    def pairs(root):
        cache = {}
        return [(p, label_beside(p, ["lbl", "label", "labels"], [stem(p)], TIFF_EXTS, cache))
                for p in find(root, "sar/*", TIFF_EXTS)]
    if split_list is None and split in ("train", "test"):
        split_list = WHU_DIVISION
    return convert(WHU, root, out, split, tile, overlap, taxonomy, pairs, load_single_band_file, split_list,
                   official=f"the official division has train and test ({WHU_DIVISION})")


# -----------------------------------------------------------------------------
# FUSAR-Map

# The authors' colours. Red, green, blue, yellow: the legend of their label generation code (fudanxu/FUSAR-Map
# "FUSAR-Map generation/三、图像标签化/test_vegetation.m": building [255,0,0], veg [0,255,0], water [0,0,255],
# road [255,255,0]); black is what none of the four covers, which their training code names bare land
# (Model/FUSAR-Map/Unet_whole.py, one_hot_lab: bare_land = [0,0,0], merged into vegetation for its 4-class
# models). nanosar keeps it as its own class, bare land, as the authors name it.
FUSAR_PALETTE = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3, (255, 255, 0): 4}
FUSAR = Source(
    "FUSAR-Map", "GF-3", "C", C_BAND, "dn", "8-bit display stretch, not calibrated", 1.02,
    names=("bare_land", "building", "vegetation", "water", "road"),
    # vegetation -> forest (?): FUSAR-Map does not separate trees from crops.
    to_7={0: 4, 1: 1, 2: 5, 3: 3, 4: 2}, native={i: i for i in range(5)})


def convert_fusar_map(root, out, split="train", tile=512, overlap=64, taxonomy="7class", split_list=None):
    """FUSAR-Map (GF-3 single-pol, geocoded at about 1.02 m, 1024x1024 tiles; Google Drive zip):
      <root>/SAR_1024/<name>_SAR_<n>.tif     8-bit SAR, display-stretched (sar_1024/ too)
      <root>/LAB_1024/<name>_Label_<n>.tif   RGB colours: black bare land, red building, green vegetation,
                                             blue water, yellow road; or 1-band ids 0..4 (lab_1024/ too)
      <root>/<split>.txt                     optional: the SAR file names of the split
    Source: the colours of the authors' label generation code (fudanxu/FUSAR-Map, "FUSAR-Map generation/"
    test_vegetation.m: red building, green vegetation, blue water, yellow road) and of their training code
    (Model/FUSAR-Map/Unet_whole.py, one_hot_lab), which names black, what none of the four covers, bare land:
    7-class ids bare_land 4, building 1, vegetation -> forest 5 (?), water 3, road 2.
    UNVERIFIED: the label file naming (_SAR_ -> _Label_ or _LAB_, or the same name) and the split lists;
    which polarization the tiles hold. Output: unit dn (dn_scale null), channel SAR; 0 = no-data."""
    def pairs(root):
        cache = {}
        swap = lambda s, new: re.sub("_sar_", f"_{new}_", s, flags=re.IGNORECASE)  # noqa: E731
        return [(p, label_beside(p, ["LAB_1024", "label_1024"], [swap(stem(p), "Label"), swap(stem(p), "LAB"),
                                                                 stem(p)], IMAGE_EXTS, cache))
                for p in find(root, "sar_1024/*")]
    listed = os.path.join(root, f"{split}.txt")
    if split_list is None and os.path.isfile(listed):
        split_list = listed

    def load(image_path, label_path, mapping):
        return load_single_band_file(image_path, label_path, mapping, FUSAR_PALETTE)

    return convert(FUSAR, root, out, split, tile, overlap, taxonomy, pairs, load, split_list,
                   label_palette={",".join(map(str, rgb)): i for rgb, i in FUSAR_PALETTE.items()})


# -----------------------------------------------------------------------------
# AIR-PolSAR-Seg-2.0

QUAD = ("HH", "HV", "VH", "VV")
# Colour -> native class id. NOT PUBLISHED: a guess, to be checked on the data (meta.json "report" gives
# each colour's pixel count and mean amplitude per scene: water is the darkest). Water cyan, vegetation
# green and building yellow follow AIR-PolSAR-Seg v1's palette (same producer, AIRCAS: water cyan, natural
# green, housing yellow); magenta is found only on the Beijing scene, whose west is mountains; red and blue
# are bare land and road by elimination (?). White is the unlabelled border, black unlabelled.
AIRPOLSAR_PALETTE = {
    (0, 255, 255): 0,        # cyan     water
    (0, 255, 0): 1,          # green    vegetation
    (255, 0, 0): 2,          # red      bare land (?)
    (255, 255, 0): 3,        # yellow   building
    (0, 0, 255): 4,          # blue     road (?)
    (255, 0, 255): 5,        # magenta  mountain
    (255, 255, 255): IGNORE,  # white    unlabelled border
    (0, 0, 0): IGNORE,       # black    unlabelled
}
COLOUR_TOLERANCE = 40  # a label pixel takes the nearest palette colour when no channel differs by more
AIRPOLSAR = Source(
    "AIR-PolSAR-Seg-2.0", "GF-3 QPSI", "C", C_BAND, "dn", "L1A SLC digital numbers, not calibrated", 8.0,
    names=("water", "vegetation", "bare_land", "building", "road", "mountain"),
    # vegetation -> forest (?): crops are not separated; mountain -> other (?): terrain, not land cover.
    to_7={0: 3, 1: 5, 2: 4, 3: 1, 4: 2, 5: 0, IGNORE: IGNORE},
    native={**{i: i for i in range(6)}, IGNORE: IGNORE}, polarizations=QUAD, channels=QUAD, looks=1)


def convert_air_polsar_seg2(root, out, split="train", tile=512, overlap=64, taxonomy="7class", split_list=None,
                            representation="amplitude", pol="HH", scenes=None):
    """AIR-PolSAR-Seg-2.0 (GF-3 QPSI L1A single-look complex, C-band, 8 m; 3 scenes: Beijing, Shanghai,
    Guangzhou; the paper cuts 24,672 tiles of 512x512 and names 6 classes: water, vegetation, bare land,
    building, road, mountain):
      <root>/**/<tag>_{hh,hv,vh,vv}.tiff          tag bj, sh or gz; 2-band int16 (real, imaginary)
      <root>/**/modified/<tag>*_gt_modify.tiff    RGB label (else *_gt.tiff, here or in the scene folder)
    modified/ also holds uint8 renderings (amplitude, phase, ...), not used. Label colours: white is the
    unlabelled border; compression left thousands of near-duplicate colours (Shanghai): a pixel takes the
    nearest colour of AIRPOLSAR_PALETTE within COLOUR_TOLERANCE (40) per channel, other colours -> 255,
    counted in meta.json "report". WHICH COLOUR IS WHICH CLASS IS NOT PUBLISHED: AIRPOLSAR_PALETTE is a
    guess (see its comment); check the report's per-colour mean amplitudes before trusting class names.
    Source: the public reader m-peker/rotation-equivariant-polsar research/air2.py (files, bands, colours).
    No official split: --scenes bj,sh picks scenes (a cross-city split), --split only names the output.
    Output: unit dn, |re + j im| of HH, HV, VH, VV (representation amplitude, the default; DN: no
    calibration constants ship with the data, dn_scale null); or unit complex = re, im of `pol`, real /
    imag = one part of `pol` (DN). No-data: re = im = 0 in all four polarizations. Memory: the whole scene,
    about 40 bytes per pixel at the peak (4 GB for 10,000 x 10,000 pixels)."""
    if representation not in ("amplitude", "complex", "real", "imag") or pol not in QUAD:
        raise ValueError(f"representation must be amplitude/complex/real/imag and pol one of {QUAD}, "
                         f"got {representation!r}, {pol!r}")
    scenes = scenes.split(",") if isinstance(scenes, str) else scenes
    wanted = None if scenes is None else {s.strip().lower() for s in scenes}
    report = {"colour_tolerance": COLOUR_TOLERANCE, "labels": {}}

    def pairs(root):
        anchors = [p for p in find(root, "**/*_hh.*", TIFF_EXTS)                 # not the renderings in modified/
                   if "modified" not in os.path.relpath(p, root).lower().split(os.sep)[:-1]]
        anchors = [p for p in anchors if wanted is None or stem(p)[:-3].lower() in wanted]
        if not anchors:
            raise FileNotFoundError(f"{root}: no <tag>_hh.tiff scene" + (f" of {sorted(wanted)}" if wanted else ""))
        return [(p, air_label(p)) for p in anchors]

    def load(anchor, label_path, mapping):
        folder, tag = os.path.dirname(anchor), stem(anchor)[:-3]
        files, invalid, planes, hh = files_by_name(folder), None, [], None
        for p in QUAD:
            path = pick(files, [f"{tag}_{p.lower()}"], (".tiff", ".tif"), anchor, folder, f"{p} file")
            z, geo = slc(path)                                            # (2, H, W) float32 re, im
            hh = np.hypot(z[0], z[1]) if hh is None else hh               # (H, W) |z| of HH, for the report
            if z.shape[1:] != hh.shape:
                raise ValueError(f"{path}: size {z.shape[1:]} differs from {anchor} {hh.shape}")
            zero = (z == 0).all(0)                                        # re = im = 0
            invalid = zero if invalid is None else invalid & zero
            if representation == "amplitude":
                planes.append(np.hypot(z[0], z[1])[None])                 # (1, H, W) |re + j im|
            elif p == pol:
                planes.append({"complex": z, "real": z[:1], "imag": z[1:]}[representation])
        image = np.concatenate(planes)                                    # (4, H, W) |z|, (2, H, W) re, im, ...
        rgb, _ = read_image(label_path)
        if rgb.shape[0] not in (3, 4):
            raise ValueError(f"{label_path}: expected an RGB label, found {rgb.shape[0]} band(s)")
        values, per_colour, unmatched = nearest_colours(rgb[:3], AIRPOLSAR_PALETTE, COLOUR_TOLERANCE)
        if values.shape != hh.shape:
            raise ValueError(f"{label_path}: label size {values.shape} does not match the scene {anchor} {hh.shape}")
        pixels = np.bincount(values.ravel(), minlength=256)
        means = np.bincount(values.ravel(), weights=hh.ravel(), minlength=256) / np.maximum(pixels, 1)
        report["labels"][label_path] = {
            "unmatched_pixels": unmatched,
            "pixels_per_colour": {colour_name(c): int(n) for c, n in zip(AIRPOLSAR_PALETTE, per_colour)},
            "mean_hh_amplitude_per_class": {class_name(v): round(float(means[v]), 2)
                                            for v in sorted(set(AIRPOLSAR_PALETTE.values())) if pixels[v]}}
        return image, remap_labels(values, mapping, label_path), geo, invalid

    channels = {"amplitude": QUAD, "complex": ("re", "im"), "real": (pol,), "imag": (pol,)}[representation]
    unit = "dn" if representation == "amplitude" else representation
    return convert(AIRPOLSAR, root, out, split, tile, overlap, taxonomy, pairs, load, split_list, report,
                   channels=list(channels), unit=unit, polarizations=list(QUAD if unit == "dn" else (pol,)),
                   label_palette={",".join(map(str, c)): v for c, v in AIRPOLSAR_PALETTE.items()})


def air_label(anchor):
    """The RGB label of the AIR-PolSAR-Seg-2.0 scene whose HH file is `anchor`: in modified/ or beside it,
    *_gt_modify.tif(f) before *_gt.tif(f), the one named after the scene's tag first."""
    folder, tag = os.path.dirname(anchor), stem(anchor)[:-3].lower()
    for pattern in (r".*_gt_modify\.tiff?", r".*_gt\.tiff?"):
        for where in (subfolder(folder, "modified"), folder):
            names = sorted(n for n in files_by_name(where) if re.fullmatch(pattern, n))
            if names:
                best = sorted(names, key=lambda n: not n.startswith(tag + "_"))[0]
                return files_by_name(where)[best]
    expected = os.path.join(folder, "modified", tag + "_gt_modify.tiff")
    raise FileNotFoundError(f"{anchor} has no label: expected {expected} or *_gt.tiff")


def slc(path):
    """A complex SLC file -> ((2, H, W) float32 real and imaginary parts, GeoTIFF tags): 2 bands (int16 as
    AIR-PolSAR-Seg-2.0 ships them) or 1 complex band."""
    array, geo = read_image(path)
    if array.shape[0] == 2 and array.dtype.kind in "iuf":
        return array.astype(np.float32), geo
    if array.shape[0] == 1 and array.dtype.kind == "c":
        return np.stack([array[0].real, array[0].imag]).astype(np.float32), geo
    raise ValueError(f"{path}: expected a complex SLC as 2 bands (real, imaginary) or 1 complex band, "
                     f"found {array.shape[0]} band(s) of {array.dtype}")


def class_name(value):
    """The native class name of an AIR-PolSAR-Seg-2.0 value (per the guessed palette), 255 "unlabelled"."""
    return AIRPOLSAR.names[value] if value != IGNORE else "unlabelled"


def colour_name(rgb):
    """'0,255,255 water' for a colour of AIRPOLSAR_PALETTE."""
    return ",".join(map(str, rgb)) + " " + class_name(AIRPOLSAR_PALETTE[rgb])


# -----------------------------------------------------------------------------
# DDHR-SK

DDHR = Source(
    "DDHR-SK", "GF-3 (paired with GF-2 optical)", "C", C_BAND, "dn", "8-bit JPEG (lossy), not calibrated", 1.0,
    names=("buildings", "roads", "greenery", "water", "farmland"),
    # greenery -> forest (?): trees and grass together; there is no background class in this label set.
    to_7={0: 1, 1: 2, 2: 5, 3: 3, 4: 6, IGNORE: IGNORE}, native={**{i: i for i in range(5)}, IGNORE: IGNORE})
DDHR_LISTS = {"train": "ddhr_sk_trainM.txt", "val": "ddhr_sk_valM.txt", "test": "ddhr_sk_valM.txt"}


def convert_ddhr_sk(root, out, split="train", tile=256, overlap=0, taxonomy="7class", split_list=None):
    """DDHR-SK (DDHRNet GF-3 + GF-2 set, South-Korea / Pohang subset, 256x256 tiles, SAR ~1 m):
      <root>/**/GF3/<id>.jpg      SAR, 8-bit JPEG (grey, or grey stored as RGB)
      <root>/**/label/<id>.png    palette PNG of class ids (read as palette indices, not colours):
                                  0 buildings, 1 roads, 2 greenery, 3 water, 4 farmland; 255 ignore
      GF2/ (the optical images) is not used.
    --split train / val: the authors' lists trainM / valM (XD-MG/DDHRNet DDHRNet/DDHRNet_Code/DATA/, shipped
    as nanosar/splits/ddhr_sk_*.txt, matched by <id>: point --root at one subset); test = valM (the authors'
    test list); --split all: every tile; any other name needs --split-list. Source: layout and 5 classes + 255 from XD-MG/DDHRNet (lists,
    configs/ddhrnet.yaml, reader.py). UNVERIFIED: the class names and their order (from public mmseg
    configs). JPEG needs the optional Pillow (or imagecodecs); PNG is decoded here.
    Output: unit dn (dn_scale null), channel SAR; 0 = no-data."""
    def pairs(root):
        cache = {}
        return [(p, label_beside(p, ["label"], [stem(p)], (".png", ".tif", ".tiff"), cache))
                for p in find(root, "**/gf3/*")]
    if split_list is None and split in DDHR_LISTS:
        split_list = os.path.join(SPLITS, DDHR_LISTS[split])
    return convert(DDHR, root, out, split, tile, overlap, taxonomy, pairs, load_single_band_file, split_list,
                   official=f"the authors' lists are train, val and test ({SPLITS}/ddhr_sk_*.txt)")


# -----------------------------------------------------------------------------
# SARBuD 1.0

SARBUD = Source(
    "SARBuD-1.0", "GF-3 FSII", "C", C_BAND, "dn", "GF-3 DN as distributed, not calibrated", 10.0,
    names=("non_built_up", "built_up"),
    # built-up -> building (?): built-up area includes streets and yards; 255 is read as built-up (0/255 masks).
    to_7={0: 0, 1: 1, 255: 1}, native={0: 0, 1: 1, 255: 1}, polarizations=("HH",), channels=("HH",))


def convert_sarbud(root, out, split="train", tile=256, overlap=0, taxonomy="7class", split_list=None):
    """SARBuD 1.0 (GF-3 FSII, C-band, 10 m, HH only, built-up areas over China; 256x256 tiles, some 224x224,
    padded to the tile with label 255):
      <root>/[<split>/]Labelimgs/<name>.tif|.png   binary: 0 non-built-up, 1 or 255 built-up
      <root>/[<split>/]<images>/<name>.tif|...      1-band HH values, same <name>, in a sibling folder
    <root>/<split>/ is used when it exists. Source: the dataset paper (Natl. Remote Sens. Bull. 26(4):
    620-631, 2022) and the release's label folder name. UNVERIFIED: the image folder's name (any folder
    beside Labelimgs/ holding the same names is used; label/, labels/ are accepted for Labelimgs/).
    Output: unit dn (dn_scale null), channel HH; 0 = no-data."""
    def pairs(root):
        base = subfolder(root, split) or root
        labels = subfolder(base, "labelimgs", "label", "labels")
        if labels is None:
            raise FileNotFoundError(f"{base}: no Labelimgs/ folder")
        label_files = find(labels, "*", IMAGE_EXTS)
        siblings = [os.path.join(base, d) for d in sorted(os.listdir(base))
                    if os.path.isdir(os.path.join(base, d)) and os.path.join(base, d) != labels]
        names = {stem(p).lower() for p in label_files}
        images = next((f for f in siblings if names & {stem(n) for n in files_by_name(f)}), None)
        if images is None:
            raise FileNotFoundError(f"{base}: no folder beside {labels} holds images named like its labels")
        files = files_by_name(images)
        return [(pick(files, [stem(p)], IMAGE_EXTS, p, images, "image"), p) for p in label_files]

    def load(image_path, label_path, mapping):
        return load_single_band_file(image_path, label_path, mapping, bands=1)

    return convert(SARBUD, root, out, split, tile, overlap, taxonomy, pairs, load, split_list)


# -----------------------------------------------------------------------------
# Sen1Floods11

SEN1FLOODS11 = Source(
    "Sen1Floods11", "Sentinel-1 IW GRD", "C", 0.05547, "db", "calibrated sigma0 dB (GEE)", 10.0,
    names=("not_water", "water"),
    # not water -> other: a water / non-water set; 7-class models trained on it learn "other" for all land.
    to_7={0: 0, 1: 3, IGNORE: IGNORE}, native={0: 0, 1: 1, IGNORE: IGNORE},  # -1 (nodata) is made 255 first
    polarizations=("VV", "VH"), channels=("VV", "VH"), incidence_deg=(29.0, 46.0), looks=4.4)


def convert_sen1floods11(root, out, split="train", tile=512, overlap=64, taxonomy="7class", split_list=None):
    """Sen1Floods11 (Sentinel-1 IW GRD, hand-labelled chips, 512x512, 10 m, EPSG:4326), either layout:
      <root>/[v1.1/data/flood_events/]HandLabeled/S1Hand/<Country>_<chip>_S1Hand.tif    the release
      <root>/[v1.1/data/flood_events/]HandLabeled/LabelHand/<Country>_<chip>_LabelHand.tif
      <root>/[sample/]S1/<Country>_<chip>_S1Hand.tif, Labels/<..>_LabelHand.tif         the repository's sample
    S1: 2 bands float32 sigma0 in dB (VV, VH), NaNs occur. Labels: int16 -1 nodata, 0 not water, 1 water.
      <root>/**/flood_handlabeled/flood_<split>_data.csv   the official chips of the split (val = valid);
                                                           without it --split all (every chip) or --split-list
    Source: cloudtostreet/Sen1Floods11 (README, sample/). NaN pixels get label 255 and each band's minimum
    finite value. Output: unit db, channels VV, VH."""
    def pairs(root):
        hand = [d for d in [root, *find_dirs(root, "handlabeled"), *find_dirs(root, "sample")]
                if subfolder(d, "s1hand", "s1")]
        if not hand:
            raise FileNotFoundError(f"{root}: no HandLabeled/S1Hand/ or sample/S1/ folder")
        cache = {}
        return [(p, label_beside(p, ["LabelHand", "Labels"], [stem(p)[:-len("S1Hand")] + "LabelHand"], TIFF_EXTS,
                                 cache)) for p in find(subfolder(hand[0], "s1hand", "s1"), "*_s1hand.*", TIFF_EXTS)]
    if split_list is None:
        csv = f"flood_{'valid' if split == 'val' else split}_data.csv"
        lists = [p for p in find(root, f"**/flood_handlabeled/{csv}", (".csv",), required=False)]
        split_list = lists[0] if lists else None

    def load(image_path, label_path, mapping):
        image, geo = read_image(image_path, bands=2)
        image = image.astype(np.float32)
        label = label_ids(read_image(label_path)[0], label_path)
        return image, remap_labels(np.where(label == -1, IGNORE, label), mapping, label_path), geo, None

    where = (f"the official flood_{'valid' if split == 'val' else split}_data.csv (v1.1/splits/flood_handlabeled/ "
             f"of the release) under {root}")
    return convert(SEN1FLOODS11, root, out, split, tile, overlap, taxonomy, pairs, load, split_list, official=where)


def find_dirs(root, name):
    """Folders named `name` (case-insensitive) under root, shallowest first."""
    found = [os.path.join(d, s) for d, subs, _ in os.walk(root) for s in subs if s.lower() == name]
    return sorted(found, key=lambda p: (p.count(os.sep), p))


# -----------------------------------------------------------------------------
# SpaceNet 6 (MSAW)

SN6_REMAP = {"outside": 0, "building": 1, "nodata": IGNORE}
SPACENET6 = Source(
    "SpaceNet6", "Capella / Metasensing airborne X-band", "X", X_BAND, "db",
    "SAR-Intensity, dB-scaled (secondary source; offset and calibration unverified)", 0.5,
    names=("background", "building"), to_7=SN6_REMAP, native=SN6_REMAP, polarizations=QUAD, channels=QUAD,
    check_values=False)  # its dB values may carry an offset (positive, 0 = nodata): not checked against +60 dB


def convert_spacenet6(root, out, split="train", tile=512, overlap=64, taxonomy="7class", split_list=None):
    """SpaceNet 6 (Capella airborne X-band, quad-pol, 0.5 m, Rotterdam, 900x900 tiles):
      <root>/**/SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_<t0>_<t1>_tile_<n>.tif
          4 bands float32 HH, HV, VH, VV, dB-scaled intensity, 0 = nodata
      <root>/**/geojson_buildings/SN6_Train_AOI_11_Rotterdam_Buildings_<t0>_<t1>_tile_<n>.geojson
          building polygons in the image's CRS, or lon/lat over a UTM image; rasterised at pixel centres;
          an empty file (0 bytes: a tile without buildings) is an empty mask
    SAR-Intensity/ folders without a geojson_buildings/ sibling (test_public) are skipped.
    Source: TorchGeo's SpaceNet6 dataset and its test tree. UNVERIFIED: whether the dB values are
    calibrated (they are not checked against +60 dB). Nodata pixels get label 255 and each band's minimum
    valid value. Output: unit db, channels HH, HV, VH, VV."""
    def pairs(root):
        images = [p for p in find(root, "**/SAR-Intensity/*", TIFF_EXTS) if has_beside(p, "geojson_buildings")]
        if not images:
            raise FileNotFoundError(f"{root}: no SAR-Intensity/ folder with a geojson_buildings/ sibling "
                                    f"(test_public has no labels)")
        cache = {}
        return [(p, label_beside(p, ["geojson_buildings"], [stem(p).replace("_SAR-Intensity_", "_Buildings_")],
                                 (".geojson",), cache)) for p in images]

    def load(image_path, label_path, mapping):
        image, geo = read_image(image_path, bands=4)
        image = image.astype(np.float32)
        if not np.isfinite(image).all():
            raise ValueError(f"{image_path}: {int((~np.isfinite(image)).sum())} NaN or infinite pixels "
                             f"(SpaceNet 6 marks nodata with 0, not NaN)")
        label = rasterize_polygons(geojson_polygons(label_path, geo, image_path), image.shape[1:])
        raw, nodata = geo.get("GDAL_NODATA"), parse_nodata(geo.get("GDAL_NODATA"))
        if nodata is None and str(raw or "").strip("\0 "):
            raise ValueError(f"{image_path}: GDAL_NODATA {raw!r} is not a number")
        return image, label, geo, (image == (0.0 if nodata is None else nodata)).all(0)

    return convert(SPACENET6, root, out, split, tile, overlap, taxonomy, pairs, load, split_list)


# -----------------------------------------------------------------------------
# The table prepare.py dispatches on; each converter's docstring is its layout text in --help

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
LAYOUT = {name: inspect.getdoc(fn) for name, fn in CONVERTERS.items()}
