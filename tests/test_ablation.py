"""Tests of nanosar/ablation.py and the pre-training corpus: mixed-unit inputs, the oracle's input, the
feature cache, upcycling stage 0 (= the dense model at step 0), the FFN share, exact resume of
pre-training, corpus scenes distinct and disjoint from the benchmarks', and the whole protocol end to end on
a micro corpus (also the GPU variant's dry run, on the CPU). The statistics are in tests/test_stats.py."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from nanosar import ablation, sim
from nanosar.ablation import cached_features, head_logits_from_cache, model_inputs, oracle_input, unit_statistics
from nanosar.model import SARConfig, Segmenter, router_features, sar_descriptors


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
    x_norm, s_raw, router_input = model_inputs(model, x, units, stats)
    assert router_input is None                                 # only an oracle ("given") model has one
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
# the oracle router: the tile's true domain factors, and only them


def test_oracle_input_is_the_one_hot_of_the_factors():
    factors = {"sensor": ["S1", "AX"], "band": ["C", "X"], "polarization": ["VV", "HH"],
               "representation": ["db", "imag"], "region": ["N", "C"]}
    x = oracle_input(factors)
    assert x.shape == (2, ablation.ORACLE_DIM) == (2, 7 + 3 + 4 + 4 + 4) and x.dtype == torch.float32
    names = [f"{f}={v}" for f, values in ablation.ORACLE_VALUES.items() for v in values]
    assert [n for n, on in zip(names, x[0]) if on] == ["sensor=S1", "band=C", "polarization=VV",
                                                       "representation=db", "region=N"]
    assert [n for n, on in zip(names, x[1]) if on] == ["sensor=AX", "band=X", "polarization=HH",
                                                       "representation=imag", "region=C"]
    assert set(x.unique().tolist()) == {0.0, 1.0} and (x.sum(1) == len(ablation.ORACLE_VALUES)).all()
    with pytest.raises(ValueError, match=r"oracle: band values \['Ku'\]"):
        oracle_input(dict(factors, band=["C", "Ku"]))


def test_the_oracle_router_reads_the_factors_and_not_the_pixels():
    torch.manual_seed(0)
    model = Segmenter(ablation.row_config("oracle", MICRO)).eval()
    assert model.cfg.descriptors == "given" and model.cfg.descriptor_dim == ablation.ORACLE_DIM
    router = model.backbone.blocks[0].mlp.router
    x = torch.randn(3, 1, 32, 32) * 3 - 12                     # three tiles, other pixels
    factors = {"sensor": ["S1", "S1", "L2"], "band": ["C", "C", "L"], "polarization": ["VV", "VV", "HH"],
               "representation": ["db"] * 3, "region": ["N", "N", "S"]}
    x_norm, s_raw, given = model_inputs(model, x, ["db"] * 3, {"db": (-12.0, 3.0)}, factors)
    torch.testing.assert_close(given, oracle_input(factors))
    # the router's per-tile term (W_s s) is the same for tiles 0 and 1 (same factors, other pixels) ...
    W = router.linear.weight[:, router.dim:]
    term = given @ W.T                                          # (3, E)
    torch.testing.assert_close(term[0], term[1])
    assert not torch.allclose(term[0], term[2])                # ... and another for tile 2
    with torch.no_grad():
        out = model.forward_prepared(x_norm, s_raw, given)
    assert out.logits.shape == (3, 7, 32, 32) and torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="descriptors='given'"):
        model(x)                                                # no factors, no forward
    with pytest.raises(ValueError, match="domain factors"):
        model_inputs(model, x, ["db"] * 3, {"db": (-12.0, 3.0)})


# -----------------------------------------------------------------------------
# the corpus


def test_corpus_spans_every_sensor_polarization_representation_and_region():
    domains = sim.corpus_domains()
    assert len({d.name for d in domains}) == len(domains)
    for code, sensor in sim.SENSORS.items():
        for pol in sensor.polarizations:
            reps = {d.representation for d in domains if d.sensor == code and d.pol == pol}
            assert reps == ({"db", "amplitude", "real", "imag"} if sensor.looks == 1 else {"db", "amplitude"})
            assert {d.region for d in domains if d.sensor == code and d.pol == pol} == set(sim.CORPUS_REGIONS)
    spacings = {(d.sensor, d.spacing_m) for d in domains}
    assert all((d.sensor, d.spacing_m) in spacings for d in sim.suite_domains())   # incl. X1 resampled to 8 m
    assert all(isinstance(d.pol, str) for d in domains)                             # one channel per tile
    assert {ablation.sensor_code(sim.SENSORS[d.sensor].name) for d in domains} == set(sim.SENSORS)


def test_corpus_tiles_are_distinct_scenes_disjoint_from_every_benchmark():
    """Every corpus tile its own scene (no two share a label map unless it is one class), and no corpus
    scene among the benchmark splits' (by seed, and by label map where region and spacing agree)."""
    corpus_seeds = [tuple(sim.scene_seed(d, split, i)) for d in sim.corpus_domains() for split in sim.CORPUS_SPLITS
                    for i in range(8)]
    assert len(set(corpus_seeds)) == len(corpus_seeds)
    bench_seeds = {tuple(sim.scene_seed(d, split, i)) for d in sim.suite_domains() + sim.EXTRA_DOMAINS
                   for split in ("train", "test") for i in range(512)}
    assert not set(corpus_seeds) & bench_seeds
    # the label maps themselves: the domains of one region and spacing (G3, 8 m) that share benchmark scenes
    same_ground = [d for d in sim.corpus_domains() if d.region == "N" and d.sensor == "G3"][:6]
    maps = [sim.simulate_tile(d, split, i, 32)[1] for d in same_ground for split in sim.CORPUS_SPLITS for i in range(3)]
    mixed = [m.tobytes() for m in maps if len(np.unique(m)) > 1]
    assert len(mixed) > len(maps) // 2 and len(set(mixed)) == len(mixed)
    bench = {sim.make_scene("N", 32, 8.0, np.random.default_rng(sim.scene_seed(sim.D("N", "G3", "HH"), split, i)))[0]
             .tobytes() for split in ("train", "test") for i in range(64)}
    assert not set(mixed) & bench


