"""The SAR simulator against the physics tables, and the synthetic DG suite's promises."""

import os

import numpy as np
import pytest

from nanosar import sim
from nanosar.data import Split

BARE, OTHER, ROAD, WATER, FOREST, BUILDING = sim.BARE, sim.OTHER, sim.ROAD, sim.WATER, sim.FOREST, sim.BUILDING


def homogeneous(cls, size=256):
    return np.full((size, size), cls, np.uint8), np.zeros((size, size))


def intensity_of(cls, sensor, pol, incidence=35.0, seed=0, size=256):
    labels, heights = homogeneous(cls, size)
    image, _ = sim.form_image(labels, heights, sim.SENSORS[sensor], pol, "intensity", np.random.default_rng(seed),
                              incidence_deg=incidence)
    return image[0].astype(np.float64)


@pytest.mark.parametrize("sensor, pol", [("S1", "VV"), ("S1", "VH"), ("L2", "HH"), ("L2", "HV"), ("X1", "HH")])
@pytest.mark.parametrize("cls", [OTHER, ROAD, WATER, BARE])
def test_mean_intensity_matches_sigma0_table_plus_noise_floor(sensor, pol, cls):
    """Linear mean of a homogeneous area = sigma0 (table, 35 deg) + NESZ, within 4% (65k speckled pixels)."""
    s = sim.SENSORS[sensor]
    expected = 10 ** (sim.SIGMA0_DB[s.band][pol][cls] / 10) + 10 ** (s.nesz_db / 10)
    assert intensity_of(cls, sensor, pol).mean() == pytest.approx(expected, rel=0.04)


def test_incidence_angle_dependence():
    """Water falls by its slope (-0.7 dB/deg) between 25 and 45 degrees: ~14 dB, noise floor aside."""
    near, far = intensity_of(WATER, "X1", "HH", 25.0).mean(), intensity_of(WATER, "X1", "HH", 45.0).mean()
    noise = 10 ** (sim.SENSORS["X1"].nesz_db / 10)
    assert 10 * np.log10((near - noise) / (far - noise)) == pytest.approx(14.0, abs=0.6)


@pytest.mark.parametrize("sensor", ["S1", "L2", "G3", "X1"])
def test_speckle_enl_equals_the_product_looks(sensor):
    intensity = intensity_of(OTHER, sensor, sim.SENSORS[sensor].polarizations[0])
    enl = intensity.mean() ** 2 / intensity.var()
    assert enl == pytest.approx(sim.SENSORS[sensor].looks, rel=0.08)


def test_texture_gives_the_k_distribution_variance():
    """Forest: Gamma texture nu = 8 times 4.4-look speckle -> Var/mean^2 = (1 + 1/L)(1 + 1/nu) - 1."""
    intensity = intensity_of(FOREST, "S1", "VV")
    looks, nu = sim.SENSORS["S1"].looks, sim.TEXTURE_NU[FOREST]
    assert intensity.var() / intensity.mean() ** 2 == pytest.approx((1 + 1 / looks) * (1 + 1 / nu) - 1, rel=0.1)


def test_slc_is_circular_gaussian():
    labels, heights = homogeneous(OTHER)
    s = sim.SENSORS["G3"]
    image, _ = sim.form_image(labels, heights, s, "VV", "complex", np.random.default_rng(1), incidence_deg=35.0)
    re, im = image.astype(np.float64)
    power = 10 ** (sim.SIGMA0_DB["C"]["VV"][OTHER] / 10) + 10 ** (s.nesz_db / 10)
    assert abs(re.mean()) < 0.01 * np.sqrt(power) and abs(im.mean()) < 0.01 * np.sqrt(power)
    assert re.var() == pytest.approx(power / 2, rel=0.05) and im.var() == pytest.approx(power / 2, rel=0.05)
    assert abs(np.corrcoef(re.ravel(), im.ravel())[0, 1]) < 0.02


def test_building_geometry_double_bounce_layover_shadow():
    """One 20 m building on bare ground seen from the left: bright near wall, layover before it, shadow after."""
    labels = np.full((64, 128), BARE, np.uint8)
    labels[16:48, 50:70] = BUILDING
    heights = np.where(labels == BUILDING, 20.0, 0.0)
    wall, layover, shadow = sim.building_geometry(labels, heights, incidence_deg=30.0, spacing_m=1.0)
    assert wall[16:48, 50].all() and wall.sum() == 32
    assert layover[16:48, 50 - 35:50].all() and not layover[16:48, :50 - 35].any()  # 20 / tan 30 = 34.6 m
    assert shadow[16:48, 70:70 + 12].all() and not shadow[16:48, 70 + 12:].any()     # 20 * tan 30 = 11.5 m
    image, _ = sim.form_image(labels, heights, sim.SENSORS["X1"], "HH", "db", np.random.default_rng(0),
                              incidence_deg=30.0)
    db = image[0]
    assert db[16:48, 70:80].mean() < db[16:48, 100:120].mean() - 5      # shadow at the noise floor
    assert db[16:48, 20:48].mean() > db[16:48, 100:120].mean() + 3      # layover brighter than bare ground
    assert db[16:48, 50].mean() > db[16:48, 55:70].mean() + 5           # double-bounce line


