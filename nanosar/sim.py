"""
A physics-based SAR simulator for the embedded default data: procedural land-cover scenes in the
7-class taxonomy, radar image formation for real sensor profiles, and the synthetic domain-
generalization suite whose 22 sub-benchmarks mirror the paper's 8 gap types.

    labels, heights = make_scene("N", size=128, spacing_m=8.0, rng)        # (H, W) class ids, metres
    image, info = form_image(labels, heights, SENSORS["G3"], "HH", "db", rng, region="N")            # (1, H, W)
    image, info = form_image(labels, heights, SENSORS["S1"], ("VV", "VH"), "db", rng, region="N")    # (2, H, W)

Reading order: 1. sensor profiles; 2. backscatter tables; 3. scene generators; 4. image formation
(sigma0 with incidence dependence, layover / shadow / double bounce, K-distributed texture, thermal
noise, speckle with the product's looks, thermal noise removal, quantisation, representation);
5. the suite; 6. the descriptor table (python -m nanosar.sim --descriptors).
Numbers come from ../shared/reference/sar_physics.md (engineering defaults, not measurements).
"""

import math
import zlib
from dataclasses import dataclass

import numpy as np

from nanosar.data import CLASSES_7, SplitWriter
from nanosar.units import SIM_DN_SCALE

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
    nesz_db: float             # noise-equivalent sigma zero: the thermal noise power, as a sigma0
    product: str               # "float" (calibrated floats) or "uint16_dn" (amplitude digital numbers)
    noise_removed: bool = False  # True: the delivered sigma0 has the noise's expected power subtracted

    @property
    def wavelength_m(self):
        return SPEED_OF_LIGHT / (self.frequency_ghz * 1e9)


SENSORS = {
    "S1": Sensor("Sentinel-1 IW GRDH", "spaceborne", "C", 5.405, ("VV", "VH", "HH", "HV"), 10.0, 4.4, (29.0, 46.0), -22.0, "float",
                 noise_removed=True),
    "G3": Sensor("GF-3 QPSI", "spaceborne", "C", 5.4, ("HH", "HV", "VH", "VV"), 8.0, 1.0, (20.0, 41.0), -19.0, "uint16_dn"),
    "L2": Sensor("ALOS-2 PALSAR-2 SM3", "spaceborne", "L", 1.2365, ("HH", "HV"), 10.0, 2.0, (30.0, 44.0), -26.0, "uint16_dn"),
    "X1": Sensor("TerraSAR-X spotlight", "spaceborne", "X", 9.65, ("HH", "VV"), 1.0, 1.0, (20.0, 45.0), -19.0, "float"),
    "CP": Sensor("Capella spotlight", "spaceborne", "X", 9.65, ("HH", "VV"), 0.5, 1.0, (25.0, 40.0), -17.0, "float"),
    "AX": Sensor("airborne X-band", "airborne", "X", 9.6, ("HH", "HV", "VH", "VV"), 0.5, 1.0, (35.0, 60.0), -30.0, "float"),
    "AC": Sensor("airborne C-band", "airborne", "C", 5.3, ("HH", "HV", "VH", "VV"), 0.5, 1.0, (35.0, 60.0), -30.0, "float"),
}
# Thermal noise removal. Sentinel-1 sigma0 as datasets and GEE's COPERNICUS/S1_GRD deliver it is denoised
# with the product's noise LUT (ESA's IPF annotation; SNAP ThermalNoiseRemoval, then calibration), so
# dark surfaces sit near their sigma0, not at the NESZ: S1 is the one noise-removed preset. ALOS-2 L1.5
# and GF-3 DN products are calibrated without a noise term (sar_physics.md section 7); TerraSAR-X and
# Capella annotate their noise (NEBN, noise polynomial) but deliver it unsubtracted, as modelled here;
# the airborne presets' NESZ (-30 dB) lies below every class.
DN_SCALE = SIM_DN_SCALE  # amplitude -> DN for "uint16_dn" products: sigma0 of -10 dB ~ DN 100 (GF-3 HH median ~ 50)

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


