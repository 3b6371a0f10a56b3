"""
Machine-readable definitions of the benchmark suites that eval.py runs.

A benchmark is a dict: code, gap, group ("single-gap" or "multi-gap"), source and target (prepared
domain folders under a data root, each holding train/ and test/ splits), classes, a status, and the
paper's mIoU (%) where the paper reports one.

- "synthetic": the simulated suite of nanosar/sim.py, read from <data root>/suite.json (prepare.py).
- "paper": CrossEarth-SAR's 22 sub-benchmarks as far as the public record allows
  (arXiv 2603.12008, Sec. 4 and its tables). status "reported": the code appears in the paper's tables;
  "inferred": the code is nanosar's guess for a benchmark the paper's text does not name. The
  datasets behind every letter are inferred too (F FUSAR-Map, A AIR-PolSAR-Seg-2.0, O OpenEarthMap-SAR,
  D DDHR-SK, S SARBuD, W WHU-OPT-SAR); the official tile lists live in the HF dataset
  conquer997/CrossEarth-SAR-Benchmarks and are not reproduced here.
"""


from nanosar.data import CLASSES_7, check_suite_complete

# paper's numbers (mIoU %, the paper's Sec. 4 tables; None = not reported there)
PAPER_METHODS = ("DINOv2", "SARATR-X", "CrossEarth-SAR-L", "CrossEarth-SAR-L*")


def _paper(code, gap, source, target, status, scores=(None, None, None, None), note=""):
    return {
        "code": code, "gap": gap, "group": "multi-gap" if "+" in gap else "single-gap",
        "source": source, "target": target, "classes": list(CLASSES_7), "status": status,
        "paper_miou": dict(zip(PAPER_METHODS, scores)), "note": note,
    }


PAPER = [
    _paper("N2S", "region", "sarbud_north", "sarbud_south", "reported", (32.3, 34.6, 37.8, 38.0),
           "north/south split inside one dataset, probably SARBuD (27 GF-3 scenes over China)"),
    _paper("S2N", "region", "sarbud_south", "sarbud_north", "reported", (43.8, 43.2, None, 46.7)),
    _paper("R3", "region", "whu_opt_sar_a", "whu_opt_sar_b", "inferred", note="two more region benchmarks: unknown"),
    _paper("R4", "region", "whu_opt_sar_b", "whu_opt_sar_a", "inferred"),
    _paper("VV2F", "polarization", "air_polsar_seg2_vv", "air_polsar_seg2_full", "reported", (65.7, 71.3, 73.8, 73.9),
           "F = full/other polarization, inside AIR-PolSAR-Seg-2.0 or FUSAR-Map (unresolved)"),
    _paper("HH2F", "polarization", "air_polsar_seg2_hh", "air_polsar_seg2_full", "reported", (56.8, 68.5, 72.3, 71.8)),
    _paper("HV2F", "polarization", "air_polsar_seg2_hv", "air_polsar_seg2_full", "inferred"),
    _paper("VH2F", "polarization", "air_polsar_seg2_vh", "air_polsar_seg2_full", "inferred"),
    _paper("C(r)2R", "complex value", "air_polsar_seg2_real", "air_polsar_seg2_amplitude", "reported",
           (71.3, 74.5, 76.4, 76.9), "real part of the SLC -> detected (real-valued) image"),
    _paper("C(i)2R", "complex value", "air_polsar_seg2_imag", "air_polsar_seg2_amplitude", "reported",
           (71.7, 74.2, None, 76.7)),
    _paper("R2C(r)", "complex value", "air_polsar_seg2_amplitude", "air_polsar_seg2_real", "inferred"),
    _paper("R2C(i)", "complex value", "air_polsar_seg2_amplitude", "air_polsar_seg2_imag", "inferred"),
    _paper("F2A", "region+polarization", "fusar_map", "air_polsar_seg2_amplitude", "reported",
           (13.4, None, None, 16.1)),
    _paper("A2F", "region+polarization", "air_polsar_seg2_amplitude", "fusar_map", "reported",
           (15.5, 21.3, 25.0, 27.0)),
    _paper("O2D", "region+platform", "openearthmap_sar", "ddhr_sk", "reported", (17.8, 19.0, 23.7, 23.1),
           "the paper writes O2D; D2O is the other direction"),
    _paper("D2O", "region+platform", "ddhr_sk", "openearthmap_sar", "reported",
           note="one of the two benchmarks where DINOv2 beats CrossEarth-SAR; numbers not recorded"),
    _paper("S2A", "region+band", "sarbud", "air_polsar_seg2_amplitude", "reported", (55.9, 53.1, 59.1, 57.9),
           "both GF-3 C-band as far as known, which contradicts a band gap (the paper's dataset table)"),
    _paper("A2S", "region+band", "air_polsar_seg2_amplitude", "sarbud", "inferred"),
    _paper("D2F", "region+polarization+band", "ddhr_sk", "fusar_map", "reported", (26.0, 22.6, 25.1, 26.5)),
    _paper("F2D", "region+polarization+band", "fusar_map", "ddhr_sk", "inferred"),
    _paper("W2D", "region+platform+band", "whu_opt_sar", "ddhr_sk", "reported", (16.7, 16.1, 22.2, 25.6)),
    _paper("D2W", "region+platform+band", "ddhr_sk", "whu_opt_sar", "inferred"),
]
# the paper's averages over the 12 single-gap and the 10 multi-gap benchmarks
PAPER_AVERAGES = {
    "single-gap": dict(zip(PAPER_METHODS, (55.5, 59.7, 61.9, 62.7))),
    "multi-gap": dict(zip(PAPER_METHODS, (24.3, 24.8, 27.7, 28.5))),
}


def synthetic(data_root):
    """The simulated suite written by `prepare.py synthetic --out data_root`."""
    suite = check_suite_complete(data_root)   # refuses a suite that an interrupted prepare.py left mixed
    return [dict(b, classes=list(CLASSES_7), status="synthetic", paper_miou={}) for b in suite["benchmarks"]]


def load(name, data_root):
    """Benchmarks of suite `name` ("synthetic" or "paper")."""
    if name == "synthetic":
        return synthetic(data_root)
    if name == "paper":
        return [dict(b) for b in PAPER]
    raise ValueError(f"unknown suite {name!r}: choose synthetic or paper")