def test_region_generators_have_their_character():
    fractions = {}
    for region in sim.REGIONS:
        counts = sum(np.bincount(sim.make_scene(region, 128, 8.0, np.random.default_rng(i))[0].ravel(), minlength=7)
                     for i in range(8))
        fractions[region] = counts / counts.sum()
    assert fractions["N"][BUILDING] > 2 * fractions["A"][BUILDING]
    assert fractions["C"][WATER] > 2 * fractions["N"][WATER]
    assert fractions["A"][BARE] == max(f[BARE] for f in fractions.values())
    assert fractions["S"][WATER] + fractions["S"][FOREST] > fractions["N"][WATER] + fractions["N"][FOREST]


def test_form_image_rejects_impossible_products():
    labels, heights = homogeneous(OTHER, 8)
    with pytest.raises(ValueError, match="no VV channel"):
        sim.form_image(labels, heights, sim.SENSORS["L2"], "VV", "db", np.random.default_rng(0))
    with pytest.raises(ValueError, match="single-look complex"):
        sim.form_image(labels, heights, sim.SENSORS["S1"], "VV", "real", np.random.default_rng(0))


# -----------------------------------------------------------------------------
# the suite


def test_suite_has_22_benchmarks_over_8_gaps():
    gaps = [gap for _, gap, _, _ in sim.BENCHMARKS]
    assert len(sim.BENCHMARKS) == 22 and len(set(code for code, *_ in sim.BENCHMARKS)) == 22
    assert set(gaps) == set(sim.GAP_FACTORS) and len(sim.GAP_FACTORS) == 8
    assert sum("+" not in g for g in gaps) == 12 and sum("+" in g for g in gaps) == 10


@pytest.mark.parametrize("code, gap, source, target", sim.BENCHMARKS, ids=[b[0] for b in sim.BENCHMARKS])
def test_each_pair_differs_in_exactly_the_factors_of_its_gap(code, gap, source, target):
    s, t = source.factors(), target.factors()
    assert {k for k in s if s[k] != t[k]} == sim.GAP_FACTORS[gap]


def test_same_seed_same_bytes_and_meta_records_the_factors(tmp_path):
    domain = sim.D("N", "G3", "HV")
    paths = [tmp_path / name for name in ("a", "b", "c")]
    for path, seed in zip(paths, (0, 0, 1)):
        sim.write_domain(str(path), domain, "train", 3, 32, seed=seed)
    a, b, c = (Split(str(p), verify=True) for p in paths)
    assert (paths[0] / "images.npy").read_bytes() == (paths[1] / "images.npy").read_bytes()
    assert (paths[0] / "labels.npy").read_bytes() == (paths[1] / "labels.npy").read_bytes()
    assert not np.array_equal(a.images, c.images)
    assert {k: a.meta[k] for k in domain.factors()} == domain.factors()
    assert a.meta["unit"] == "db" and a.meta["channels"] == ["HV"] and a.meta["looks"] == 1.0


def test_domains_of_one_region_share_label_maps_where_spacing_matches():
    vv = sim.simulate_tile(sim.D("N", "G3", "VV"), "test", 5, 64)
    hh = sim.simulate_tile(sim.D("N", "G3", "HH"), "test", 5, 64)
    s1 = sim.simulate_tile(sim.D("N", "S1", "VV"), "test", 5, 64)
    assert np.array_equal(vv[1], hh[1]) and not np.array_equal(vv[0], hh[0])
    assert not np.array_equal(vv[1], s1[1])                       # 10 m instead of 8 m: another scene


def test_prepare_synthetic_writes_the_suite(tmp_path):
    from prepare import main

    out = tmp_path / "synth"
    main(["synthetic", "--out", str(out), "--tile", "32", "--train-tiles", "3", "--test-tiles", "2", "--workers", "1"])
    suite = __import__("json").loads((out / "suite.json").read_text())
    assert len(suite["benchmarks"]) == 22
    for b in suite["benchmarks"]:
        for domain, split, n in ((b["source"], "train", 3), (b["target"], "test", 2)):
            s = Split(str(out / domain / split), verify=True)
            assert s.images.shape == (n, 2 if s.unit == "complex" else 1, 32, 32)
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