# Region recipes: class priors of fields, urban density, water, building sizes and heights (metres), and
# the share of tiles ("open") holding a large homogeneous area of one of "open_classes".
REGIONS = {
    "N": dict(description="north: dense urban blocks on a street grid, rectangular crop fields, one river",
              field_m=150, field_classes=(CROP, CROP, BARE, OTHER), forest=0.10, urban=0.45, block_m=110,
              street_m=12, building_m=(18, 40), fill=0.85, height_m=(12, 35), river_m=40, lakes=0.0, angle=(0, 10),
              open=0.25, open_classes=(CROP, CROP, BARE, OTHER)),                 # large fields of the plain
    "S": dict(description="south: villages, paddy fields, ponds, forested hills",
              field_m=60, field_classes=(CROP, CROP, WATER, OTHER), forest=0.30, urban=0.12, block_m=70,
              street_m=6, building_m=(8, 15), fill=0.55, height_m=(4, 9), river_m=25, lakes=0.08, angle=(0, 90),
              open=0.3, open_classes=(WATER, WATER, FOREST, CROP)),               # lakes, forested hills
    "A": dict(description="arid: bare land, sparse settlements, long straight roads, dry riverbeds",
              field_m=250, field_classes=(BARE, BARE, BARE, CROP, OTHER), forest=0.02, urban=0.08, block_m=90,
              street_m=10, building_m=(10, 25), fill=0.35, height_m=(4, 10), river_m=0, lakes=0.0, angle=(0, 90),
              straight_roads=3, open=0.4, open_classes=(BARE, BARE, BARE, OTHER)),  # desert plains
    "C": dict(description="coastal: wind-roughened sea, harbour and mixed urban, beach",
              field_m=120, field_classes=(OTHER, CROP, BARE), forest=0.08, urban=0.35, block_m=100,
              street_m=10, building_m=(15, 35), fill=0.7, height_m=(8, 25), river_m=0, lakes=0.0, angle=(0, 45),
              sea=0.35, open=0.3, open_classes=(WATER,)),                         # the open sea
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
    # a large homogeneous area in some tiles (a big field, a desert plain, a lake, the open sea) covering
    # half of the tile or more, all of it in half of these tiles: there speckle is the only variation and
    # the ENL reaches the product's looks, as in real scenes. Rivers and lakes stay over land areas.
    if rng.random() < r["open"]:
        share = min(1.0, rng.uniform(0.5, 1.5))
        area = smooth_noise(shape, scale(1000), rng) < share
        cls = rng.choice(r["open_classes"])
        if cls != WATER:
            area &= ~water
        labels[area] = cls
        heights[area] = 0.0
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


def mean_backscatter(labels, geometry, band, pol, incidence_deg, region=None):
    """Mean linear intensity (H, W) of one polarization before texture: sigma0 per class at the incidence
    angle, wind on the coastal sea, double bounce at the near walls, layover, shadow.
    geometry: (near_wall, layover, shadow) masks from building_geometry."""
    near_wall, layover, shadow = geometry
    s0_db = sigma0_db(band, pol, labels, incidence_deg)
    cross = is_cross_pol(pol)
    if region == "C" and not cross:
        s0_db = np.where(labels == WATER, s0_db + WIND_WATER_DB, s0_db)
    s0_db = s0_db + near_wall * DOUBLE_BOUNCE_DB["cross" if cross else "co"]
    mean = 10.0 ** (s0_db / 10.0)
    building_sigma = 10.0 ** (SIGMA0_DB[band][pol][BUILDING] / 10.0)
    mean = np.where(layover, mean + building_sigma, mean)           # roof/wall returns fold onto the ground
    return np.where(shadow, 0.0, mean)                              # no illumination: thermal noise only


def gamma_texture(labels, rng):
    """Unit-mean texture (H, W): Gamma(nu, 1/nu) on the classes with a TEXTURE_NU, 1 elsewhere; times the
    speckle it gives K-distributed intensity. One field per scene, shared by all its polarizations."""
    texture = np.ones(labels.shape)
    for cls, nu in enumerate(TEXTURE_NU):
        if nu is not None:
            sel = labels == cls
            texture[sel] = rng.gamma(nu, 1.0 / nu, size=int(sel.sum()))
    return texture


NOISE_REMOVAL_FLOOR = 1e-5  # linear intensity (-50 dB, the dB floor) of pixels that noise removal makes <= 0


def remove_thermal_noise(intensity, nesz):
    """Thermal noise removal of a detected product: intensity - nesz (the noise's expected power, linear),
    floored at NOISE_REMOVAL_FLOOR, as ESA's Sentinel-1 denoising does (SNAP's ThermalNoiseRemoval sets
    negative DN^2 - noise to a tiny floor value). It removes the noise's mean, not its fluctuation: over a
    dark surface many pixels come out negative and are floored, which leaves a positive bias
    (noise_removed_mean), and the ENL of a homogeneous area drops to L (sigma0 / (sigma0 + NESZ))^2."""
    return np.maximum(intensity - nesz, NOISE_REMOVAL_FLOOR)


def gamma_cdf(a, x):
    """P(Gamma(a, 1) <= x), the regularized lower incomplete gamma function, by its power series."""
    if x <= 0:
        return 0.0
    term = total = 1.0 / a
    k = 1
    while term > 1e-17 * total:
        term *= x / (a + k)
        total += term
        k += 1
    return total * math.exp(a * math.log(x) - x - math.lgamma(a))


def noise_removed_mean(sigma0, nesz, looks, floor=NOISE_REMOVAL_FLOOR):
    """Expected value of a noise-removed L-look pixel over a homogeneous area, linear units:
    E[max(I - nesz, floor)] with I ~ Gamma(L, mean sigma0 + nesz). Above sigma0 by the clipped negative
    part: +1 % for C-band water VV (-20 dB) but +32 % (+1.2 dB) for water VH (-27 dB) at NESZ -22 dB."""
    mu, t = sigma0 + nesz, nesz + floor
    x = looks * t / mu                                              # t in units of the Gamma's scale mu / L
    return mu * (1 - gamma_cdf(looks + 1, x)) - nesz * (1 - gamma_cdf(looks, x)) + floor * gamma_cdf(looks, x)


REPRESENTATIONS = {
    "db": "10 log10 of the calibrated intensity, floored at -50 dB",
    "intensity": "calibrated linear intensity (sigma0 with speckle)",
    "amplitude": "calibrated linear amplitude sqrt(intensity) (DN / DN_SCALE for uint16_dn products)",
    "dn": "uncalibrated amplitude digital numbers of a uint16_dn product: amplitude = DN / DN_SCALE",
    "real": "real part of the single-look complex image (C = 1)",
    "imag": "imaginary part of the single-look complex image (C = 1)",
    "complex": "single-look complex image as (re, im) (C = 2)",
}
DETECTED = ("db", "intensity", "amplitude", "dn")  # the representations of a detected (magnitude) product


def form_channel(mean, sensor, representation, rng):
    """One polarization channel from its textured mean intensity (H, W) -> (1 or 2, H, W) float64:
    + thermal noise -> speckle -> noise removal -> quantisation -> representation."""
    noise = 10.0 ** (sensor.nesz_db / 10.0)
    mean = mean + noise                                             # thermal noise power adds
    dn_product = sensor.product == "uint16_dn"
    if representation in ("real", "imag", "complex"):               # SLC: circular complex Gaussian
        re, im = rng.standard_normal((2, *mean.shape)) * np.sqrt(mean / 2.0)
        if dn_product:                                              # signed (re, im) digital numbers
            re, im = (np.clip(np.round(c * DN_SCALE), -32768, 65535) / DN_SCALE for c in (re, im))
        return {"real": re[None], "imag": im[None], "complex": np.stack([re, im])}[representation]
    intensity = mean * rng.gamma(sensor.looks, 1.0 / sensor.looks, size=mean.shape)   # L-look speckle
    if sensor.noise_removed:
        intensity = remove_thermal_noise(intensity, noise)
    if dn_product:                                                  # uint16 amplitude digital numbers
        dn = np.clip(np.round(np.sqrt(intensity) * DN_SCALE), 0, 65535)
        intensity = (dn / DN_SCALE) ** 2
    if representation == "dn":
        return dn[None]
    return {
        "db": lambda: 10.0 * np.log10(np.maximum(intensity, 1e-5))[None],   # floor at -50 dB (DN 0)
        "intensity": lambda: intensity[None],
        "amplitude": lambda: np.sqrt(intensity)[None],
    }[representation]()


def form_image(labels, heights, sensor, pol, representation, rng, region=None, incidence_deg=None,
               spacing_m=None):
    """Simulate one SAR tile. labels, heights: (H, W) from make_scene; pol: one polarization ("VV") or
    a tuple of them (("VV", "VH"): a multi-polarization product, channels in that order).

    Returns image (C, H, W) float32 in the unit named by representation (see REPRESENTATIONS; C = the
    number of polarizations, or 2 for "complex") and a dict with the tile's incidence angle. The chain:
    sigma0(class, band, pol, incidence) + double bounce and layover -> x Gamma(nu) texture -> + thermal
    noise (NESZ) -> speckle: complex Gaussian (SLC) or Gamma with the product's looks -> noise removal
    (noise-removed products: - NESZ, floored) -> quantisation (uint16 DN products) -> representation.
    The channels of a multi-polarization product share scene, incidence, geometry and texture, and have
    independent speckle: exact for a co- and a cross-polarized channel of a reflection-symmetric scene
    (<S_co S_cross*> = 0: VV+VH, HH+HV); a simplification for HH and VV of a quad product, which are
    partly correlated (and HV = VH by reciprocity).
    """
    pols = (pol,) if isinstance(pol, str) else tuple(pol)
    for p in pols:
        if p not in sensor.polarizations:
            raise ValueError(f"{sensor.name} has no {p} channel (it has {sensor.polarizations})")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}: choose one of {list(REPRESENTATIONS)}")
    if representation in ("real", "imag", "complex") and sensor.looks != 1:
        raise ValueError(f"{sensor.name} products have {sensor.looks} looks: no single-look complex image")
    if len(pols) > 1 and representation not in DETECTED:
        raise ValueError(f"a multi-polarization product is detected ({DETECTED}), not {representation!r}")
    if representation == "dn" and sensor.product != "uint16_dn":
        raise ValueError(f"{sensor.name} products are calibrated floats, not DN: use 'amplitude'")
    spacing = spacing_m or sensor.pixel_spacing_m
    if incidence_deg is None:
        incidence_deg = rng.uniform(*sensor.incidence_deg)
    geometry = building_geometry(labels, heights, incidence_deg, spacing)
    means = [mean_backscatter(labels, geometry, sensor.band, p, incidence_deg, region) for p in pols]
    texture = gamma_texture(labels, rng)
    image = np.concatenate([form_channel(mean * texture, sensor, representation, rng) for mean in means])
    return image.astype(np.float32), {"incidence_deg": round(float(incidence_deg), 3)}


