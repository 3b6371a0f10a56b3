"""
A physics-based SAR simulator for the embedded default data: procedural land-cover scenes in the
7-class taxonomy, radar image formation for real sensor profiles, and the synthetic domain-
generalization suite whose 22 sub-benchmarks mirror the paper's 8 gap types.

    labels, heights = make_scene("N", size=128, spacing_m=8.0, rng)        # (H, W) class ids, metres
    image, info = form_image(labels, heights, SENSORS["G3"], "HH", "db", rng, region="N")

Reading order: 1. sensor profiles; 2. backscatter tables; 3. scene generators; 4. image formation
(sigma0 with incidence dependence, layover / shadow / double bounce, K-distributed texture, speckle
with the product's looks, noise floor, quantisation, representation); 5. the suite.
Numbers come from ../shared/reference/sar_physics.md (engineering defaults, not measurements).
"""

import math
import zlib
from dataclasses import dataclass

import numpy as np

from nanosar.data import CLASSES_7, SplitWriter

OTHER, BUILDING, ROAD, WATER, BARE, FOREST, CROP = range(7)
SPEED_OF_LIGHT = 299_792_458.0

# -----------------------------------------------------------------------------
# 1. Sensor profiles (documented product parameters; NESZ and incidence ranges are typical values)


@dataclass(frozen=True)
class Sensor:
    name: str
    platform: str              # "spaceborne" or "airborne"
    band: str                  # "L", "C" or "X"
    frequency_ghz: float
    polarizations: tuple       # polarizations the product offers
    pixel_spacing_m: float
    looks: float               # equivalent number of looks of the detected product (1 = SLC available)
    incidence_deg: tuple       # (near, far) incidence angle across the swath
    nesz_db: float             # noise-equivalent sigma zero
    product: str               # "float" (calibrated floats) or "uint16_dn" (amplitude digital numbers)

    @property
    def wavelength_m(self):
        return SPEED_OF_LIGHT / (self.frequency_ghz * 1e9)


SENSORS = {
    "S1": Sensor("Sentinel-1 IW GRDH", "spaceborne", "C", 5.405, ("VV", "VH", "HH", "HV"), 10.0, 4.4, (29.0, 46.0), -22.0, "float"),
    "G3": Sensor("GF-3 QPSI", "spaceborne", "C", 5.4, ("HH", "HV", "VH", "VV"), 8.0, 1.0, (20.0, 41.0), -19.0, "uint16_dn"),
    "L2": Sensor("ALOS-2 PALSAR-2 SM3", "spaceborne", "L", 1.2365, ("HH", "HV"), 10.0, 2.0, (30.0, 44.0), -26.0, "uint16_dn"),
    "X1": Sensor("TerraSAR-X spotlight", "spaceborne", "X", 9.65, ("HH", "VV"), 1.0, 1.0, (20.0, 45.0), -19.0, "float"),
    "CP": Sensor("Capella spotlight", "spaceborne", "X", 9.65, ("HH", "VV"), 0.5, 1.0, (25.0, 40.0), -17.0, "float"),
    "AX": Sensor("airborne X-band", "airborne", "X", 9.6, ("HH", "HV", "VH", "VV"), 0.5, 1.0, (35.0, 60.0), -30.0, "float"),
    "AC": Sensor("airborne C-band", "airborne", "C", 5.3, ("HH", "HV", "VH", "VV"), 0.5, 1.0, (35.0, 60.0), -30.0, "float"),
}
DN_SCALE = 316.0  # amplitude -> DN for "uint16_dn" products: sigma0 of -10 dB ~ DN 100 (GF-3 HH median ~ 50)

# -----------------------------------------------------------------------------
# 2. Backscatter: sigma0 (dB) per band, polarization and class at 35 degrees incidence, and the
#    incidence slope (dB per degree). Class order: other (grass), building, road, water, bare, forest, crop.

