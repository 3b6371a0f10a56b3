"""Tests of nanosar/ablation.py and the pre-training corpus: golden NMI values, token shares, bootstrap
coverage, mean ± std, mixed-unit inputs, the feature cache, exact resume of pre-training, corpus scenes
disjoint from the benchmarks', and the whole protocol end to end on a micro corpus."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from nanosar import ablation, sim
from nanosar.ablation import (
    cached_features,
    format_mean_std,
    head_logits_from_cache,
    mean_std,
    model_inputs,
    normalized_mutual_information,
    paired_bootstrap_ci,
    share_of_tokens,
    unit_statistics,
)
from nanosar.model import SARConfig, Segmenter, sar_descriptors


def product_table(rows, cols):
    """Label arrays whose contingency table is exactly the outer product rows x cols (independent)."""
    a, b = [], []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            a += [i] * (r * c)
            b += [j] * (r * c)
    return np.array(a), np.array(b)


def test_nmi_independent_is_zero():
    a, b = product_table([1, 2, 3], [1, 1, 2, 4])
    assert normalized_mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)


def test_nmi_one_to_one_is_one():
    rng = np.random.default_rng(0)
    expert = rng.integers(0, 6, size=500)
    names = np.array(["S1", "ALOS2", "GF3", "ICEYE", "UAVSAR", "TSX"])  # a relabelling of the experts
    assert normalized_mutual_information(expert, names[expert]) == pytest.approx(1.0, abs=1e-12)


def test_nmi_hand_computed_table():
    # joint table of a = [0,0,1,1], b = [0,0,0,1]: p(0,0) = 1/2, p(1,0) = p(1,1) = 1/4
    # I = 1.5 ln 2 - 0.75 ln 3, H(A) = ln 2, H(B) = 2 ln 2 - 0.75 ln 3  -> NMI ~ 0.3456
    ln2, ln3 = math.log(2), math.log(3)
    expected = (1.5 * ln2 - 0.75 * ln3) / math.sqrt(ln2 * (2 * ln2 - 0.75 * ln3))
    value = normalized_mutual_information([0, 0, 1, 1], [0, 0, 0, 1])
    assert value == pytest.approx(expected, abs=1e-12)
    assert value == normalized_mutual_information([0, 0, 0, 1], [0, 0, 1, 1])  # symmetric


def test_nmi_zero_entropy_and_bad_input():
    assert normalized_mutual_information([3, 3, 3], [0, 1, 2]) == 0.0
    assert normalized_mutual_information([3, 3, 3], [1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="same non-zero length"):
        normalized_mutual_information([0, 1], [0, 1, 2])


def test_share_of_tokens_rows_and_order():
    expert = np.array([0, 1, 1, 2, 2, 2, 0, 0])
    domain = np.array(["S1", "S1", "S1", "GF3", "GF3", "GF3", "ALOS2", "ALOS2"])
    table, names = share_of_tokens(expert, domain, n_experts=4)
    assert names == ["S1", "GF3", "ALOS2"]                      # first-appearance order, not sorted
    np.testing.assert_allclose(table, [[1 / 3, 2 / 3, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="expert ids"):
        share_of_tokens([0, 4], ["a", "b"], n_experts=4)


def test_bootstrap_covers_true_mean():
    diffs = np.random.default_rng(1).normal(0.5, 1.0, size=200)
    mean, low, high = paired_bootstrap_ci(diffs)
    assert low < 0.5 < high and low > 0.0
    assert mean == pytest.approx(diffs.mean()) and low < mean < high
    assert paired_bootstrap_ci(diffs) == (mean, low, high)       # deterministic for a seed


def test_bootstrap_coverage_is_near_nominal():
    rng = np.random.default_rng(2)
    hits = 0
    for rep in range(200):
        _, low, high = paired_bootstrap_ci(rng.normal(0.5, 1.0, size=30), n_boot=2000, seed=rep)
        hits += low <= 0.5 <= high
    assert 0.88 <= hits / 200 <= 0.99


def test_mean_std_and_format():
    mean, std = mean_std([17.5, 18.2, 18.9])
    assert mean == pytest.approx(18.2) and std == pytest.approx(0.7)  # ddof = 1
    assert format_mean_std([17.5, 18.2, 18.9]) == "18.2 ± 0.7"
    assert format_mean_std([18.24]) == "18.2" and math.isnan(mean_std([18.24])[1])


def test_cached_features_give_the_same_logits():
    torch.manual_seed(0)
    model = Segmenter(SARConfig.preset("tiny"))
    x = torch.randn(3, 1, 64, 64) * 4 - 12                          # sigma0 in dB
    features = cached_features(model, x, batch=2)                    # two passes: 2 + 1 tiles, in eval mode
    assert model.training                                            # the caller's mode is restored
    model.eval()
    assert features.shape == (3, 4, model.cfg.embed_dim, 8, 8) and not features.requires_grad
    with torch.no_grad():
        expected = model(x).logits
        cached = head_logits_from_cache(model.head, features, model.cfg.patch_size)
    assert cached.shape == expected.shape == (3, model.cfg.num_classes, 64, 64)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# inputs of mixed units


def test_unit_statistics_golden():
    images = torch.tensor([1.0, 3.0, -10.0, -20.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    stats = unit_statistics(images, ["amplitude", "amplitude", "db", "db"])
    assert stats["amplitude"] == pytest.approx((2.0, 1.0)) and stats["db"] == pytest.approx((-15.0, 5.0))


def test_model_inputs_single_unit_is_the_models_own_forward():
    torch.manual_seed(0)
    cfg = SARConfig.preset("tiny", pixel_mean=(-12.0,), pixel_std=(4.0,))
    model = Segmenter(cfg).eval()
    x = torch.randn(3, 1, 64, 64) * 4 - 12
    with torch.no_grad():
        expected = model(x).logits
        own = model.forward_prepared(*model_inputs(model, x)).logits
        by_unit = model.forward_prepared(*model_inputs(model, x, ["db"] * 3, {"db": (-12.0, 4.0)})).logits
    torch.testing.assert_close(own, expected, rtol=0, atol=0)
    torch.testing.assert_close(by_unit, expected, rtol=1e-6, atol=1e-6)


def test_model_inputs_mixed_units_treat_each_tile_in_its_unit():
    model = Segmenter(SARConfig.preset("tiny"))
    gen = torch.Generator().manual_seed(1)
    amplitude = torch.rand(2, 1, 64, 64, generator=gen) * 0.5 + 0.01
    db = 20 * torch.log10(amplitude)                           # the same scenes in dB
    x, units = torch.cat([db, amplitude]), ["db", "db", "amplitude", "amplitude"]
    stats = {"db": (-10.0, 5.0), "amplitude": (0.25, 0.15)}
    x_norm, s_raw = model_inputs(model, x, units, stats)
    torch.testing.assert_close(x_norm[:2], (db + 10) / 5)
    torch.testing.assert_close(x_norm[2:], (amplitude - 0.25) / 0.15)
    for rows, unit in ((slice(0, 2), "db"), (slice(2, 4), "amplitude")):
        cfg = dataclasses.replace(model.cfg, input_unit=unit)
        torch.testing.assert_close(s_raw[rows], sar_descriptors(x[rows], cfg))
    with pytest.raises(ValueError, match="no normalisation statistics for unit 'real'"):
        model_inputs(model, x, ["real"] * 4, stats)
    with pytest.raises(ValueError, match="3 units for 4 tiles"):
        model_inputs(model, x, units[:3], stats)


def test_patch_classes_majority():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, :8, :8] = 3
    labels[0, :8, 8:] = 255                                    # ignored pixels vote for nothing
    labels[0, :8, 8:10] = 5
    assert ablation.patch_classes(labels, 8).tolist() == [[3, 5, 0, 0]]


# -----------------------------------------------------------------------------
# the corpus


def test_corpus_spans_every_sensor_polarization_representation_and_region():
    domains = sim.corpus_domains()
    assert len({d.name for d in domains}) == len(domains)
    for code, sensor in sim.SENSORS.items():
        for pol in sensor.polarizations:
            reps = {d.representation for d in domains if d.sensor == code and d.pol == pol}
            assert reps == ({"db", "amplitude", "real", "imag"} if sensor.looks == 1 else {"db", "amplitude"})
            assert {d.region for d in domains if d.sensor == code and d.pol == pol} == set(sim.REGIONS)
    spacings = {(d.sensor, d.spacing_m) for d in domains}
    assert all((d.sensor, d.spacing_m) in spacings for d in sim.suite_domains())   # incl. X1 resampled to 8 m
    assert all(isinstance(d.pol, str) for d in domains)                             # one channel per tile


def test_no_benchmark_scene_is_in_the_corpus():
    """Scenes are a function of their seed (scene_seed); the corpus's seeds are none of the benchmarks',
    and the label maps and heights of overlapping (region, spacing) scenes differ too."""
    corpus_seeds = {tuple(sim.scene_seed(d, split, i)) for d in sim.corpus_domains() for split in sim.CORPUS_SPLITS
                    for i in range(64)}
    bench_seeds = {tuple(sim.scene_seed(d, split, i)) for d in sim.suite_domains() + sim.EXTRA_DOMAINS
                   for split in ("train", "test") for i in range(512)}
    assert corpus_seeds and bench_seeds and not corpus_seeds & bench_seeds
    domain = sim.D("N", "G3", "HH")
    scene = lambda split, i: sim.make_scene("N", 64, 8.0, np.random.default_rng(sim.scene_seed(domain, split, i)))  # noqa: E731
    fingerprint = lambda labels, heights: hash(labels.tobytes() + heights.tobytes())             # noqa: E731
    test_scenes = {fingerprint(*scene("test", i)) for i in range(64)}
    assert not test_scenes & {fingerprint(*scene(split, i)) for split in sim.CORPUS_SPLITS for i in range(16)}


# -----------------------------------------------------------------------------
# the protocol


MICRO = dict(ablation.DATA, tile=32, corpus_tiles={"cpt": 1, "heldout": 1}, suite_tiles={"train": 4, "test": 2},
             seeds=[0, 1], cpt_steps=4, cpt_batch=4, cpt_lr=1e-3, warmup=1, head_steps=2, head_batch=4,
             head_lr=1e-3, preset="tiny")


def micro_corpus(n=12, size=32):
    """Tiles of a few corpus domains simulated in memory (no files)."""
    domains = [d for d in sim.corpus_domains() if d.region == "N" and d.pol == "VV"][:n]
    images, labels, units = [], [], []
    for d in domains:
        image, label, _ = sim.simulate_tile(d, "cpt", 0, size)
        images.append(torch.from_numpy(image))
        labels.append(torch.from_numpy(label.astype(np.int64)))
        units.append(d.representation)
    factors = {f: [d.factors().get(f, d.sensor) for d in domains] for f in ablation.FACTORS}
    return ablation.Tiles(torch.stack(images), torch.stack(labels), [d.name for d in domains], units, factors)


def test_pretraining_resumes_exactly(tmp_path, monkeypatch):
    corpus = micro_corpus()
    stats = unit_statistics(corpus.images, corpus.units)
    settings = dict(MICRO, cpt_steps=6)
    monkeypatch.setattr(ablation, "CKPT_EVERY", 2)
    whole = ablation.pretrain("full", 0, corpus, stats, settings, str(tmp_path / "a.pt"), log=lambda m: None)
    calls, real = [0], ablation.model_inputs

    def interrupted(*args, **kwargs):                         # dies in step 5, after the checkpoint of step 4
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation, "model_inputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablation.pretrain("full", 0, corpus, stats, settings, str(tmp_path / "b.pt"), log=lambda m: None)
    monkeypatch.setattr(ablation, "model_inputs", real)
    lines = []
    resumed = ablation.pretrain("full", 0, corpus, stats, settings, str(tmp_path / "b.pt"), log=lines.append)
    assert lines == [f"  resuming {tmp_path / 'b.pt'} at step 4/6"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_routing_report_shapes_and_dense_row():
    corpus = micro_corpus()
    stats = unit_statistics(corpus.images, corpus.units)
    torch.manual_seed(0)
    moe = Segmenter(ablation.row_config("full", MICRO))
    report = ablation.routing_report(moe, ablation.backbone_pass(moe, corpus.images, corpus.units, stats)[1], corpus)
    assert set(report["nmi"]) == {*ablation.FACTORS, "class"}
    assert all(len(v) == moe.cfg.depth and all(0 <= x <= 1 for x in v) for v in report["nmi"].values())
    share = report["share"]["representation"][0]
    assert sorted(share["values"]) == sorted(set(corpus.units))
    assert np.allclose(np.asarray(share["table"]).sum(axis=1), 1.0, atol=1e-3)
    dense = Segmenter(ablation.row_config("dense", MICRO))
    experts = ablation.backbone_pass(dense, corpus.images, corpus.units, stats)[1]
    assert experts.shape == (0, len(corpus.images), 1 + 4 * 4) and ablation.routing_report(dense, experts, corpus) == {
        "nmi": {}, "share": {}}


def test_protocol_end_to_end_on_a_micro_corpus(tmp_path):
    out, lines = str(tmp_path / "abl"), []
    report = ablation.run_ablation(out, MICRO, rows=("dense", "moe_token_balance", "full"), log=lines.append)
    with open(os.path.join(out, "data", "corpus", "corpus.json")) as f:
        corpus = json.load(f)
    assert corpus["complete"] and len(corpus["domains"]) == len(sim.corpus_domains())
    for row in ("dense", "moe_token_balance", "full"):
        for seed in (0, 1):
            with open(os.path.join(out, "runs", row, f"seed{seed}", "result.json")) as f:
                result = json.load(f)
            assert set(result["benchmarks"]) == {code for code, *_ in sim.BENCHMARKS}
            assert all(0 <= v <= 100 for v in result["benchmarks"].values())
            assert set(result["unit_stats"]) == {"db", "amplitude", "real", "imag"}
    assert "| dense ViT, same active size |" in report and "| MoE, physics router + balance" in report
    assert "full minus" in report and "| MoE, token-only router + balance |" in report
    assert "Normalised mutual information" in report
    assert any(line.startswith("[6/6] full seed 1:") and "min left" in line for line in lines)
    with open(os.path.join(out, "results.md")) as f:
        assert f.read() == report
    lines.clear()                                              # a rerun skips every finished run
    assert ablation.run_ablation(out, MICRO, rows=("dense", "moe_token_balance", "full"), log=lines.append) == report
    assert "0 runs to do, 6 finished earlier (skipped)" in lines
    with pytest.raises(ValueError, match="settings.json holds an ablation with other settings \\(cpt_steps\\)"):
        ablation.run_ablation(out, dict(MICRO, cpt_steps=5), rows=("dense",), log=lines.append)


def test_an_incomplete_corpus_is_refused(tmp_path):
    from nanosar.data import check_suite_complete

    (tmp_path / "corpus.json").write_text(json.dumps({"complete": False, "tile": 64, "seed": 0,
                                                      "tiles": {"cpt": 8, "heldout": 2}, "domains": []}))
    with pytest.raises(ValueError, match=r"corpus.json: the corpus is incomplete .*prepare.py corpus .*--cpt-tiles 8"):
        check_suite_complete(str(tmp_path), "corpus.json")


def test_routing_heat_maps_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")                          # an optional extra, never a dependency
    share = {f: [{"values": ["a", "b"], "table": [[0.5, 0.5], [1.0, 0.0]]}] * 2 for f in ablation.FACTORS}
    results = {"full": [{"routing": {"share": share}}], "dense": [{"routing": {"share": {}}}]}
    lines = []
    ablation.plot_routing(results, str(tmp_path), lines.append)
    assert (tmp_path / "routing_full.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "routing_dense.png").exists() and lines == [f"wrote {tmp_path}/routing_full.png"]