# -----------------------------------------------------------------------------
# 5. The synthetic DG suite: domains and the 22 sub-benchmarks


@dataclass(frozen=True)
class Domain:
    region: str
    sensor: str
    pol: object                 # "VV", or a tuple ("VV", "VH") for a multi-polarization product (channel order)
    representation: str = "db"
    spacing_m: float = None     # resampled pixel spacing; None = the sensor's

    def __post_init__(self):
        if not isinstance(self.pol, str):
            object.__setattr__(self, "pol", tuple(self.pol))    # a list would make the domain unhashable

    @property
    def pols(self):
        """The polarizations, in channel order: ("VV",) or ("VV", "VH")."""
        return (self.pol,) if isinstance(self.pol, str) else self.pol

    @property
    def name(self):
        spacing = f"@{self.spacing_m:g}m" if self.spacing_m else ""
        return f"{self.region}-{self.sensor}-{'+'.join(self.pols)}-{self.representation}{spacing}"

    def factors(self):
        """The five factors a gap can change."""
        s = SENSORS[self.sensor]
        return {"region": self.region, "platform": s.platform, "band": s.band, "polarization": "+".join(self.pols),
                "representation": self.representation}

    def meta(self):
        s = SENSORS[self.sensor]
        unit = self.representation
        meta = {
            "dataset": "synthetic", "domain": self.name, **self.factors(),
            "region_description": REGIONS[self.region]["description"],
            "sensor": s.name, "frequency_ghz": s.frequency_ghz, "wavelength_m": round(s.wavelength_m, 5),
            "polarizations": list(self.pols), "channels": ["re", "im"] if unit == "complex" else list(self.pols),
            "unit": unit, "incidence_deg": list(s.incidence_deg),
            "pixel_spacing_m": self.spacing_m or s.pixel_spacing_m,
            "looks": s.looks, "nesz_db": s.nesz_db, "noise_removed": s.noise_removed, "product": s.product,
            "class_names": list(CLASSES_7),
        }
        if unit == "dn":
            meta["dn_scale"] = DN_SCALE                             # calibrated amplitude = DN / dn_scale
        return meta


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


