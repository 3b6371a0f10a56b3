"""Pixel units (nanosar/units.py): golden values, round trips between units, the GF-3 calibration relation,
no-data masks, and the refusal of values that cannot be in the unit they are declared in."""

import numpy as np
import pytest

from nanosar import sim, units


def test_one_definition_of_the_units():
    assert "dn" in units.UNITS and set(units.MAGNITUDE_UNITS) <= set(units.UNITS)
    assert units.SIM_DN_SCALE == sim.DN_SCALE                  # the simulator's DN per unit amplitude


def test_golden_values():
    assert units.intensity_to_db(0.01) == pytest.approx(-20.0)
    assert units.db_to_intensity(-20.0) == pytest.approx(0.01)
    assert units.amplitude_to_db(0.1) == pytest.approx(-20.0)
    assert units.db_to_amplitude(-20.0) == pytest.approx(0.1)
    assert units.intensity_to_db(0.0) == pytest.approx(-100.0)        # floored, never -inf
    assert units.dn_to_amplitude(100.0, units.SIM_DN_SCALE) == pytest.approx(0.31646, abs=1e-5)
    assert units.amplitude_to_db(units.dn_to_amplitude(100.0, units.SIM_DN_SCALE)) == pytest.approx(-9.994, abs=1e-3)


def test_round_trips():
    dn = np.array([1.0, 50.0, 100.0, 3162.0, 65535.0])
    amplitude = units.dn_to_amplitude(dn, 316.0)
    np.testing.assert_allclose(units.db_to_amplitude(units.amplitude_to_db(amplitude)), amplitude, rtol=1e-12)
    np.testing.assert_allclose(units.db_to_amplitude(units.amplitude_to_db(amplitude)) * 316.0, dn, rtol=1e-12)
    intensity = np.array([1e-4, 0.01, 0.5, 3.0])
    np.testing.assert_allclose(units.db_to_intensity(units.intensity_to_db(intensity)), intensity, rtol=1e-12)
    np.testing.assert_allclose(units.amplitude_to_intensity(units.intensity_to_amplitude(intensity)), intensity)
    np.testing.assert_allclose(units.intensity_to_db(units.amplitude_to_intensity(amplitude)),
                               units.amplitude_to_db(amplitude))


def test_gf3_calibration_relation():
    # sigma0_dB = 10 log10(DN^2 (QV / 32767)^2) - K, computed directly and through dn -> amplitude -> dB
    dn, qv, k = np.array([40.0, 400.0, 4000.0]), 1.7, 32.5
    direct = 10 * np.log10(dn**2 * (qv / 32767) ** 2) - k
    np.testing.assert_allclose(units.amplitude_to_db(units.dn_to_amplitude(dn, units.gf3_dn_scale(qv, k))), direct)


@pytest.mark.parametrize("scale", [None, 0, -3.0])
def test_dn_to_amplitude_needs_a_scale(scale):
    with pytest.raises(ValueError, match="dn_scale must be a positive number"):
        units.dn_to_amplitude(100.0, scale)


def test_nodata_mask():
    image = np.ones((2, 3, 4), np.float32)
    image[:, 0, 0] = 0.0                # every channel 0: no-data in a magnitude unit
    image[1, 0, 1] = 0.0                # one channel 0: a dark measurement, kept
    image[0, 2, 3] = np.nan
    expected = np.zeros((3, 4), bool)
    expected[0, 0] = expected[2, 3] = True
    for unit in units.MAGNITUDE_UNITS:
        np.testing.assert_array_equal(units.nodata_mask(image, unit), expected)
    expected[0, 0] = False              # 0 dB and a zero real part are measurements
    np.testing.assert_array_equal(units.nodata_mask(image, "db"), expected)
    np.testing.assert_array_equal(units.nodata_mask(image, "complex"), expected)
    image[:, 1, 1] = -9999.0
    assert units.nodata_mask(image, "db", nodata=-9999.0)[1, 1]
    assert units.nodata_mask(np.zeros((1, 2, 2), np.uint16), "dn").all()


@pytest.mark.parametrize("values, unit, looks_like", [
    (np.full((8, 8), 120, np.uint16), "db", r"integer values \(uint16\) declared as dB look like DN"),
    (np.linspace(0, 900, 64, dtype=np.float32), "db", r"values up to 900 declared as dB.*look like DN"),
    (np.linspace(0, 70, 64, dtype=np.float32), "db", r"values up to 70 declared as dB.*linear intensity or amplitude"),
    (np.linspace(-25, -5, 64, dtype=np.float32), "amplitude", r"negative values .*amplitude.*look like dB"),
    (np.linspace(-25, -5, 64, dtype=np.float32), "dn", r"negative values .*dn.*look like dB"),
    (np.linspace(-3, 2, 64, dtype=np.float32), "intensity", r"negative values .*intensity"),
    (np.linspace(100, 6e4, 64, dtype=np.float32), "intensity", r"calibrated intensity reach .*above \+40 dB.*DN"),
    (np.linspace(10, 900, 64, dtype=np.float32), "amplitude", r"calibrated amplitude reach .*uncalibrated DN"),
    (np.full((8, 8), 3, np.uint8), "amplitude", r"integer values \(uint8\) declared as calibrated amplitude .*DN"),
])
def test_implausible_values_are_refused_naming_where_and_what_they_look_like(values, unit, looks_like):
    with pytest.raises(ValueError, match=r"^scene\.tif: (values declared as )?" + looks_like):
        units.check_plausible(values, unit, "scene.tif")


@pytest.mark.parametrize("values, unit", [
    (np.linspace(-30, 5, 64, dtype=np.float32), "db"),
    (np.array([-25.0, np.nan, 3.0], np.float32), "db"),                   # NaN is left out
    (np.linspace(0, 2.0, 64, dtype=np.float32), "amplitude"),
    (np.linspace(0, 5.0, 64, dtype=np.float32), "intensity"),
    (np.full((8, 8), 65535, np.uint16), "dn"),
    (np.array([-300, 20, 4], np.int16), "real"),                          # complex parts have any sign
    (np.zeros((0,), np.float32), "db"),
])
def test_plausible_values_pass(values, unit):
    units.check_plausible(values, unit, "scene.tif")


def test_an_unknown_unit_is_refused():
    with pytest.raises(ValueError, match=r"scene\.tif: unit 'linear' is not one of"):
        units.check_plausible(np.ones(3), "linear", "scene.tif")