SIGMA0_DB = {
    "C": {"VV": (-11, -3, -17, -20, -13, -7.5, -11), "VH": (-18, -12, -25, -27, -22, -13.5, -17),
          "HH": (-11, -1, -18, -23, -14, -7, -11), "HV": (-19, -11, -26, -29, -23, -13, -18)},
    "L": {"HH": (-13, 0, -22, -25, -15, -7, -11), "HV": (-22, -12, -30, -32, -26, -12.5, -20),
          "VV": (-13, -3, -20, -22, -14, -9, -12)},
    "X": {"HH": (-11, 0, -16, -18, -12, -8, -10), "VV": (-11, 0, -16, -18, -12, -8, -10),
          "HV": (-19, -10, -24, -25, -20, -15, -17)},
}
SIGMA0_DB["L"]["VH"] = SIGMA0_DB["L"]["HV"]   # reciprocity
SIGMA0_DB["X"]["VH"] = SIGMA0_DB["X"]["HV"]
INCIDENCE_SLOPE_DB = (-0.15, -0.05, -0.5, -0.7, -0.27, -0.08, -0.15)  # specular classes fall fastest
TEXTURE_NU = (None, 2.0, None, None, None, 8.0, 20.0)  # Gamma texture order; None = homogeneous
REFERENCE_INCIDENCE = 35.0
DOUBLE_BOUNCE_DB = {"co": 10.0, "cross": 3.0}   # wall-ground corner reflector at the near-range wall
WIND_WATER_DB = 5.0                              # wind-roughened sea (coastal region), co-polarized


def is_cross_pol(pol):
    return pol[0] != pol[1]


def sigma0_db(band, pol, labels, incidence_deg):
    """Mean backscatter (dB) per pixel: labels (H, W) class ids, incidence_deg scalar or (H, W)."""
    table = np.asarray(SIGMA0_DB[band][pol], dtype=np.float64)
    slope = np.asarray(INCIDENCE_SLOPE_DB)
    return table[labels] + slope[labels] * (incidence_deg - REFERENCE_INCIDENCE)


# -----------------------------------------------------------------------------
# 3. Procedural scenes. Sizes are in metres and converted with the pixel spacing, so a sensor with a
#    finer spacing sees fewer, larger objects in a tile of the same pixel size.


def smooth_noise(shape, scale_px, rng):
    """Smooth random field in [0, 1) with features of about scale_px pixels (bilinear value noise)."""
    H, W = shape
    gh, gw = int(H / scale_px) + 2, int(W / scale_px) + 2
    grid = rng.random((gh, gw))
    y = np.arange(H) / scale_px
    x = np.arange(W) / scale_px
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)            # smoothstep
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    field = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
    return np.argsort(np.argsort(field, axis=None)).reshape(shape) / field.size  # uniform ranks


def rotated_coords(shape, angle_deg, spacing_m):
    """Pixel centres in metres in a frame rotated by angle_deg: (u, v), each (H, W)."""
    H, W = shape
    y, x = np.mgrid[0:H, 0:W].astype(np.float64) * spacing_m
    a = math.radians(angle_deg)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def lots(u, v, period_m, rng):
    """Random value in [0, 1) per lot of a period_m grid in (u, v), and the position inside the lot."""
    iu, iv = np.floor(u / period_m).astype(np.int64), np.floor(v / period_m).astype(np.int64)
    iu, iv = iu - iu.min(), iv - iv.min()
    table = rng.random((iu.max() + 1, iv.max() + 1))
    return table[iu, iv], u - np.floor(u / period_m) * period_m, v - np.floor(v / period_m) * period_m