# Domains written beside the benchmarks' (prepare.py synthetic, suite.json "extra_domains"), in no benchmark.
# N-S1-VV+VH-db: a dual-pol Sentinel-1 product (VV, VH in dB, as GRD IW 1SDV), so that a model trained on
# the simulator reads a real dual-pol product directly; its scenes are those of N-S1-VV-db (same region
# and pixel spacing), its VV channel the same physics with other speckle.
EXTRA_DOMAINS = [D("N", "S1", ("VV", "VH"))]


# The continued-pre-training corpus (prepare.py corpus): every sensor preset x each of its polarizations x
# each representation it offers (dB and amplitude; also the real and imaginary part of the SLC for the
# single-look presets) x the four regions, at the sensor's pixel spacing and at any other spacing a
# benchmark resamples it to. Single-polarization, so every tile has one channel. Its splits are named
# CORPUS_SPLITS, and scenes are seeded by the split's and the domain's name (scene_seed), so every corpus
# tile has a scene of its own and none is a scene of a benchmark split ("train", "test").
CORPUS_REPRESENTATIONS = ("db", "amplitude", "real", "imag")
CORPUS_SPLITS = ("cpt", "heldout")


def corpus_domains():
    """Every domain of the pre-training corpus, in a stable order (sensor, spacing, polarization,
    representation, region)."""
    spacings = {code: [None] for code in SENSORS}
    for d in suite_domains():
        if d.spacing_m and d.spacing_m not in spacings[d.sensor]:
            spacings[d.sensor].append(d.spacing_m)
    domains = []
    for code, sensor in SENSORS.items():
        slc = sensor.looks == 1
        for spacing in spacings[code]:
            for pol in sensor.polarizations:
                for representation in CORPUS_REPRESENTATIONS if slc else ("db", "amplitude"):
                    domains += [D(region, code, pol, representation, spacing) for region in REGIONS]
    return domains


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


