"""The SAR simulator against the physics tables, and the synthetic DG suite's promises."""

import dataclasses
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nanosar import sim
from nanosar.data import Split, check_suite_complete

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BARE, OTHER, ROAD, WATER, FOREST, BUILDING = sim.BARE, sim.OTHER, sim.ROAD, sim.WATER, sim.FOREST, sim.BUILDING


def homogeneous(cls, size=256):
    return np.full((size, size), cls, np.uint8), np.zeros((size, size))


def intensity_of(cls, sensor, pol, incidence=35.0, seed=0, size=256):
    labels, heights = homogeneous(cls, size)
    image, _ = sim.form_image(labels, heights, sim.SENSORS[sensor], pol, "intensity", np.random.default_rng(seed),
                              incidence_deg=incidence)
    return image[0].astype(np.float64)


def sigma0_linear(band, pol, cls, incidence=35.0):
    return 10 ** (float(sim.sigma0_db(band, pol, cls, incidence)) / 10)


def expected_mean(sensor, pol, cls, incidence=35.0):
    """Linear mean of a homogeneous area: sigma0 + NESZ, or sigma0 for a noise-removed product."""
    s = sim.SENSORS[sensor]
    sigma0, nesz = sigma0_linear(s.band, pol, cls, incidence), 10 ** (s.nesz_db / 10)
    return sigma0 if s.noise_removed else sigma0 + nesz


@pytest.mark.parametrize("sensor, pol", [("S1", "VV"), ("S1", "VH"), ("L2", "HH"), ("L2", "HV"), ("X1", "HH")])
@pytest.mark.parametrize("cls", [OTHER, ROAD, WATER, BARE])
def test_mean_intensity_matches_sigma0_table_and_noise(sensor, pol, cls):
    """Linear mean of a homogeneous area = sigma0 (table, 35 deg; water at the reference wind) + NESZ, or sigma0
    for the noise-removed S1; within 4% (65k speckled pixels)."""
    assert intensity_of(cls, sensor, pol).mean() == pytest.approx(expected_mean(sensor, pol, cls), rel=0.04)