def polyline_mask(shape, points, width_px):
    """Pixels within width_px / 2 of a polyline. points: (P, 2) as (row, col)."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    dist = np.full(shape, np.inf)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        dist = np.minimum(dist, np.hypot(yy - y0 - t * dy, xx - x0 - t * dx))
    return dist <= width_px / 2


def river(shape, spacing_m, width_m, rng, meander=0.15):
    """A meandering river crossing the tile at a random angle."""
    H, W = shape
    angle = rng.uniform(0, math.pi)
    centre = np.array([H, W]) / 2 + rng.uniform(-0.3, 0.3, 2) * np.array([H, W])
    t = np.linspace(-1, 1, 48) * (H + W)
    wiggle = meander * (H + W) / 2 * np.sin(t / (H + W) * 2 * math.pi * rng.uniform(1, 3) + rng.uniform(0, 6.3))
    direction, normal = np.array([math.sin(angle), math.cos(angle)]), np.array([math.cos(angle), -math.sin(angle)])
    points = centre + t[:, None] * direction + wiggle[:, None] * normal
    return polyline_mask(shape, points, max(width_m / spacing_m, 1.0))


def straight_roads(shape, spacing_m, n, width_m, rng):
    """n long straight roads at random angles through the tile."""
    H, W = shape
    mask = np.zeros(shape, bool)
    for _ in range(n):
        angle = rng.uniform(0, math.pi)
        centre = rng.uniform(0.2, 0.8, 2) * np.array([H, W])
        d = np.array([math.sin(angle), math.cos(angle)]) * (H + W)
        mask |= polyline_mask(shape, np.stack([centre - d, centre + d]), max(width_m / spacing_m, 1.0))
    return mask


# Region recipes: class priors of fields, urban density, water, building sizes and heights (metres).
REGIONS = {
    "N": dict(description="north: dense urban blocks on a street grid, rectangular crop fields, one river",
              field_m=150, field_classes=(CROP, CROP, BARE, OTHER), forest=0.10, urban=0.45, block_m=110,
              street_m=12, building_m=(18, 40), fill=0.85, height_m=(12, 35), river_m=40, lakes=0.0, angle=(0, 10)),
    "S": dict(description="south: villages, paddy fields, ponds, forested hills",
              field_m=60, field_classes=(CROP, CROP, WATER, OTHER), forest=0.30, urban=0.12, block_m=70,
              street_m=6, building_m=(8, 15), fill=0.55, height_m=(4, 9), river_m=25, lakes=0.08, angle=(0, 90)),
    "A": dict(description="arid: bare land, sparse settlements, long straight roads, dry riverbeds",
              field_m=250, field_classes=(BARE, BARE, BARE, CROP, OTHER), forest=0.02, urban=0.08, block_m=90,
              street_m=10, building_m=(10, 25), fill=0.35, height_m=(4, 10), river_m=0, lakes=0.0, angle=(0, 90),
              straight_roads=3),
    "C": dict(description="coastal: wind-roughened sea, harbour and mixed urban, beach",
              field_m=120, field_classes=(OTHER, CROP, BARE), forest=0.08, urban=0.35, block_m=100,
              street_m=10, building_m=(15, 35), fill=0.7, height_m=(8, 25), river_m=0, lakes=0.0, angle=(0, 45),
              sea=0.35),
}


def make_scene(region, size, spacing_m, rng):
    """A land-cover scene. -> labels (size, size) uint8 in CLASSES_7 order, heights (size, size) metres."""
    r = REGIONS[region]
    shape = (size, size)
    u, v = rotated_coords(shape, rng.uniform(*r["angle"]), spacing_m)
    # fields: rectangular parcels, each one class drawn from the region's field priors
    parcel, _, _ = lots(u + rng.uniform(0, 1e3), v + rng.uniform(0, 1e3), r["field_m"], rng)
    classes = np.asarray(r["field_classes"])
    labels = classes[np.minimum((parcel * len(classes)).astype(int), len(classes) - 1)].astype(np.uint8)
    scale = lambda metres: max(metres / spacing_m, 2.0)  # noqa: E731  (feature size in pixels)
    labels[smooth_noise(shape, scale(300), rng) < r["forest"]] = FOREST
    # urban zone: street grid, and buildings on a random subset of lots inside the blocks
    urban = smooth_noise(shape, scale(500), rng) < r["urban"]
    _, bu, bv = lots(u, v, r["block_m"], rng)
    street = (bu < r["street_m"]) | (bv < r["street_m"])
    lot_m = rng.uniform(*r["building_m"])
    occupied, lu, lv = lots(u, v, lot_m + 6.0, rng)
    footprint = (lu > 3.0) & (lv > 3.0) & (lu < lot_m + 3.0) & (lv < lot_m + 3.0)
    buildings = urban & ~street & footprint & (occupied < r["fill"])
    labels[urban & ~buildings] = np.where(street[urban & ~buildings], ROAD, OTHER)
    if r.get("straight_roads"):
        labels[straight_roads(shape, spacing_m, r["straight_roads"], 12.0, rng)] = ROAD
    # water: lakes / ponds, a river, the sea
    water = smooth_noise(shape, scale(80), rng) < r["lakes"]
    if r["river_m"]:
        water |= river(shape, spacing_m, r["river_m"], rng)
    if r.get("sea"):
        coast = (u - u.min()) / (u.max() - u.min() + 1e-9) + 0.15 * (smooth_noise(shape, scale(200), rng) - 0.5)
        water |= coast < r["sea"]
        labels[(coast >= r["sea"]) & (coast < r["sea"] + 0.06)] = BARE          # beach
    labels[water] = WATER
    buildings &= ~water
    labels[buildings] = BUILDING
    heights = np.where(buildings, rng.uniform(*r["height_m"], size=shape), 0.0)
    return labels, heights


# -----------------------------------------------------------------------------
# 4. Image formation


def shift_right(mask, d):
    """mask moved d pixels towards far range (increasing column), zeros entering from the left."""
    out = np.zeros_like(mask)
    out[:, d:] = mask[:, :-d] if d else mask
    return out


def building_geometry(labels, heights, incidence_deg, spacing_m):
    """Radar geometry of buildings for a sensor looking from the left (range increases with column).

    Returns masks (H, W): double bounce (the building's near-range wall column), layover (ground
    before the wall that receives the roof and wall returns, length h / tan(theta)) and shadow
    (ground behind the building, length h * tan(theta)), using the scene's mean building height.
    """
    building = labels == BUILDING
    if not building.any():
        empty = np.zeros_like(building)
        return empty, empty, empty
    h = float(heights[building].mean())
    theta = math.radians(incidence_deg)
    layover_px = min(int(round(h / math.tan(theta) / spacing_m)), 64)
    shadow_px = min(int(round(h * math.tan(theta) / spacing_m)), 64)
    near_wall = building & ~shift_right(building, 1)               # first building pixel seen in range
    layover = np.zeros_like(building)
    for d in range(1, layover_px + 1):
        layover[:, :-d] |= building[:, d:]                          # ground up to d pixels before a building
    shadow = np.zeros_like(building)
    for d in range(1, shadow_px + 1):
        shadow |= shift_right(building, d)
    return near_wall, layover & ~building, shadow & ~building


def form_image(labels, heights, sensor, pol, representation, rng, region=None, incidence_deg=None,
               spacing_m=None):
    """Simulate one SAR tile. labels, heights: (H, W) from make_scene.

    Returns image (C, H, W) float32 in the unit named by representation -- "db" (10 log10 intensity),
    "intensity", "amplitude" (linear; DN / DN_SCALE for uint16_dn products), "real" / "imag" (one
    component of the single-look complex image, C=1) or "complex" (re, im; C=2) -- and a dict with the
    tile's incidence angle. The chain: sigma0(class, band, pol, incidence) + double bounce and layover
    -> x Gamma(nu) texture -> + noise floor (NESZ) -> speckle: complex Gaussian (SLC) or Gamma with the
    product's looks -> quantisation -> representation.
    """
    if pol not in sensor.polarizations:
        raise ValueError(f"{sensor.name} has no {pol} channel (it has {sensor.polarizations})")
    complex_out = representation in ("real", "imag", "complex")
    if complex_out and sensor.looks != 1:
        raise ValueError(f"{sensor.name} products have {sensor.looks} looks: no single-look complex image")
    spacing = spacing_m or sensor.pixel_spacing_m
    if incidence_deg is None:
        incidence_deg = rng.uniform(*sensor.incidence_deg)
    # mean backscatter, linear intensity
    s0_db = sigma0_db(sensor.band, pol, labels, incidence_deg)
    cross = is_cross_pol(pol)
    if region == "C" and not cross:
        s0_db = np.where(labels == WATER, s0_db + WIND_WATER_DB, s0_db)
    near_wall, layover, shadow = building_geometry(labels, heights, incidence_deg, spacing)
    s0_db = s0_db + near_wall * DOUBLE_BOUNCE_DB["cross" if cross else "co"]
    mean = 10.0 ** (s0_db / 10.0)
    building_sigma = 10.0 ** (SIGMA0_DB[sensor.band][pol][BUILDING] / 10.0)
    mean = np.where(layover, mean + building_sigma, mean)           # roof/wall returns fold onto the ground
    mean = np.where(shadow, 0.0, mean)                              # no illumination: noise floor only
    # texture (K-distribution for heterogeneous classes)
    for cls, nu in enumerate(TEXTURE_NU):
        if nu is not None:
            sel = labels == cls
            mean[sel] *= rng.gamma(nu, 1.0 / nu, size=int(sel.sum()))
    mean = mean + 10.0 ** (sensor.nesz_db / 10.0)                   # thermal noise power adds
    # speckle
    if complex_out:
        re, im = rng.standard_normal((2, *labels.shape)) * np.sqrt(mean / 2.0)
        intensity = re**2 + im**2
    else:
        intensity = mean * rng.gamma(sensor.looks, 1.0 / sensor.looks, size=labels.shape)
    # quantisation of the delivered product
    if sensor.product == "uint16_dn":
        q = lambda a: np.clip(np.round(a * DN_SCALE), -32768 if complex_out else 0, 65535) / DN_SCALE  # noqa: E731
        if complex_out:
            re, im = q(re), q(im)
            intensity = re**2 + im**2
        else:
            intensity = q(np.sqrt(intensity)) ** 2
    image = {
        "db": lambda: 10.0 * np.log10(np.maximum(intensity, 1e-5))[None],   # floor at -50 dB (DN 0)
        "intensity": lambda: intensity[None],
        "amplitude": lambda: np.sqrt(intensity)[None],
        "real": lambda: re[None],
        "imag": lambda: im[None],
        "complex": lambda: np.stack([re, im]),
    }[representation]()
    return image.astype(np.float32), {"incidence_deg": round(float(incidence_deg), 3)}


# -----------------------------------------------------------------------------
# 5. The synthetic DG suite: domains and the 22 sub-benchmarks


@dataclass(frozen=True)
class Domain:
    region: str
    sensor: str
    pol: str
    representation: str = "db"
    spacing_m: float = None     # resampled pixel spacing; None = the sensor's

    @property
    def name(self):
        spacing = f"@{self.spacing_m:g}m" if self.spacing_m else ""
        return f"{self.region}-{self.sensor}-{self.pol}-{self.representation}{spacing}"

    def factors(self):
        """The five factors a gap can change."""
        s = SENSORS[self.sensor]
        return {"region": self.region, "platform": s.platform, "band": s.band, "polarization": self.pol,
                "representation": self.representation}

    def meta(self):
        s = SENSORS[self.sensor]
        unit = self.representation
        return {
            "dataset": "synthetic", "domain": self.name, **self.factors(),
            "region_description": REGIONS[self.region]["description"],
            "sensor": s.name, "frequency_ghz": s.frequency_ghz, "wavelength_m": round(s.wavelength_m, 5),
            "polarizations": [self.pol], "channels": ["re", "im"] if unit == "complex" else [self.pol],
            "unit": unit, "incidence_deg": list(s.incidence_deg),
            "pixel_spacing_m": self.spacing_m or s.pixel_spacing_m,
            "looks": s.looks, "nesz_db": s.nesz_db, "product": s.product,
            "class_names": list(CLASSES_7),
        }


def D(region, sensor, pol, representation="db", spacing_m=None):
    return Domain(region, sensor, pol, representation, spacing_m)


# (code, gap, source, target). Each target differs from its source in exactly the factors of its gap.
BENCHMARKS = [
    ("N2S", "region", D("N", "G3", "HH"), D("S", "G3", "HH")),
    ("S2N", "region", D("S", "G3", "HH"), D("N", "G3", "HH")),
    ("N2A", "region", D("N", "G3", "HH"), D("A", "G3", "HH")),
    ("A2N", "region", D("A", "G3", "HH"), D("N", "G3", "HH")),
    ("VV2HH", "polarization", D("N", "G3", "VV"), D("N", "G3", "HH")),
    ("HH2VV", "polarization", D("N", "G3", "HH"), D("N", "G3", "VV")),
    ("VV2HV", "polarization", D("N", "G3", "VV"), D("N", "G3", "HV")),
    ("HH2HV", "polarization", D("N", "G3", "HH"), D("N", "G3", "HV")),
    ("C(r)2R", "complex value", D("S", "G3", "VV", "real"), D("S", "G3", "VV", "amplitude")),
    ("C(i)2R", "complex value", D("S", "G3", "VV", "imag"), D("S", "G3", "VV", "amplitude")),
    ("R2C(r)", "complex value", D("S", "G3", "VV", "amplitude"), D("S", "G3", "VV", "real")),
    ("R2C(i)", "complex value", D("S", "G3", "VV", "amplitude"), D("S", "G3", "VV", "imag")),
    ("NV2SH", "region+polarization", D("N", "G3", "VV"), D("S", "G3", "HH")),
    ("SH2NV", "region+polarization", D("S", "G3", "HH"), D("N", "G3", "VV")),
    ("NS2CA", "region+platform", D("N", "S1", "VV"), D("C", "AC", "VV")),
    ("CA2NS", "region+platform", D("C", "AC", "VV"), D("N", "S1", "VV")),
    ("NC2AX", "region+band", D("N", "G3", "HH"), D("A", "X1", "HH", spacing_m=8.0)),
    ("AX2NC", "region+band", D("A", "X1", "HH", spacing_m=8.0), D("N", "G3", "HH")),
    ("NCV2SLH", "region+polarization+band", D("N", "S1", "VV"), D("S", "L2", "HH")),
    ("SLH2NCV", "region+polarization+band", D("S", "L2", "HH"), D("N", "S1", "VV")),
    ("NS1C2AX", "region+platform+band", D("N", "S1", "VV"), D("C", "AX", "VV")),
    ("AX2NS1C", "region+platform+band", D("C", "AX", "VV"), D("N", "S1", "VV")),
]
GAP_FACTORS = {
    "region": {"region"}, "polarization": {"polarization"}, "complex value": {"representation"},
    "region+polarization": {"region", "polarization"}, "region+platform": {"region", "platform"},
    "region+band": {"region", "band"}, "region+polarization+band": {"region", "polarization", "band"},
    "region+platform+band": {"region", "platform", "band"},
}


def suite_domains():
    """Every domain the 22 benchmarks use, each once, in a stable order."""
    seen = {}
    for _, _, source, target in BENCHMARKS:
        seen.setdefault(source.name, source)
        seen.setdefault(target.name, target)
    return list(seen.values())


def stable_seed(*parts):
    """A seed from strings and ints that is the same on every machine and Python run."""
    return [zlib.crc32(str(p).encode()) for p in parts]


def simulate_tile(domain, split, index, size, seed=0):
    """One tile of a domain: image (C, size, size) float32 in domain.representation, labels (size, size),
    info. Scenes depend on (seed, region, split, index, spacing) only, so two domains of one region
    share their label maps wherever their pixel spacing is the same."""
    sensor = SENSORS[domain.sensor]
    spacing = domain.spacing_m or sensor.pixel_spacing_m
    scene_rng = np.random.default_rng(stable_seed(seed, domain.region, split, index, spacing))
    labels, heights = make_scene(domain.region, size, spacing, scene_rng)
    radar_rng = np.random.default_rng(stable_seed(seed, domain.name, split, index, "radar"))
    image, info = form_image(labels, heights, sensor, domain.pol, domain.representation, radar_rng,
                             region=domain.region, spacing_m=spacing)
    return image, labels, info


def write_domain(out_dir, domain, split, n_tiles, size, seed=0):
    """Simulate n_tiles tiles of a domain into the split folder out_dir (nanosar.data format)."""
    meta = {**domain.meta(), "provenance": {"generator": "nanosar.sim", "seed": seed, "split": split, "tile": size}}
    with SplitWriter(out_dir, meta) as writer:
        for i in range(n_tiles):
            image, labels, info = simulate_tile(domain, split, i, size, seed)
            writer.add(image, labels, source=f"sim:{domain.name}:{split}:{i}", **info)