def scene_seed(domain, split, index, seed=0):
    """The seed of tile `index`'s scene (label map and heights). Benchmark splits: a function of (seed, region,
    split, index, pixel spacing), so two domains of one region and spacing share their scenes (a
    polarization or representation gap changes the radar, not the ground). Corpus splits (CORPUS_SPLITS):
    the domain's name too, so every corpus tile is a scene of its own. Splits of different names never
    share a scene."""
    spacing = domain.spacing_m or SENSORS[domain.sensor].pixel_spacing_m
    if split in CORPUS_SPLITS:
        return stable_seed(seed, domain.region, split, index, spacing, domain.name)
    return stable_seed(seed, domain.region, split, index, spacing)


def simulate_tile(domain, split, index, size, seed=0):
    """One tile of a domain: image (C, size, size) float32 in domain.representation, labels (size, size),
    info; its scene is drawn from scene_seed."""
    sensor = SENSORS[domain.sensor]
    spacing = domain.spacing_m or sensor.pixel_spacing_m
    scene_rng = np.random.default_rng(scene_seed(domain, split, index, seed))
    labels, heights = make_scene(domain.region, size, spacing, scene_rng)
    radar_rng = np.random.default_rng(stable_seed(seed, domain.name, split, index, "radar"))
    image, info = form_image(labels, heights, sensor, domain.pol, domain.representation, radar_rng,
                             region=domain.region, spacing_m=spacing)
    return image, labels, info


# Bump when simulate_tile's output for the same (seed, domain, split, index, size) changes: prepare.py
# then regenerates splits of the older version instead of resuming with them.
# 2: Sentinel-1 thermal noise removal; large homogeneous areas in some scenes; meta "noise_removed".
# 3: every corpus tile its own scene (scene_seed); benchmark splits unchanged.
GENERATOR_VERSION = 3


def split_meta(domain, split, size, seed=0):
    """meta.json content (before SplitWriter adds its own keys) of a simulated split: the domain's sensor
    description and the settings that generated it (generator version, seed, split, tile size in pixels)."""
    provenance = {"generator": "nanosar.sim", "generator_version": GENERATOR_VERSION, "seed": seed, "split": split,
                  "tile": size}
    return {**domain.meta(), "provenance": provenance}


def write_domain(out_dir, domain, split, n_tiles, size, seed=0):
    """Simulate n_tiles tiles of a domain into the split folder out_dir (nanosar.data format)."""
    meta = split_meta(domain, split, size, seed)
    with SplitWriter(out_dir, meta) as writer:
        for i in range(n_tiles):
            image, labels, info = simulate_tile(domain, split, i, size, seed)
            writer.add(image, labels, source=f"sim:{domain.name}:{split}:{i}", **info)


# -----------------------------------------------------------------------------
# 6. The descriptors the physics router sees, per sensor and domain (python -m nanosar.sim --descriptors)


