"""
A physics-based SAR simulator for the embedded default data: procedural land-cover scenes in the
7-class taxonomy, radar image formation for real sensor profiles, and the synthetic domain-
generalization suite whose 22 sub-benchmarks mirror the paper's 8 gap types.

    labels, heights = make_scene("N", size=128, spacing_m=8.0, rng)        # (H, W) class ids, metres
    image, info = form_image(labels, heights, SENSORS["G3"], "HH", "db", rng)                        # (1, H, W)
    image, info = form_image(labels, heights, SENSORS["S1"], ("VV", "VH"), "db", rng)                # (2, H, W)

Reading order: 1. sensor profiles; 2. backscatter tables; 3. scene generators; 4. image formation
(sigma0 with incidence dependence, water from the wind, flooded vegetation, layover / shadow / double
bounce, K-distributed texture, thermal noise, speckle with the product's looks, thermal noise removal,
quantisation, representation); 5. the suite; 6. the tables (python -m nanosar.sim --sigma0). The router's
descriptors per domain need the model, which sim must not import: python -m nanosar.ablation --descriptor-table.
The backscatter numbers are engineering defaults inside the published ranges named at PUBLISHED_SIGMA0_DB
(tested), not measurements.

Per class, the sigma0 the simulated products deliver (python -m nanosar.sim --sigma0, generator version 4:
the class's mean intensity per 128x128 tile, median [IQR] over 16 tiles of each corpus region, in dB),
beside the published ranges (Ulaby & Dobson 1989; Ulaby & Long 2014; NASA SERVIR SAR Handbook 2019; open
water: CMOD5, Hersbach et al. 2007, S1 flood thresholds, Twele et al. 2016):

    | sensor | pol | other | building | road | water | bare land | forest | cropland |
    |---|---|---|---|---|---|---|---|---|
    | S1 | VV | -9.6 [-10.8, -8.6] | 4.8 [3.7, 5.9] | -10.4 [-13.0, -8.5] | -17.2 [-21.5, -10.5] | -12.9 [-13.9, -11.8] | -7.7 [-8.0, -7.3] | -11.2 [-11.6, -10.7] |
    | S1 | VH | -17.2 [-17.9, -16.6] | -10.5 [-10.8, -10.0] | -18.3 [-19.8, -16.8] | -24.5 [-26.2, -20.4] | -21.3 [-22.3, -20.5] | -13.7 [-14.0, -13.4] | -17.4 [-17.9, -16.7] |
    | G3 | HH | -7.7 [-8.9, -6.5] | 6.5 [5.5, 7.9] | -7.7 [-10.0, -5.4] | -13.1 [-17.2, -9.6] | -11.0 [-11.5, -10.0] | -6.3 [-6.8, -5.9] | -9.4 [-10.3, -8.7] |
    | G3 | HV | -14.6 [-15.2, -13.8] | -8.5 [-8.9, -8.1] | -15.6 [-16.2, -13.4] | -17.1 [-18.5, -15.6] | -16.7 [-17.1, -16.4] | -11.5 [-12.0, -11.3] | -14.7 [-15.3, -14.4] |
    | L2 | HH | -9.4 [-10.7, -6.9] | 8.1 [6.7, 9.0] | -8.1 [-11.2, -6.3] | -17.0 [-21.6, -9.1] | -13.6 [-14.8, -11.1] | -6.9 [-7.4, -6.6] | -10.7 [-11.3, -10.2] |
    | L2 | HV | -18.9 [-20.0, -17.6] | -10.1 [-10.4, -9.4] | -19.1 [-21.2, -17.9] | -23.2 [-25.3, -20.2] | -22.6 [-23.6, -21.5] | -12.4 [-12.9, -12.1] | -19.1 [-19.6, -18.6] |
    | X1 | HH | -6.6 [-9.2, -4.7] | 3.2 [2.6, 3.8] | -9.0 [-12.4, -5.3] | -11.3 [-16.6, -8.1] | -10.3 [-11.7, -8.4] | -7.4 [-8.0, -6.9] | -8.6 [-9.4, -7.4] |
    | AC | VV | -11.1 [-12.5, -8.1] | -1.5 [-2.2, -0.8] | -19.1 [-24.1, -16.2] | -22.2 [-27.9, -12.0] | -14.1 [-16.4, -12.2] | -8.7 [-9.2, -8.0] | -12.6 [-13.9, -11.5] |
    | published, C-band | VV | -14...-8 | -8...5 | -22...-12 | -26...-12 | -20...-8 | -9...-6 | -16...-7 |
    | published, C-band | VH | -21...-15 | -17...-7 | - | -32...-22 | -27...-18 | -15...-12 | -22...-13 |
    | published, L-band | HH | - | -5...8 | - | -30...-18 | -22...-10 | -9...-5 | -16...-7 |
    | published, L-band | HV | - | -18...-6 | - | - | -30...-22 | -14...-11 | -25...-15 |
    | published, X-band | HH | - | -6...8 | -20...-11 | -25...-10 | -18...-7 | - | -14...-6 |
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
# and GF-3 DN products are calibrated without a noise term (their product formats' calibration equations); TerraSAR-X and
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

# Water and wind. Open water scatters by Bragg resonance on wind-driven capillary-gravity waves, so its
# sigma0 is set by the wind, not by a constant (CMOD5, Hersbach et al. 2007, for C-band VV; Donelan &
# Pierson 1987 for the onset). An engineering model in the spirit of CMOD, not CMOD itself:
#   sigma0 (linear) = calm + onset(U) * Bragg(U),   onset(U) = 1 - exp(-(U / WIND_ONSET_M_S)^3)
#   Bragg (dB) = WATER_VV_DB[band] + POL_OFFSET_DB[pol] + 10 WIND_EXPONENT[band] log10(U / REFERENCE_WIND)
#                + slope (theta - 35)
#   calm  (dB) = the Bragg level at the reference wind - CALM_BELOW_DB (no waves: specular, away from the radar)
# with U the wind speed at 10 m (m/s) and slope the water row of INCIDENCE_SLOPE_DB (-0.7 dB/deg). Levels: C-band
# VV -19 dB at 4 m/s and 35 deg, -13.5 dB at 7.5 m/s, -25 dB and below under 2 m/s (SERVIR SAR
# Handbook 2019 and Ulaby & Long 2014: open water C VV -20 (-26...-12); Sentinel-1 flood thresholds -15...-20 dB VV, Twele et al. 2016; the
# Sen1Floods11 flooded sample's median -17.6 VV). Polarization: HH 3 dB below VV over water (polarization
# ratio, 2-5 dB at mid incidence), cross-pol 8 dB below VV (6-10 dB in S1 flood products). Band: L darker and
# less wind-sensitive (exponent 1.5), X brighter (capillary waves).
WATER_VV_DB = {"C": -19.0, "L": -22.0, "X": -17.0}     # Bragg level at REFERENCE_WIND and 35 deg, VV
POL_OFFSET_DB = {"VV": 0.0, "HH": -3.0, "VH": -8.0, "HV": -8.0}
WIND_EXPONENT = {"C": 2.0, "L": 1.5, "X": 2.2}          # sigma0 ~ U^exponent above the onset
REFERENCE_WIND = 4.0                                    # m/s at 10 m: the default when no wind is given
WIND_ONSET_M_S = 2.5                                    # capillary waves need about 2-3 m/s
CALM_BELOW_DB = 8.0
# The wind prior: per scene U ~ Weibull(shape 2, scale REGIONS[...]["wind_m_s"]) clipped to [0, MAX_WIND]; the
# shape 2 (Rayleigh) fits surface winds over sea and land (Pavia & O'Brien 1986); scale 4 m/s inland (medians
# near 3 m/s) and 7 m/s over the open sea. Within the scene the wind falls to zero near shores (wind shadow
# of banks, trees and buildings over WIND_FETCH_M of water) and varies by +-40 % in patches (calm slicks).
MAX_WIND = 12.0
WIND_FETCH_M = 100.0
# Flooded vegetation: standing water under a canopy or a crop adds a trunk-water (stalk-water) double bounce,
# bright in co-pol (L-band HH +3...+8 dB over flooded forest, Hess et al. 1990; C-band +2...+4 dB, Townsend
# 2002; flooded rice HH, Le Toan et al. 1997); cross-pol changes little. Labelled water (the flood extent);
# make_scene marks it with the vegetation's height in `heights` (>= FOREST_HEIGHT_M: forest, else crop).
FLOODED_VEGETATION_DB = {"L": {"co": 5.0, "cross": 1.0}, "C": {"co": 3.0, "cross": 0.5},
                         "X": {"co": 1.5, "cross": 0.0}}
FOREST_HEIGHT_M = 5.0


def water_sigma0_db(band, pol, incidence_deg, wind_m_s):
    """sigma0 (dB) of open water: band "L"/"C"/"X", pol "VV"..., incidence (deg) and wind speed at 10 m (m/s),
    scalars or arrays of one shape. Rises with the wind, falls with the incidence (the model above)."""
    wind = np.maximum(np.asarray(wind_m_s, dtype=np.float64), 1e-3)
    level = WATER_VV_DB[band] + POL_OFFSET_DB[pol] + INCIDENCE_SLOPE_DB[WATER] * (incidence_deg - REFERENCE_INCIDENCE)
    bragg = 10.0 ** ((level + 10.0 * WIND_EXPONENT[band] * np.log10(wind / REFERENCE_WIND)) / 10.0)
    calm = 10.0 ** ((level - CALM_BELOW_DB) / 10.0)
    onset = 1.0 - np.exp(-(wind / WIND_ONSET_M_S) ** 3)
    return 10.0 * np.log10(calm + onset * bragg)


for _band, _table in SIGMA0_DB.items():   # the water column: the wind model at the reference wind and 35 deg
    for _pol in _table:
        _row = list(_table[_pol])
        _row[WATER] = float(water_sigma0_db(_band, _pol, REFERENCE_INCIDENCE, REFERENCE_WIND))
        _table[_pol] = tuple(_row)
del _band, _table, _pol, _row


# Published ranges (dB, mid incidence 30-40 deg) the tables follow, per (band, polarization) and class: typical
# spread of land-cover sigma0 after Ulaby & Dobson, Handbook of Radar Scattering Statistics for Terrain (1989),
# Ulaby & Long, Microwave Radar and Radiometric Remote Sensing (2014) and the NASA SERVIR SAR Handbook (2019);
# open water as above (CMOD5; S1 flood thresholds). Tested against the tables and against simulated S1 tiles.
PUBLISHED_SIGMA0_DB = {
    ("C", "VV"): {WATER: (-26, -12), BUILDING: (-8, 5), FOREST: (-9, -6), BARE: (-20, -8), CROP: (-16, -7),
                  OTHER: (-14, -8), ROAD: (-22, -12)},
    ("C", "VH"): {WATER: (-32, -22), BUILDING: (-17, -7), FOREST: (-15, -12), BARE: (-27, -18), CROP: (-22, -13),
                  OTHER: (-21, -15)},
    ("L", "HH"): {WATER: (-30, -18), BUILDING: (-5, 8), FOREST: (-9, -5), BARE: (-22, -10), CROP: (-16, -7)},
    ("L", "HV"): {BUILDING: (-18, -6), FOREST: (-14, -11), BARE: (-30, -22), CROP: (-25, -15)},
    ("X", "HH"): {WATER: (-25, -10), BUILDING: (-6, 8), BARE: (-18, -7), CROP: (-14, -6), ROAD: (-20, -11)},
}


def is_cross_pol(pol):
    return pol[0] != pol[1]


def sigma0_db(band, pol, labels, incidence_deg, wind_m_s=REFERENCE_WIND):
    """Mean backscatter (dB) per pixel: labels (H, W) class ids, incidence_deg and wind_m_s (m/s at 10 m)
    scalars or (H, W). Land classes from SIGMA0_DB with their incidence slope, water from water_sigma0_db."""
    table = np.asarray(SIGMA0_DB[band][pol], dtype=np.float64)
    slope = np.asarray(INCIDENCE_SLOPE_DB)
    land = table[labels] + slope[labels] * (incidence_deg - REFERENCE_INCIDENCE)
    return np.where(labels == WATER, water_sigma0_db(band, pol, incidence_deg, wind_m_s), land)


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


def box_mean(x, radius):
    """Mean of x (H, W) over the (2 radius + 1)^2 window around each pixel (edges padded with the edge value),
    by an integral image: O(H W) whatever the radius."""
    r = int(radius)
    padded = np.pad(np.asarray(x, dtype=np.float64), r + 1, mode="edge")
    c = padded.cumsum(0).cumsum(1)
    H, W = x.shape
    k = 2 * r + 1
    total = c[k:k + H, k:k + W] - c[:H, k:k + W] - c[k:k + H, :W] + c[:H, :W]
    return total / (k * k)


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
              wind_m_s=4.0, open=0.25, open_classes=(CROP, CROP, BARE, OTHER)),                 # large fields of the plain
    "S": dict(description="south: villages, paddy fields, ponds, forested hills",
              field_m=60, field_classes=(CROP, CROP, WATER, OTHER), forest=0.30, urban=0.12, block_m=70,
              street_m=6, building_m=(8, 15), fill=0.55, height_m=(4, 9), river_m=25, lakes=0.08, angle=(0, 90),
              wind_m_s=4.0, flooded=0.3, flood_m=30, open=0.3, open_classes=(WATER, WATER, FOREST, CROP)),               # lakes, forested hills
    "A": dict(description="arid: bare land, sparse settlements, long straight roads, dry riverbeds",
              field_m=250, field_classes=(BARE, BARE, BARE, CROP, OTHER), forest=0.02, urban=0.08, block_m=90,
              street_m=10, building_m=(10, 25), fill=0.35, height_m=(4, 10), river_m=0, lakes=0.0, angle=(0, 90),
              wind_m_s=4.0, straight_roads=3, open=0.4, open_classes=(BARE, BARE, BARE, OTHER)),  # desert plains
    "C": dict(description="coastal: wind-roughened sea, harbour and mixed urban, beach",
              field_m=120, field_classes=(OTHER, CROP, BARE), forest=0.08, urban=0.35, block_m=100,
              street_m=10, building_m=(15, 35), fill=0.7, height_m=(8, 25), river_m=0, lakes=0.0, angle=(0, 45),
              wind_m_s=7.0, sea=0.35, open=0.3, open_classes=(WATER,)),           # the open sea
    "F": dict(description="flood plain: a river in flood, flooded fields, forest and crops under water, villages",
              field_m=120, field_classes=(CROP, CROP, OTHER, BARE), forest=0.15, urban=0.10, block_m=80,
              street_m=8, building_m=(10, 20), fill=0.6, height_m=(4, 10), river_m=120, lakes=0.08, angle=(0, 90),
              wind_m_s=4.0, flooded=0.6, flood_m=60, open=0.3, open_classes=(WATER, CROP, OTHER)),
}
CORPUS_REGIONS = ("N", "S", "A", "C")   # the regions of the benchmarks and of the pre-training corpus; "F" only
                                        # in the flood domain of EXTRA_DOMAINS


def make_scene(region, size, spacing_m, rng):
    """A land-cover scene. -> labels (size, size) uint8 in CLASSES_7 order, heights (size, size) metres: of
    buildings, and of the vegetation standing in flooded vegetation (labelled water); 0 elsewhere."""
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
    # flooded vegetation, in a share of the scenes of regions with r["flooded"]: forest and crops within
    # flood_m of water stand in water. Labelled water (the flood extent); heights keeps the vegetation's height.
    if r.get("flooded") and rng.random() < r["flooded"] and water.any():
        near_water = box_mean(water, scale(r["flood_m"])) > 0
        for cls, height_m in ((FOREST, (10.0, 25.0)), (CROP, (0.5, 1.5))):
            flooded = near_water & (labels == cls)
            heights[flooded] = rng.uniform(*height_m)
            labels[flooded] = WATER
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


def wind_field(labels, region, spacing_m, rng):
    """Wind speed at 10 m (m/s) per pixel (H, W) of a scene: one speed per scene from the region's Weibull prior
    (shape 2, scale REGIONS[region]["wind_m_s"], clipped to MAX_WIND), zero at the shores rising over
    WIND_FETCH_M of open water (wind shadow), times patches of 0.6-1.4 (calm slicks and gusts)."""
    H, W = labels.shape
    speed = min(REGIONS[region]["wind_m_s"] * rng.weibull(2.0), MAX_WIND)
    fetch_px = max(WIND_FETCH_M / spacing_m, 1.0)
    water_share = box_mean(labels == WATER, fetch_px)                     # 0.5 at a straight shore, 1 offshore
    shelter = np.clip(2.0 * water_share - 1.0, 0.0, 1.0)
    patches = 0.6 + 0.8 * smooth_noise((H, W), max(400.0 / spacing_m, 2.0), rng)
    return speed * shelter * patches


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


def mean_backscatter(labels, heights, geometry, band, pol, incidence_deg, wind_m_s=REFERENCE_WIND):
    """Mean linear intensity (H, W) of one polarization before texture: sigma0 per class at the incidence
    angle (water: at the wind, wind_m_s scalar or (H, W) m/s), flooded vegetation (water with heights > 0),
    double bounce at the near walls, layover, shadow. geometry: (near_wall, layover, shadow) masks from
    building_geometry."""
    near_wall, layover, shadow = geometry
    s0_db = sigma0_db(band, pol, labels, incidence_deg, wind_m_s)
    cross = is_cross_pol(pol)
    flooded = (labels == WATER) & (heights > 0)
    if flooded.any():                                               # the vegetation's sigma0 + trunk-water bounce
        vegetation = np.where(heights >= FOREST_HEIGHT_M, FOREST, CROP)
        boost = FLOODED_VEGETATION_DB[band]["cross" if cross else "co"]
        s0_db = np.where(flooded, sigma0_db(band, pol, vegetation, incidence_deg) + boost, s0_db)
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


NOISE_REMOVAL_WINDOW = 5      # pixels: the window over which the noise-to-signal ratio is estimated
NOISE_REMOVAL_FLOOR = 0.05    # the least fraction of a pixel's intensity that noise removal keeps


def remove_thermal_noise(intensity, nesz, window=NOISE_REMOVAL_WINDOW, floor=NOISE_REMOVAL_FLOOR):
    """Thermal noise removal of a multilooked detected product (H, W linear intensity; nesz linear): each pixel
    scaled by 1 - nesz / <I>, <I> its window x window mean (about 25 x the product's looks), floored at `floor`.
    The noise's expected power leaves the mean (E[out] ~ sigma0) while each pixel keeps its speckle: a
    homogeneous area keeps the spread of 10 log10 Gamma(L) (2.2 dB at 4.4 looks; 2.9 dB for VH water, below
    the noise, where the window mean's own fluctuation adds) and almost no pixel reaches the floor, as in the noise-removed GRD products users see (Sentinel-1 VV water about -20 dB with a spread of a
    few dB). Subtracting nesz from each single speckled sample instead (intensity - nesz, floored) would send a
    quarter of dark water pixels (VH) to the floor and spread the rest over tens of dB."""
    local = box_mean(intensity, window // 2)
    return intensity * np.maximum(1.0 - nesz / np.maximum(local, 1e-30), floor)


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


def form_image(labels, heights, sensor, pol, representation, rng, wind_m_s=REFERENCE_WIND, incidence_deg=None,
               spacing_m=None):
    """Simulate one SAR tile. labels, heights: (H, W) from make_scene; pol: one polarization ("VV") or
    a tuple of them (("VV", "VH"): a multi-polarization product, channels in that order).

    wind_m_s: wind speed at 10 m (m/s) over water, a scalar or (H, W) from wind_field.
    Returns image (C, H, W) float32 in the unit named by representation (see REPRESENTATIONS; C = the
    number of polarizations, or 2 for "complex") and a dict with the tile's incidence angle. The chain:
    sigma0(class, band, pol, incidence, wind) + flooded vegetation, double bounce and layover -> x Gamma(nu) texture -> + thermal
    noise (NESZ) -> speckle: complex Gaussian (SLC) or Gamma with the product's looks -> noise removal
    (noise-removed products: scaled by 1 - NESZ / local mean) -> quantisation (uint16 DN products) -> representation.
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
    means = [mean_backscatter(labels, heights, geometry, sensor.band, p, incidence_deg, wind_m_s) for p in pols]
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


# Domains written beside the benchmarks' (prepare.py synthetic, suite.json "extra_domains"), in no benchmark:
# dual-pol Sentinel-1 products (VV, VH in dB, as GRD IW 1SDV), so that a model trained on the simulator reads
# a real dual-pol product directly. N-S1-VV+VH-db: the scenes of N-S1-VV-db (same region and pixel spacing),
# its VV channel the same physics with other speckle. F-S1-VV+VH-db: the flood plain (region "F": a river in
# flood, flooded fields, flooded forest and crops), for flood mapping; its class shares are in its meta.json
# ("class_pixels") and the README (water 38 % of the pixels, a third of it flooded vegetation).
EXTRA_DOMAINS = [D("N", "S1", ("VV", "VH")), D("F", "S1", ("VV", "VH"))]


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
                    domains += [D(region, code, pol, representation, spacing) for region in CORPUS_REGIONS]
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
    wind = wind_field(labels, domain.region, spacing, scene_rng)      # part of the scene: shared across radars
    radar_rng = np.random.default_rng(stable_seed(seed, domain.name, split, index, "radar"))
    image, info = form_image(labels, heights, sensor, domain.pol, domain.representation, radar_rng,
                             wind_m_s=wind, spacing_m=spacing)
    open_water = (labels == WATER) & (heights == 0)
    if open_water.any():
        info["water_wind_m_s"] = round(float(np.median(wind[open_water])), 2)   # median wind over open water
    return image, labels, info


# Bump when simulate_tile's output for the same (seed, domain, split, index, size) changes: prepare.py
# then regenerates splits of the older version instead of resuming with them.
# 2: Sentinel-1 thermal noise removal; large homogeneous areas in some scenes; meta "noise_removed".
# 3: every corpus tile its own scene (scene_seed); benchmark splits unchanged.
# 4: water sigma0 from the wind (per-scene Weibull wind, shore shadow), flooded vegetation (regions S and F),
#    noise removal on the multilooked mean; the flood-plain domain F-S1-VV+VH-db.
GENERATOR_VERSION = 4


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
# 6. The tables: ENL against the looks per sensor, sigma0 per class (python -m nanosar.sim --sigma0)


def homogeneous_enl(sensor_code, size=256, seed=0, cls=OTHER, incidence_deg=REFERENCE_INCIDENCE):
    """ENL = mean^2 / var of the linear intensity of a size x size area of one untextured class seen by a
    preset (first polarization), and the value physics expects: the product's looks (noise removal scales
    each pixel by its window's signal share, which keeps the looks)."""
    sensor = SENSORS[sensor_code]
    labels = np.full((size, size), cls, np.uint8)
    pol = sensor.polarizations[0]
    image, _ = form_image(labels, np.zeros(labels.shape), sensor, pol, "intensity", np.random.default_rng(seed),
                          incidence_deg=incidence_deg)
    intensity = image[0].astype(np.float64)
    return intensity.mean() ** 2 / intensity.var(), sensor.looks


def class_sigma0_table(n_tiles=16, size=128, seed=0, sensors=tuple(SENSORS)):
    """Per sensor preset and polarization, the simulated sigma0 of each class as its products deliver it (dB
    tiles, speckle, noise and, for S1, noise removal included): the class's mean intensity per tile, over
    n_tiles tiles of each corpus region -> {(sensor, pol): {class id: (median, q25, q75) dB}} (split "sigma0",
    scenes of their own)."""
    table = {}
    for code in sensors:
        for pol in SENSORS[code].polarizations[:2] if code == "S1" else SENSORS[code].polarizations:
            means = {cls: [] for cls in range(len(CLASSES_7))}
            for region in CORPUS_REGIONS:
                for i in range(n_tiles):
                    image, labels, _ = simulate_tile(D(region, code, pol), "sigma0", i, size, seed)
                    intensity = 10.0 ** (image[0].astype(np.float64) / 10.0)
                    for cls in np.unique(labels):
                        if (labels == cls).sum() >= 64:
                            means[int(cls)].append(10.0 * np.log10(intensity[labels == cls].mean()))
            table[code, pol] = {cls: tuple(np.percentile(v, [50, 25, 75])) for cls, v in means.items() if v}
    return table


def format_class_sigma0_table(table):
    """class_sigma0_table as markdown: median [q25, q75] dB per class, and the published range where known."""
    lines = [f"| sensor | pol | {' | '.join(CLASSES_7)} |", "|---|---|" + "---|" * len(CLASSES_7)]
    for (code, pol), row in table.items():
        cells = [f"{row[c][0]:.1f} [{row[c][1]:.1f}, {row[c][2]:.1f}]" if c in row else "-" for c in range(len(CLASSES_7))]
        lines.append(f"| {code} | {pol} | {' | '.join(cells)} |")
    for (band, pol), ranges in PUBLISHED_SIGMA0_DB.items():
        cells = [f"{ranges[c][0]}...{ranges[c][1]}" if c in ranges else "-" for c in range(len(CLASSES_7))]
        lines.append(f"| published, {band}-band | {pol} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="nanosar's SAR simulator (the router's descriptors per sensor and "
                                                 "domain: python -m nanosar.ablation --descriptor-table)")
    parser.add_argument("--sigma0", action="store_true",
                        help="print each class's simulated sigma0 (median [IQR] dB) per sensor and polarization, "
                             "beside the published ranges")
    parser.add_argument("--tiles", type=int, default=32, help="twice the tiles per corpus region (32: 16 each)")
    parser.add_argument("--size", type=int, default=128, help="tile size in pixels")
    args = parser.parse_args()
    if not args.sigma0:
        parser.error("nothing to do: pass --sigma0")
    print(format_class_sigma0_table(class_sigma0_table(args.tiles // 2, args.size)))