def test_suite_scenes_are_shared_across_radar_factors_as_before():
    """The benchmark splits keep their scene seeds: the domains of a polarization gap share the ground."""
    hh, vv = sim.D("N", "G3", "HH"), sim.D("N", "G3", "VV")
    assert sim.scene_seed(hh, "test", 3) == sim.scene_seed(vv, "test", 3)
    np.testing.assert_array_equal(sim.simulate_tile(hh, "test", 3, 32)[1], sim.simulate_tile(vv, "test", 3, 32)[1])


# -----------------------------------------------------------------------------
# the protocol

MICRO = dict(ablation.dry_run_settings("quick"), seeds=[0, 1])


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


def micro_data():
    """An AblationData over micro_corpus (pre-training and held-out tiles alike), no suite."""
    corpus = micro_corpus()
    return ablation.AblationData(corpus, corpus, unit_statistics(corpus.images, corpus.units), [], {})


@pytest.mark.parametrize("row", ["full", "full_renorm", "physical", "oracle", "moe_token", "dense"])
def test_upcycled_rows_start_as_the_dense_stage0_model(row):
    """Step 0 of every row is stage 0: MoE rows upcycled (experts = its FFN) under renorm and straight-through
    gates compute exactly what the dense model does, whatever the fresh router decides."""
    data = micro_data()
    torch.manual_seed(0)
    dense = Segmenter(ablation.row_config("dense", MICRO))
    with torch.no_grad():                                       # a stage 0 that is not at its initialisation
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stats = {kind: ablation.descriptor_statistics(dataclasses.replace(ablation.row_config("full", MICRO),
                                                                      descriptors=kind), data.corpus)
             for kind in ("paper", "physical")}
    model = ablation.start_from_stage0(row, 0, dense, MICRO, stats).eval()
    assert model.cfg.gate in ("renorm", "straight_through") and model.cfg.n_experts == ROWS_EXPERTS[row]
    idx = list(range(len(data.corpus.units)))
    with torch.no_grad():
        ours = model.forward_prepared(*model_inputs(model, data.corpus.images, data.corpus.units, data.unit_stats,
                                                    data.corpus.rows(idx)))
        theirs = dense.eval().forward_prepared(*model_inputs(dense, data.corpus.images, data.corpus.units,
                                                             data.unit_stats, data.corpus.rows(idx)))
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    if model.cfg.n_experts > 1 and model.cfg.descriptors in ("paper", "physical") and model.cfg.descriptor_dim:
        assert model.cfg.descriptor_mean == stats[model.cfg.descriptors][0]   # standardised with corpus statistics


ROWS_EXPERTS = {row: ablation.row_config(row, MICRO).n_experts for row in ablation.ROWS}