def test_noise_removed_product_keeps_water_near_its_sigma0_with_the_spread_of_its_looks():
    """Sentinel-1 VH over water at the reference wind (sigma0 -26.4 dB at 35 deg, 4.4 dB below the NESZ of
    -22 dB). Without noise removal the product sits at sigma0 + NESZ (3.8 x sigma0). Noise removal on the
    multilooked mean puts it at sigma0 (within 6 %), keeps the speckle spread of 4.4 looks in dB (std of
    10 log10 Gamma(L) = 10 / ln 10 sqrt(trigamma(L)) = 2.19 dB; 2.9 dB for VH, below the noise, where the
    window mean's own fluctuation adds) and floors under 1 % of the pixels; subtracting the NESZ from each speckled
    sample instead floors more than a fifth of them and spreads the rest over 8 dB or more."""
    import torch

    s1 = sim.SENSORS["S1"]
    nesz = 10 ** (s1.nesz_db / 10)
    raw = dataclasses.replace(s1, noise_removed=False)
    spread = 10 / np.log(10) * float(torch.polygamma(1, torch.tensor(s1.looks, dtype=torch.float64))) ** 0.5
    assert spread == pytest.approx(2.19, abs=0.01)
    labels, heights = homogeneous(WATER)
    for pol in ("VV", "VH"):
        sigma0 = sigma0_linear("C", pol, WATER)
        image, _ = sim.form_image(labels, heights, raw, pol, "intensity", np.random.default_rng(0), incidence_deg=35.0)
        noisy = image[0].astype(np.float64)                             # the same speckle before noise removal
        assert noisy.mean() == pytest.approx(sigma0 + nesz, rel=0.04)
        removed = intensity_of(WATER, "S1", pol)
        np.testing.assert_allclose(removed, sim.remove_thermal_noise(noisy, nesz), rtol=1e-5)
        assert removed.mean() == pytest.approx(sigma0, rel=0.06)
        db_spread = (10 * np.log10(removed)).std()                      # VV: SNR +3.6 dB; VH: -4.4 dB, where
        assert spread - 0.1 < db_spread < (spread + 0.25 if pol == "VV" else 3.2)   # the window's own spread adds
        floored = 1 - nesz / sim.box_mean(noisy, sim.NOISE_REMOVAL_WINDOW // 2) <= sim.NOISE_REMOVAL_FLOOR
        assert floored.mean() < 0.01                                      # VH: 0.6 %
    per_sample = np.maximum(noisy - nesz, 1e-5)                         # VH, the subtraction without the window
    assert (per_sample <= 1e-5).mean() > 0.2 and (10 * np.log10(per_sample)).std() > 8


def test_water_sigma0_follows_wind_incidence_band_and_polarization():
    """Golden values of the documented model (C-band VV, 35 deg): 4 m/s -> -18.42 dB, 7.5 m/s -> -13.35 dB,
    calm (0 m/s) -> -27 dB; rises with the wind, falls with the incidence by 0.7 dB/deg; HH 3 dB and VH / HV
    8 dB below VV; L darker than C, X brighter; every level inside the published open-water ranges."""
    w = sim.water_sigma0_db
    assert float(w("C", "VV", 35.0, 4.0)) == pytest.approx(-18.42, abs=0.01)
    assert float(w("C", "VV", 35.0, 7.5)) == pytest.approx(-13.35, abs=0.01)
    assert float(w("C", "VV", 35.0, 0.0)) == pytest.approx(-27.0, abs=0.01)
    winds = np.linspace(0.5, 12.0, 24)
    assert np.all(np.diff(w("C", "VV", 35.0, winds)) > 0)
    assert float(w("C", "VV", 30.0, 6.0) - w("C", "VV", 40.0, 6.0)) == pytest.approx(7.0, abs=1e-9)
    assert float(w("C", "VV", 35.0, 6.0) - w("C", "HH", 35.0, 6.0)) == pytest.approx(3.0, abs=1e-9)
    assert float(w("C", "VV", 35.0, 6.0) - w("C", "VH", 35.0, 6.0)) == pytest.approx(8.0, abs=1e-9)
    assert w("L", "HH", 35.0, 6.0) < w("C", "HH", 35.0, 6.0) < w("X", "HH", 35.0, 6.0)
    for (band, pol), ranges in sim.PUBLISHED_SIGMA0_DB.items():
        if WATER in ranges:                                             # calm to 7.5 m/s at 35 deg
            lo, hi = ranges[WATER]
            assert lo - 3 <= float(w(band, pol, 35.0, 1.0)) and float(w(band, pol, 35.0, 7.5)) <= hi + 2, (band, pol)


def test_land_tables_and_simulated_sentinel1_sit_in_the_published_ranges():
    """The sigma0 tables at 35 deg, and the medians of simulated noise-removed S1 tiles (class mean per tile,
    speckle and texture included), inside the published range of each class (roads and buildings: geometry
    and layover move the tile means, so only the tables)."""
    for (band, pol), ranges in sim.PUBLISHED_SIGMA0_DB.items():
        for cls, (lo, hi) in ranges.items():
            if cls != WATER:
                assert lo <= sim.SIGMA0_DB[band][pol][cls] <= hi, (band, pol, cls)
    table = sim.class_sigma0_table(n_tiles=8, size=128, sensors=("S1",))
    for pol in ("VV", "VH"):
        for cls in (OTHER, WATER, BARE, FOREST, sim.CROP):
            lo, hi = sim.PUBLISHED_SIGMA0_DB["C", pol][cls]
            assert lo <= table["S1", pol][cls][0] <= hi, (pol, cls, table["S1", pol][cls])
    assert "| published, C-band | VV |" in sim.format_class_sigma0_table(table)


def test_wind_is_zero_at_the_shore_and_rises_offshore():
    """Left half land, right half water, 10 m pixels: no wind on the shore column, the scene's wind times the
    patches (0.6-1.4) beyond the fetch (100 m = 10 px); one scene speed within the Weibull prior's clip."""
    labels = np.full((64, 128), OTHER, np.uint8)
    labels[:, 64:] = WATER
    speeds = []
    for seed in range(20):
        wind = sim.wind_field(labels, "C", 10.0, np.random.default_rng(seed))
        assert np.all(wind[:, 64] < 0.15 * wind[:, 100:].mean() + 1e-9)
        offshore = wind[:, 80:]
        speeds.append(offshore.max() / 1.4)
        assert np.all(wind >= 0) and offshore.max() <= 1.4 * sim.MAX_WIND
    assert 2.0 < np.median(speeds) < 12.0


def test_flooded_vegetation_is_water_bright_in_co_pol():
    """Water with a vegetation height: C-band VV = forest + 3 dB (trunk-water double bounce), VH = forest + 0.5
    dB; a flooded crop (height 1 m) = crop + 3 dB; open water stays dark; the flood domain's scenes hold it."""
    labels = np.full((4, 4), WATER, np.uint8)
    heights = np.zeros((4, 4))
    heights[0], heights[1] = 15.0, 1.0                                  # flooded forest, flooded crop
    none = (np.zeros((4, 4), bool),) * 3
    for pol, boost in (("VV", 3.0), ("VH", 0.5)):
        db = 10 * np.log10(sim.mean_backscatter(labels, heights, none, "C", pol, 35.0))
        assert db[0, 0] == pytest.approx(sim.SIGMA0_DB["C"][pol][FOREST] + boost, abs=1e-6)
        assert db[1, 0] == pytest.approx(sim.SIGMA0_DB["C"][pol][sim.CROP] + boost, abs=1e-6)
        assert db[2, 0] == pytest.approx(sim.SIGMA0_DB["C"][pol][WATER], abs=1e-6)
    flooded = sum(int(((lab == WATER) & (h > 0)).sum()) for lab, h in
                  (sim.make_scene("F", 96, 10.0, np.random.default_rng(i)) for i in range(12)))
    assert flooded > 0


def test_the_flood_domain_has_the_water_a_flood_user_needs():
    """F-S1-VV+VH-db (an extra domain, in no benchmark and not in the corpus): water >= 15 % of its pixels,
    every class present; open water VV median between -24 and -15 dB with almost no pixel at the -50 dB floor;
    VH water below VV water."""
    flood = sim.D("F", "S1", ("VV", "VH"))
    assert flood in sim.EXTRA_DOMAINS and flood.region not in sim.CORPUS_REGIONS
    assert all(flood not in (s, t) for _, _, s, t in sim.BENCHMARKS)
    tiles = [sim.simulate_tile(flood, "train", i, 96) for i in range(24)]
    labels = np.stack([t[1] for t in tiles])
    images = np.stack([t[0] for t in tiles])
    shares = np.bincount(labels.ravel(), minlength=7) / labels.size
    assert shares[WATER] >= 0.15 and np.all(shares > 0.002), shares
    vv, vh = images[:, 0][labels == WATER], images[:, 1][labels == WATER]
    assert -24 < np.median(vv) < -15 and np.median(vh) < np.median(vv) - 4
    assert (vv <= -49.9).mean() < 0.01 and (vh <= -49.9).mean() < 0.01


def test_incidence_angle_dependence():
    """Water falls by its slope (-0.7 dB/deg) between 25 and 45 degrees: ~14 dB, noise floor aside."""
    near, far = intensity_of(WATER, "X1", "HH", 25.0).mean(), intensity_of(WATER, "X1", "HH", 45.0).mean()
    noise = 10 ** (sim.SENSORS["X1"].nesz_db / 10)
    assert 10 * np.log10((near - noise) / (far - noise)) == pytest.approx(14.0, abs=0.6)


@pytest.mark.parametrize("sensor", list(sim.SENSORS))
def test_speckle_enl_equals_the_product_looks(sensor):
    """ENL = mean^2 / var of linear intensity over a large homogeneous area = the product's looks, also for
    the noise-removed S1 (noise removal scales each pixel by its window's signal share)."""
    enl, expected = sim.homogeneous_enl(sensor, size=256)
    assert expected == sim.SENSORS[sensor].looks
    assert enl == pytest.approx(expected, rel=0.08)


def test_texture_gives_the_k_distribution_variance():
    """Forest: Gamma texture nu = 8 times 4.4-look speckle -> Var/mean^2 = (1 + 1/L)(1 + 1/nu) - 1 (no noise)."""
    labels, heights = homogeneous(FOREST)
    quiet = dataclasses.replace(sim.SENSORS["S1"], nesz_db=-100.0)
    image, _ = sim.form_image(labels, heights, quiet, "VV", "intensity", np.random.default_rng(0), incidence_deg=35.0)
    intensity = image[0].astype(np.float64)
    looks, nu = quiet.looks, sim.TEXTURE_NU[FOREST]
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


def test_form_image_rejects_impossible_multi_pol_and_dn_products():
    labels, heights = homogeneous(OTHER, 8)
    with pytest.raises(ValueError, match="no HV channel"):
        sim.form_image(labels, heights, sim.SENSORS["X1"], ("VV", "HV"), "db", np.random.default_rng(0))
    with pytest.raises(ValueError, match="multi-polarization product is detected"):
        sim.form_image(labels, heights, sim.SENSORS["G3"], ("HH", "VV"), "complex", np.random.default_rng(0))
    with pytest.raises(ValueError, match="calibrated floats, not DN"):
        sim.form_image(labels, heights, sim.SENSORS["S1"], "VV", "dn", np.random.default_rng(0))


def test_dual_pol_channels_image_the_same_scene():
    """N-S1-VV+VH: channels VV, VH in that order, the label maps of N-S1-VV (same region and spacing), and
    per channel and class the mean of that polarization's sigma0 table; speckle independent across channels."""
    dual = sim.D("N", "S1", ("VV", "VH"))
    assert dual.name == "N-S1-VV+VH-db" and dual.pols == ("VV", "VH") and dual in sim.EXTRA_DOMAINS
    assert dual.meta()["channels"] == ["VV", "VH"] and dual.meta()["polarizations"] == ["VV", "VH"]
    assert dual.meta()["noise_removed"] is True and dual.factors()["polarization"] == "VV+VH"
    assert sim.D("N", "S1", ["VV", "VH"]) == dual                        # a list (from JSON) is the same domain
    for i in range(3):
        image, labels, _ = sim.simulate_tile(dual, "test", i, 64)
        assert image.shape == (2, 64, 64) and np.array_equal(labels, sim.simulate_tile(sim.D("N", "S1", "VV"), "test", i, 64)[1])
    # stripes of four untextured classes, seen in both polarizations at once
    labels = np.repeat(np.array([OTHER, ROAD, WATER, BARE], np.uint8), 64)[:, None].repeat(256, 1)
    image, _ = sim.form_image(labels, np.zeros(labels.shape), sim.SENSORS["S1"], ("VV", "VH"), "intensity",
                              np.random.default_rng(0), incidence_deg=35.0)
    for channel, pol in enumerate(("VV", "VH")):
        for cls in (OTHER, ROAD, WATER, BARE):
            mean = image[channel][labels == cls].astype(np.float64).mean()
            assert mean == pytest.approx(expected_mean("S1", pol, cls), rel=0.05), (pol, cls)
    other = labels == OTHER
    assert abs(np.corrcoef(image[0][other], image[1][other])[0, 1]) < 0.03
    quad, _ = sim.form_image(labels, np.zeros(labels.shape), sim.SENSORS["G3"], ("HH", "HV", "VH", "VV"), "db",
                             np.random.default_rng(0), incidence_deg=35.0)
    assert quad.shape == (4, 256, 256)


def test_dn_round_trips_to_the_calibrated_amplitude():
    """The same G3 scene and speckle as DN and as calibrated amplitude: DN / dn_scale = amplitude; DN are
    uint16 integers; meta records dn_scale = units.SIM_DN_SCALE."""
    from nanosar import units

    labels, heights = sim.make_scene("N", 128, 8.0, np.random.default_rng(3))
    dn, amplitude = (sim.form_image(labels, heights, sim.SENSORS["G3"], "HH", rep, np.random.default_rng(7))[0]
                     for rep in ("dn", "amplitude"))
    assert np.array_equal(dn, np.round(dn)) and dn.min() >= 0 and dn.max() <= 65535 and np.median(dn) > 10
    meta = sim.D("N", "G3", "HH", "dn").meta()
    assert meta["unit"] == "dn" and meta["dn_scale"] == units.SIM_DN_SCALE == sim.DN_SCALE
    assert "dn_scale" not in sim.D("N", "G3", "HH", "amplitude").meta()
    np.testing.assert_allclose(units.dn_to_amplitude(dn, meta["dn_scale"]), amplitude, rtol=1e-6)
    db = sim.form_image(labels, heights, sim.SENSORS["G3"], "HH", "db", np.random.default_rng(7))[0]
    np.testing.assert_allclose(units.amplitude_to_db(units.dn_to_amplitude(dn[dn > 0], sim.DN_SCALE)), db[dn > 0],
                               atol=1e-4)


def test_dn_split_records_its_scale(tmp_path):
    domain = sim.D("S", "L2", "HV", "dn")
    sim.write_domain(str(tmp_path / "dn"), domain, "test", 2, 32)
    split = Split(str(tmp_path / "dn"), verify=True)
    assert split.unit == "dn" and split.meta["dn_scale"] == sim.DN_SCALE and split.images.max() > 1


@pytest.mark.parametrize("region", list(sim.REGIONS))
def test_scenes_have_large_homogeneous_areas(region):
    """Some tiles of every region are (nearly) all one field, plain, lake or sea, as real scenes are."""
    dominant = []
    for i in range(24):
        labels, _ = sim.make_scene(region, 128, 10.0, np.random.default_rng(i))
        dominant.append(np.bincount(labels.ravel(), minlength=7).max() / labels.size)
    assert max(dominant) > 0.85 and np.median(dominant) < 0.7


def test_router_enl_reaches_the_looks_on_homogeneous_tiles():
    """The router's ENL (on X' = log(1 + |x|)) of a homogeneous S1 tile in dB reaches the product's ENL
    (3.78 noise-removed; log1p(x) ~ x - x^2 / 2 narrows the spread of x ~ 0.08 by about 10 %)."""
    import torch

    from nanosar.model import SARConfig, sar_descriptors

    labels, heights = homogeneous(OTHER, 128)
    image, _ = sim.form_image(labels, heights, sim.SENSORS["S1"], "VV", "db", np.random.default_rng(0),
                              incidence_deg=35.0)
    entropy, enl, roughness = sar_descriptors(torch.from_numpy(image[None]), SARConfig(img_size=128)).numpy()[0]
    assert 0.95 < enl / sim.homogeneous_enl("S1")[1] < 1.2
    assert entropy > 0.98 * np.log(18) and roughness < 1e-4          # isotropic speckle, flat at the block scale


def test_sim_does_not_import_the_model_and_its_cli_runs():
    """sim sits below the model (the descriptor table that needs both lives in nanosar.ablation)."""
    code = "import sys, nanosar.sim; assert 'nanosar.model' not in sys.modules, 'sim imports the model'"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).returncode == 0
    result = subprocess.run([sys.executable, "-m", "nanosar.sim", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "--sigma0" in result.stdout
    assert "nanosar.ablation --descriptor-table" in result.stdout


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
    assert len(suite["benchmarks"]) == 22 and len(suite["domains"]) == 13
    for b in suite["benchmarks"]:
        for domain, split, n in ((b["source"], "train", 3), (b["target"], "test", 2)):
            s = Split(str(out / domain / split), verify=True)
            assert s.images.shape == (n, 2 if s.unit == "complex" else 1, 32, 32)
    # the dual-pol Sentinel-1 domain beside them: both channels, in order, in meta and in the array
    assert suite["extra_domains"] == ["N-S1-VV+VH-db", "F-S1-VV+VH-db"]
    for split, n in (("train", 3), ("test", 2)):
        s = Split(str(out / "N-S1-VV+VH-db" / split), verify=True)
        assert s.images.shape == (n, 2, 32, 32) and s.channels == ["VV", "VH"] and s.unit == "db"
        assert s.meta["polarizations"] == ["VV", "VH"] and s.meta["provenance"]["generator_version"] == sim.GENERATOR_VERSION
        vv, vh = s.images[:].astype(np.float64).mean(axis=(0, 2, 3))
        assert vv > vh + 4                                             # cross-pol darker by the tables
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def prepare(out, *options):
    from prepare import main

    return main(["synthetic", "--out", str(out), "--tile", "32", "--train-tiles", "3", "--test-tiles", "2",
                 "--workers", "1", *options])


def seeds(out):
    return {Split(str(out / d / split)).meta["provenance"]["seed"] for d in json.loads((out / "suite.json").read_text())
            ["domains"] for split in ("train", "test")}


class Killed(BaseException):
    """Stands in for kill -9 in the middle of a run."""


def test_an_interrupted_rerun_with_new_settings_is_detected_and_resumed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "synth"
    assert prepare(out) == 0 and seeds(out) == {0}
    assert check_suite_complete(str(out))["complete"] is True
    # a rerun with another seed, killed after its first two splits: both seeds on disk, suite.json says so
    write_domain, calls = sim.write_domain, []

    def killed_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise Killed
        calls.append(args[0])
        write_domain(*args, **kwargs)

    monkeypatch.setattr(sim, "write_domain", killed_after_two)
    with pytest.raises(Killed):
        prepare(out, "--seed", "1")
    monkeypatch.undo()
    assert seeds(out) == {0, 1}
    with pytest.raises(ValueError, match=r"suite.json: the suite is incomplete .*--seed 1"):
        check_suite_complete(str(out))
    # rerunning keeps the two finished splits, regenerates the rest and cleans up the killed run's debris
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()                                             # a dead pid, like a killed worker's
    for domain in sim.suite_domains()[1:3]:
        os.makedirs(out / domain.name / f"train.tmp-{child.pid}")
        os.makedirs(out / domain.name / f"test.old-{child.pid}")
    capsys.readouterr()
    assert prepare(out, "--seed", "1") == 0
    log = capsys.readouterr().out
    first = sim.suite_domains()[0].name
    assert "resuming: keeping 2 splits already written with tile 32, seed 1" in log
    assert "wrote 28 splits (kept 2)" in log                # 13 + 2 extra domains x 2 splits
    assert seeds(out) == {1} and check_suite_complete(str(out))["seed"] == 1
    # a split written with other settings under a suite.json that says complete is caught too
    sim.write_domain(str(out / first / "test"), sim.suite_domains()[0], "test", 2, 32, seed=0)
    with pytest.raises(ValueError, match=rf"{first}/test was written with other settings .*seed 0 \(suite.json: 1\)"):
        check_suite_complete(str(out))
    assert not [p for p in glob.glob(str(out / "**" / "*"), recursive=True) if ".tmp-" in p or ".old-" in p]


def test_a_full_disk_stops_prepare_with_one_line(tmp_path, monkeypatch, capsys):
    from nanosar import data

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode and path.endswith("images.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(data, "open", full, raising=False)
    assert prepare(tmp_path / "synth") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("prepare.py: error: ") and "N-G3-HH-db/train: no space left on the device" in err


@pytest.mark.parametrize("tile", ["0", "-16", "20", "x"])
def test_prepare_refuses_a_tile_that_is_not_a_multiple_of_16(tile, tmp_path, capsys):
    """--tile 0 once wrote tiles of 128 silently; now every size that no preset cuts into whole patches is an
    argparse error naming it, before anything is written."""
    from prepare import main

    with pytest.raises(SystemExit) as exit_:
        main(["synthetic", "--out", str(tmp_path / "synth"), "--tile", tile])
    assert exit_.value.code == 2 and not (tmp_path / "synth").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (f"prepare.py: error: argument --tile: {tile} is not a positive "
                                                       f"multiple of 16 (the patch size): use e.g. 64, 128, 256 or 512")


INTERRUPTED = "prepare.py: interrupted; rerun the same command to resume"


def test_ctrl_c_stops_prepare_with_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    out, write_domain, calls = tmp_path / "synth", sim.write_domain, []

    def ctrl_c_in_the_second_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_domain(*args, **kwargs)

    monkeypatch.setattr(sim, "write_domain", ctrl_c_in_the_second_split)
    assert prepare(out) == 130
    assert capsys.readouterr().err == INTERRUPTED + "\n"
    monkeypatch.undo()
    assert prepare(out) == 0
    assert "resuming: keeping 1 splits already written with tile 32, seed 0" in capsys.readouterr().out
    assert check_suite_complete(str(out))["complete"] is True


def children(pid):
    """Pids of the processes whose parent is pid (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def running(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the workers through /proc (Linux)")
def test_killing_prepare_ends_its_workers(tmp_path):
    out = tmp_path / "synth"
    parent = subprocess.Popen([sys.executable, "prepare.py", "synthetic", "--out", str(out), "--train-tiles", "100000",
                               "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers = []
    try:
        def both_writing():                        # two children, each with a split temporary of its own
            workers[:] = children(parent.pid)
            writing = {int(p.rsplit("-", 1)[1]) for p in glob.glob(str(out / "*" / "*.tmp-*"))}
            return len(writing & set(workers)) == 2
        assert wait_until(both_writing, 120), parent.stderr.read().decode() if parent.poll() is not None else ""
        parent.send_signal(signal.SIGKILL)         # no cleanup runs in the parent
        parent.wait()
        assert wait_until(lambda: not any(running(w) for w in workers), 20), \
            f"workers {[w for w in workers if running(w)]} outlived their parent"
    finally:
        parent.kill() if parent.poll() is None else None
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)
        parent.stderr.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the workers through /proc (Linux)")
def test_ctrl_c_ends_prepare_and_its_workers_with_one_line(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group: the workers end at once and silently
    (no traceback each, no waiting for their domains), prepare.py says so in one line and exits 130."""
    out = tmp_path / "synth"
    parent = subprocess.Popen([sys.executable, "prepare.py", "synthetic", "--out", str(out), "--train-tiles", "100000",
                               "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    workers = []
    try:
        def both_writing():
            workers[:] = children(parent.pid)
            writing = {int(p.rsplit("-", 1)[1]) for p in glob.glob(str(out / "*" / "*.tmp-*"))}
            return len(writing & set(workers)) == 2
        assert wait_until(both_writing, 120), parent.stderr.read() if parent.poll() is not None else ""
        os.killpg(parent.pid, signal.SIGINT)       # what the terminal does on Ctrl-C
        code, stderr = parent.wait(timeout=30), parent.stderr.read()
        assert (code, stderr) == (130, INTERRUPTED + "\n")
        assert wait_until(lambda: not any(running(w) for w in workers), 20)
    finally:
        parent.kill() if parent.poll() is None else None
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)
        parent.stderr.close()
