"""
The units a SAR pixel can be in, defined once, with the conversions between them.

    intensity  linear power, sigma0 (or beta0 / gamma0) as a ratio: 0.01 = -20 dB
    amplitude  linear sqrt(intensity), calibrated
    dn         uncalibrated digital numbers, amplitude-like (GF-3 products, 8-bit display stretches);
               amplitude = dn / dn_scale when the scale is known (meta.json "dn_scale", else null)
    db         10 log10(intensity)
    complex    single-look complex as 2 channels (real, imag); real / imag: one of the two

In the magnitude units (MAGNITUDE_UNITS) a pixel of 0, or of the product's declared nodata, in every
channel is no-data: a real scene's zero-filled border, never a measurement (nodata_mask).
"""

import numpy as np

UNITS = ("intensity", "amplitude", "dn", "db", "complex", "real", "imag")
MAGNITUDE_UNITS = ("intensity", "amplitude", "dn")
# DN per unit of calibrated amplitude in the simulator's uint16 products (nanosar/sim.py DN_SCALE):
# sigma0 = -10 dB -> amplitude 0.316 -> DN 100. Real GF-3 scenes have their own: gf3_dn_scale().
SIM_DN_SCALE = 316.0
DB_FLOOR = 1e-10  # intensity floor before log10: -100 dB, so 0 (no-data) never becomes -inf


def dn_to_amplitude(dn, dn_scale):
    """Uncalibrated DN (amplitude-like, any shape) -> calibrated linear amplitude: dn / dn_scale."""
    if not dn_scale or dn_scale <= 0:
        raise ValueError(f"dn_scale must be a positive number (DN per unit amplitude), got {dn_scale!r}")
    return np.asarray(dn, np.float64) / dn_scale


def gf3_dn_scale(qualify_value, calibration_db):
    """dn_scale of a GF-3 product from its XML's QualifyValue (per polarization) and CalibrationConst K (dB).

    GF-3 calibration: sigma0_dB = 10 log10(DN^2 (QV / 32767)^2) - K, i.e. amplitude = DN QV / 32767 /
    10^(K / 20); returns the DN per unit amplitude, 32767 / QV * 10^(K / 20), for dn_to_amplitude."""
    return 32767.0 / qualify_value * 10.0 ** (calibration_db / 20.0)


def amplitude_to_intensity(amplitude):
    """Linear amplitude -> linear intensity (power): amplitude^2."""
    return np.square(np.asarray(amplitude, np.float64))


def intensity_to_amplitude(intensity):
    """Linear intensity -> linear amplitude: sqrt(intensity); intensity must be >= 0."""
    return np.sqrt(np.asarray(intensity, np.float64))


def intensity_to_db(intensity):
    """Linear intensity -> dB: 10 log10(max(intensity, DB_FLOOR)). 0.01 -> -20 dB, 1 -> 0 dB."""
    return 10.0 * np.log10(np.maximum(np.asarray(intensity, np.float64), DB_FLOOR))


def db_to_intensity(db):
    """dB -> linear intensity: 10^(db / 10)."""
    return 10.0 ** (np.asarray(db, np.float64) / 10.0)


def amplitude_to_db(amplitude):
    """Linear amplitude -> dB of the intensity it carries: 20 log10(amplitude)."""
    return intensity_to_db(amplitude_to_intensity(amplitude))


def db_to_amplitude(db):
    """dB -> linear amplitude: 10^(db / 20)."""
    return 10.0 ** (np.asarray(db, np.float64) / 20.0)


def nodata_mask(image, unit, nodata=None):
    """(H, W) bool, True where image (C, H, W) holds no measurement: any channel not finite, or, in a
    magnitude unit, every channel equal to `nodata` (default 0); in db / complex units only a declared
    `nodata` counts (0 dB and a zero real part are measurements)."""
    image = np.asarray(image)
    invalid = ~np.isfinite(image).all(0) if image.dtype.kind in "fc" else np.zeros(image.shape[1:], bool)
    if nodata is None and unit in MAGNITUDE_UNITS:
        nodata = 0
    if nodata is not None and np.isfinite(nodata):
        invalid |= (image == nodata).all(0)
    return invalid


def check_plausible(values, unit, where):
    """ValueError naming `where` when `values` (any shape) cannot be in `unit`, saying what they look like:
    integers or values above +60 dB declared db (DN or linear), negative values declared intensity /
    amplitude / dn (dB or complex parts), calibrated linear values whose top percentile lies above
    +40 dB (intensity > 1e4, amplitude > 100: DN). Non-finite values are left out. Returns None."""
    if unit not in UNITS:
        raise ValueError(f"{where}: unit {unit!r} is not one of {UNITS}")
    values = np.asarray(values)
    if unit in ("complex", "real", "imag") or values.size == 0:
        return
    if unit == "db" and values.dtype.kind in "iub":
        raise ValueError(f"{where}: integer values ({values.dtype}) declared as dB look like DN: give unit 'dn'")
    flat = values.ravel()
    sample = flat[::max(1, flat.size // 1_000_000)]                     # the percentile of ~1e6 values
    sample = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if sample.size == 0:
        return
    low, top = float(np.fmin.reduce(flat)), float(np.fmax.reduce(flat))  # fmin / fmax skip NaN, copy nothing
    high = float(np.percentile(sample, 99))
    if unit == "db" and top > 60:
        raise ValueError(f"{where}: values up to {top:.4g} declared as dB, but no backscatter lies "
                         f"above +60 dB: they look like {'DN' if high > 100 else 'linear intensity or amplitude'} "
                         f"(unit 'dn', 'intensity' or 'amplitude')")
    if unit in MAGNITUDE_UNITS and low < 0:
        raise ValueError(f"{where}: negative values (down to {low:.4g}) declared as {unit}, which is never "
                         f"negative: they look like dB (unit 'db') or complex parts ('real', 'imag')")
    if unit in ("intensity", "amplitude") and values.dtype.kind in "iu":
        raise ValueError(f"{where}: integer values ({values.dtype}) declared as calibrated {unit} look like "
                         f"uncalibrated DN: give unit 'dn'")
    if high > {"intensity": 1e4, "amplitude": 100.0}.get(unit, np.inf):
        raise ValueError(f"{where}: values declared as calibrated {unit} reach {high:.4g} (99th percentile), above "
                         f"+40 dB: they look like uncalibrated DN: give unit 'dn'")