def test_descriptor_statistics_standardise_the_corpus():
    data = micro_data()
    for kind in ("paper", "physical"):
        cfg = dataclasses.replace(ablation.row_config("full", MICRO), descriptors=kind)
        mean, std = ablation.descriptor_statistics(cfg, data.corpus)
        standardised = dataclasses.replace(cfg, descriptor_mean=mean, descriptor_std=std)
        features = router_features(ablation.tile_descriptors(cfg, data.corpus), standardised)
        torch.testing.assert_close(features.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(features.std(0), torch.ones(3), atol=1e-3, rtol=0)


def test_ffn_share_measures_the_branch_against_the_stream():
    data = micro_data()
    torch.manual_seed(0)
    model = Segmenter(ablation.row_config("dense", MICRO))
    share = ablation.ffn_share(model, data.corpus, data.unit_stats)
    assert len(share) == model.cfg.depth and all(s > 0 for s in share)
    with torch.no_grad():
        model.backbone.blocks[-1].ls2.gamma.mul_(2.0)           # the last FFN writes twice as much
    assert ablation.ffn_share(model, data.corpus, data.unit_stats)[-1] == pytest.approx(2 * share[-1], rel=1e-5)
    with torch.no_grad():
        model.backbone.blocks[0].ls2.gamma.zero_()              # the first writes nothing
    assert ablation.ffn_share(model, data.corpus, data.unit_stats)[0] == 0.0


def test_pretraining_resumes_exactly(tmp_path, monkeypatch):
    data = micro_data()
    settings = dict(MICRO, cpt_steps=6)
    monkeypatch.setattr(ablation, "CKPT_EVERY", 2)

    def run(path, log=lambda m: None):
        torch.manual_seed(0)
        model = Segmenter(ablation.row_config("full", settings))
        return ablation.pretrain(model, data.corpus, data.unit_stats, settings, 6, 1e-3, 10, 0, str(path), log)

    whole = run(tmp_path / "a.pt")
    calls, real = [0], ablation.model_inputs

    def interrupted(*args, **kwargs):                         # dies in step 5, after the checkpoint of step 4
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation, "model_inputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt")
    monkeypatch.setattr(ablation, "model_inputs", real)
    lines = []
    resumed = run(tmp_path / "b.pt", lines.append)
    assert lines == [f"  resuming {tmp_path / 'b.pt'} at step 4/6"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_routing_report_shapes_and_dense_row():
    corpus = micro_corpus()
    stats = unit_statistics(corpus.images, corpus.units)
    torch.manual_seed(0)
    moe = Segmenter(ablation.row_config("full", MICRO))
    report = ablation.routing_report(moe, ablation.backbone_pass(moe, corpus.images, corpus.units, stats)[1], corpus)
    assert set(report["nmi"]) == {*ablation.FACTORS, "class"} and set(report["chance"]) == set(ablation.FACTORS)
    assert all(len(v) == moe.cfg.depth and all(0 <= x <= 1 for x in v) for v in report["nmi"].values())
    share = report["share"]["representation"][0]
    assert sorted(share["values"]) == sorted(set(corpus.units))
    assert np.allclose(np.asarray(share["table"]).sum(axis=1), 1.0, atol=1e-3)
    dense = Segmenter(ablation.row_config("dense", MICRO))
    experts = ablation.backbone_pass(dense, corpus.images, corpus.units, stats)[1]
    assert experts.shape == (0, len(corpus.images), 1 + 4 * 4) and ablation.routing_report(dense, experts, corpus) == {
        "nmi": {}, "chance": {}, "share": {}}


@pytest.fixture(scope="module")
def micro_data_root(tmp_path_factory):
    """The corpus and suite of MICRO_DATA, prepared once for the end-to-end tests (prepare.py, ~10 s)."""
    root = str(tmp_path_factory.mktemp("micro") / "data")
    ablation.prepare_data(root, MICRO, lambda m: None)
    return root


ROWS_E2E = ("oracle", "dense", "moe_token_balance", "full", "physical")


def test_protocol_end_to_end_on_a_micro_corpus(tmp_path, micro_data_root):
    out, lines = str(tmp_path / "abl"), []
    report = ablation.run_ablation(out, MICRO, micro_data_root, rows=ROWS_E2E, log=lines.append)
    with open(os.path.join(micro_data_root, "corpus", "corpus.json")) as f:
        corpus = json.load(f)
    assert corpus["complete"] and len(corpus["domains"]) == len(sim.corpus_domains())
    for seed in (0, 1):
        stage0 = ablation.read_json(os.path.join(out, "runs", "stage0", f"seed{seed}", "result.json"))
        assert len(stage0["ffn_share"]) == 4 and 0 <= stage0["heldout_miou"] <= 100
        for row in ROWS_E2E:
            result = ablation.finished(out, row, seed)
            assert set(result["benchmarks"]) == {code for code, *_ in sim.BENCHMARKS}
            assert all(0 <= v <= 100 for v in result["benchmarks"].values())
            assert set(result["unit_stats"]) == {"db", "amplitude", "real", "imag"}
            assert result["model_args"]["layerscale_init"] == MICRO["layerscale_init"]
    assert report.index("| oracle router") < report.index("| dense ViT, same active size |")  # the control first
    assert "| oracle - moe_token_balance | positive control" in report and "t interval over seeds" in report
    assert "| physical - moe_token_balance |" in report and "FFN branch's share" in report
    assert "Held-out accuracy of a logistic regression" in report and "| stage 0 (dense" in report
    assert "(0." in report.split("NMI between the chosen expert")[1]                  # chance levels in brackets
    assert any(line.startswith("[10/10] physical seed 1:") and "min left" in line for line in lines)
    with open(os.path.join(out, "results.md")) as f:
        assert f.read() == report
    lines.clear()                                              # a rerun skips every finished run
    assert ablation.run_ablation(out, MICRO, micro_data_root, rows=ROWS_E2E, log=lines.append) == report
    assert "0 runs to do, 10 finished earlier (skipped)" in lines
    with pytest.raises(ValueError, match="settings.json holds an ablation with other settings \\(cpt_steps\\)"):
        ablation.run_ablation(out, dict(MICRO, cpt_steps=5), micro_data_root, rows=("dense",), log=lines.append)


def test_gpu_variant_dry_run_on_the_cpu(tmp_path, micro_data_root):
    """The GPU variant's every stage (small preset, bf16 autocast) for 2 steps on micro data, on the CPU."""
    settings = ablation.dry_run_settings("gpu")
    assert settings["preset"] == "small" and settings["amp"] and settings["tile"] == MICRO["tile"]
    report = ablation.run_ablation(str(tmp_path / "gpu"), settings, micro_data_root, rows=("oracle", "physical"),
                                   log=lambda m: None)
    result = ablation.finished(str(tmp_path / "gpu"), "physical", 0)
    assert result["model_args"]["embed_dim"] == 384 and len(result["ffn_share"]) == 12
    assert "| MoE, physics router (physical variant) + balance |" in report


def test_separability_command_on_the_micro_corpus(micro_data_root, capsys):
    assert ablation.main(["--separability", "--dry-run", "--data", micro_data_root]) == 0
    table = capsys.readouterr().out
    rows = [line.strip("| ").split(" | ") for line in table.splitlines()
            if line.startswith("| ") and line.split(" | ")[0][2:] in ablation.FACTORS]
    assert [r[0] for r in rows] == list(ablation.FACTORS)
    assert all(0 <= float(v) <= 1 for r in rows for v in r[1:])


def test_descriptor_table_command_has_a_row_per_sensor_and_domain(capsys):
    """python -m nanosar.ablation --descriptor-table (moved from nanosar.sim, which must not need the model):
    the ENL of each sensor preset against its looks, and the descriptors of every suite domain."""
    assert ablation.main(["--descriptor-table", "--dry-run"]) == 0
    table = capsys.readouterr().out
    for name in [*sim.SENSORS, *(d.name for d in sim.suite_domains() + sim.EXTRA_DOMAINS)]:
        assert f"| {name}" in table
    row = next(line for line in table.splitlines() if line.startswith("| L2 ("))
    enl, looks = (float(cell.split()[0]) for cell in row.strip("| ").split(" | ")[2:4])
    assert enl == pytest.approx(looks, rel=0.08)


def test_data_prepared_with_other_sizes_is_refused(micro_data_root):
    with pytest.raises(ValueError, match=r"corpus.json was prepared with tile 32, .* needs tile 64"):
        ablation.prepare_data(micro_data_root, ablation.VARIANTS["quick"], lambda m: None)


def test_data_of_another_simulator_version_is_refused(micro_data_root, tmp_path, monkeypatch):
    """Results are only comparable on one simulator: a complete folder from another generator version
    is refused, not silently reused."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(micro_data_root, root)
    monkeypatch.setattr(ablation.sim, "GENERATOR_VERSION", ablation.sim.GENERATOR_VERSION + 1)
    with pytest.raises(ValueError, match=r"corpus.json was simulated by nanosar.sim generator version \d+, "
                                         r"this code's is \d+: use another --data folder"):
        ablation.prepare_data(str(root), MICRO, lambda m: None)


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
