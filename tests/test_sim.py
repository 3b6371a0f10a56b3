"""The SAR simulator against the physics tables, and the synthetic DG suite's promises."""

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
    assert f"{first}: resuming, keeping train (3 tiles) and test (2 tiles)" in log
    assert "wrote 24 splits (kept 2)" in log
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