def homogeneous_enl(sensor_code, size=256, seed=0, cls=OTHER, incidence_deg=REFERENCE_INCIDENCE):
    """ENL = mean^2 / var of the linear intensity of a size x size area of one untextured class seen by a
    preset (first polarization), and the value physics expects: the product's looks, or for a
    noise-removed product L (sigma0 / (sigma0 + NESZ))^2 (the subtraction keeps the noise's fluctuation)."""
    sensor = SENSORS[sensor_code]
    labels = np.full((size, size), cls, np.uint8)
    pol = sensor.polarizations[0]
    image, _ = form_image(labels, np.zeros(labels.shape), sensor, pol, "intensity", np.random.default_rng(seed),
                          incidence_deg=incidence_deg)
    intensity = image[0].astype(np.float64)
    expected = sensor.looks
    if sensor.noise_removed:
        sigma0, nesz = 10 ** (sigma0_db(sensor.band, pol, cls, incidence_deg) / 10), 10 ** (sensor.nesz_db / 10)
        expected = sensor.looks * (sigma0 / (sigma0 + nesz)) ** 2
    return intensity.mean() ** 2 / intensity.var(), expected


def domain_descriptors(domain, n_tiles=32, size=128, seed=0, roughness_block=16, split="test"):
    """(n_tiles, 3) directional entropy (nats), ENL, local roughness of a domain's first n_tiles tiles of
    `split`, as nanosar.model.sar_descriptors computes them on X' = log(1 + |x|) of the magnitude of
    the tile in the domain's own unit (roughness over roughness_block x roughness_block blocks)."""
    import torch

    from nanosar.model import SARConfig, sar_descriptors

    images = np.stack([simulate_tile(domain, split, i, size, seed)[0] for i in range(n_tiles)])   # (N, C, H, W)
    cfg = SARConfig(img_size=size, in_chans=images.shape[1], input_unit=domain.representation,
                    roughness_block=roughness_block)
    return sar_descriptors(torch.from_numpy(images), cfg).numpy().astype(np.float64)


def descriptor_table(n_tiles=32, size=128, seed=0, roughness_block=16):
    """The simulator's descriptors against the physics, as markdown: (1) per sensor preset, the ENL of a
    homogeneous area in linear intensity against the looks; (2) per domain of the suite (and the extra
    domains), mean and 5-95 % range of the three descriptors over n_tiles test tiles of size x size."""
    lines = ["| sensor | looks | ENL, homogeneous 256x256 'other' at 35 deg, linear intensity | expected |",
             "|---|---|---|---|"]
    for code, sensor in SENSORS.items():
        enl, expected = homogeneous_enl(code)
        note = " (noise-removed: L (s0 / (s0 + NESZ))^2)" if sensor.noise_removed else ""
        lines.append(f"| {code} ({sensor.name}) | {sensor.looks:g} | {enl:.2f} | {expected:.2f}{note} |")
    caption = (f"Descriptors on X' = log(1 + |x|), {n_tiles} test tiles of {size}x{size} per domain, roughness "
               f"blocks of {roughness_block}: mean [5 %, 95 %]")
    lines += ["", caption, "", "| domain | sensor | unit | entropy (nats) | ENL | roughness |", "|---|---|---|---|---|---|"]
    for domain in suite_domains() + EXTRA_DOMAINS:
        d = domain_descriptors(domain, n_tiles, size, seed, roughness_block)
        cells = [f"{m:.3g} [{lo:.3g}, {hi:.3g}]" for m, lo, hi in
                 zip(d.mean(0), np.percentile(d, 5, axis=0), np.percentile(d, 95, axis=0))]
        lines.append(f"| {domain.name} | {domain.sensor} | {domain.representation} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="nanosar's SAR simulator")
    parser.add_argument("--descriptors", action="store_true",
                        help="print the descriptor table (ENL against looks per sensor, descriptor ranges per domain)")
    parser.add_argument("--tiles", type=int, default=32, help="tiles per domain")
    parser.add_argument("--size", type=int, default=128, help="tile size in pixels")
    parser.add_argument("--roughness-block", type=int, default=16, help="roughness block (SARConfig default 16)")
    args = parser.parse_args()
    if not args.descriptors:
        parser.error("nothing to do: pass --descriptors")
    print(descriptor_table(args.tiles, args.size, roughness_block=args.roughness_block))
