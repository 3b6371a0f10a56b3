"""train.py end to end on CPU: learning, exact resume, 2-process DDP = 1 process, the DG phase, bad configs."""

import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanosar import sim
from nanosar.data import Split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """A small prepared source domain: 64x64 tiles (the tiny preset's size)."""
    folder = tmp_path_factory.mktemp("synth") / "N-G3-HH-db"
    sim.write_domain(str(folder / "train"), sim.D("N", "G3", "HH"), "train", 200, 64)
    return str(folder)


def train(*args, torchrun=False):
    """Run train.py (or torchrun with 2 gloo processes); return the completed process."""
    cmd = [sys.executable, "train.py", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def weights(out_dir, name="ckpt.pt"):
    """A checkpoint the script wrote, read as any user would: plain data, weights_only=True."""
    return torch.load(os.path.join(out_dir, name), map_location="cpu", weights_only=True)


COMMON = ["--log_interval=5", "--eval_interval=0", "--warmup_iters=2", "--ckpt_interval=0"]


def test_training_lowers_the_loss_and_beats_a_constant_predictor(domain, tmp_path):
    log = tmp_path / "log.csv"
    ok(train(f"--data={domain}", f"--out_dir={tmp_path}", "--max_iters=100", "--batch_size=8", "--log_interval=10",
             "--eval_interval=0", "--warmup_iters=10", f"--csv_log={log}", "--learning_rate=2e-3"))
    rows = list(csv.DictReader(open(log)))
    first, last = float(rows[0]["seg_loss"]), float(rows[-1]["seg_loss"])
    assert last < 0.8 * first, (first, last)
    # a constant predictor (the most frequent training class everywhere) on the same held-out tiles
    split = Split(os.path.join(domain, "train"))
    val = np.asarray(split.labels[len(split) - len(split) // 10:])
    majority = np.bincount(np.asarray(split.labels[: len(split) - len(split) // 10]).ravel(), minlength=7).argmax()
    present = np.unique(val)
    constant_miou = np.mean([(val == majority).sum() / ((val == c) | (majority == c)).sum() if c == majority else 0.0
                             for c in present])
    val_miou = float(rows[-1]["val_miou"])
    print(f"seg loss {first:.3f} -> {last:.3f}; source val mIoU {val_miou:.3f} vs constant {constant_miou:.3f}")
    assert val_miou > constant_miou + 0.05


def test_kill_and_resume_gives_the_same_weights(domain, tmp_path):
    args = [f"--data={domain}", "--batch_size=4", "--lr_decay_iters=12", "--drop_path_rate=0.1", *COMMON]
    ok(train(*args, f"--out_dir={tmp_path / 'full'}", "--max_iters=12"))
    ok(train(*args, f"--out_dir={tmp_path / 'half'}", "--max_iters=6"))
    ok(train(*args, f"--out_dir={tmp_path / 'half'}", "--max_iters=12", "--resume=True"))
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert resumed["iter_num"] == 12
    for name, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=1e-6, msg=name)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(domain, tmp_path):
    args = [f"--data={domain}", "--max_iters=6", *COMMON]
    ok(train(*args, f"--out_dir={tmp_path / 'two'}", "--batch_size=4", torchrun=True))
    ok(train(*args, f"--out_dir={tmp_path / 'one'}", "--batch_size=8"))
    ok(train(*args, f"--out_dir={tmp_path / 'half'}", "--batch_size=4"))     # control: half the global batch
    two, one, half = (weights(tmp_path / name)["model"] for name in ("two", "one", "half"))
    # Adam turns float-order noise in near-zero gradients into ~lr-sized steps, so equality is to 1e-4
    # (lr = 1e-3); the control shows that a different global batch is far outside that
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-4
    assert max((half[k] - one[k]).abs().max().item() for k in one) > 1e-3


def test_dg_phase_freezes_the_backbone_and_trains_the_head(domain, tmp_path):
    ok(train(f"--data={domain}", f"--out_dir={tmp_path / 'cpt'}", "--max_iters=4", "--batch_size=4", *COMMON))
    ckpt = tmp_path / "cpt" / "ckpt.pt"
    result = ok(train(f"--data={domain}", f"--out_dir={tmp_path / 'dg'}", "--phase=dg", f"--init=ckpt:{ckpt}",
                      "--max_iters=4", "--batch_size=4", *COMMON))
    cpt, dg = weights(tmp_path / "cpt"), weights(tmp_path / "dg")
    for name, value in cpt["model"].items():
        if name.startswith("backbone."):
            assert torch.equal(dg["model"][name], value), name
    assert not torch.equal(dg["model"]["head.classifier.weight"], cpt["model"]["head.classifier.weight"])
    assert "source val mIoU" in result.stdout


def test_dg_phase_keeps_the_router_inputs_of_its_backbone(domain, tmp_path):
    """A backbone trained with the physical descriptors (standardised with given statistics) keeps them in the
    DG phase: its router learned those inputs, so init=ckpt brings descriptors, their statistics and windows."""
    ok(train(f"--data={domain}", f"--out_dir={tmp_path / 'cpt'}", "--max_iters=2", "--batch_size=2",
             "--descriptors=physical", "--multilook=2", "--descriptor_mean=[0.9, 0.5, -1.0]",
             "--descriptor_std=[0.1, 0.5, 1.0]", *COMMON))
    ok(train(f"--data={domain}", f"--out_dir={tmp_path / 'dg'}", "--phase=dg",
             f"--init=ckpt:{tmp_path / 'cpt' / 'ckpt.pt'}", "--max_iters=2", "--batch_size=2", *COMMON))
    args = weights(tmp_path / "dg")["model_args"]
    assert (args["descriptors"], args["multilook"]) == ("physical", 2)
    assert tuple(args["descriptor_mean"]) == (0.9, 0.5, -1.0) and tuple(args["descriptor_std"]) == (0.1, 0.5, 1.0)


@pytest.mark.parametrize("args, message", [
    (["--learning_rat=0.1"], "unknown config key 'learning_rat'"),
    (["--max_iters=ten"], "max_iters must be a int, got 'ten'"),
    (["--batch_size=2.5"], "batch_size must be a int"),
    (["--data=/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
    (["--phase=dg"], "needs init=ckpt:PATH"),
    (["no_such_config.py"], "config file no_such_config.py not found"),
    (["--learning_rate=1e999"], "learning_rate must be a finite number > 0, got inf"),
    (["--learning_rate=-0.1"], "learning_rate must be a finite number > 0"),
    (["--grad_accum=0"], "grad_accum must be >= 1, got 0"),
    (["--batch_size=0"], "batch_size must be >= 1, got 0"),
    (["--val_fraction=1.5"], "val_fraction must be in [0, 1)"),
    (["--schedule=linear"], "schedule must be one of cosine, poly, constant"),
])
def test_bad_configuration_fails_at_start_with_a_clear_message(args, message, domain, tmp_path):
    data = [] if any(a.startswith("--data=") for a in args) else [f"--data={domain}"]
    result = train(*data, f"--out_dir={tmp_path / 'run'}", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_checkpoint_from_another_preset_is_refused(domain, tmp_path):
    ok(train(f"--data={domain}", f"--out_dir={tmp_path / 'tiny'}", "--max_iters=1", "--batch_size=2", *COMMON))
    shutil.copytree(tmp_path / "tiny", tmp_path / "other")
    result = train(f"--data={domain}", f"--out_dir={tmp_path / 'other'}", "--preset=small", "--resume=True",
                   "--max_iters=2")
    assert result.returncode == 2 and "is from another model: embed_dim=96 (here 384)" in result.stderr, result.stderr


def test_config_file_and_override_order(domain, tmp_path):
    config = tmp_path / "cfg.py"
    config.write_text("max_iters = 2\nbatch_size = 2\nlearning_rate = 1  # an int is accepted for a float\n")
    result = ok(train(f"--data={domain}", str(config), "--max_iters=3", f"--out_dir={tmp_path / 'run'}", *COMMON))
    saved = weights(tmp_path / "run")["config"]
    assert saved["max_iters"] == 3 and saved["batch_size"] == 2 and saved["learning_rate"] == 1.0
    assert "iter      3" in result.stdout


def test_config_file_with_a_syntax_error_is_a_clear_error(domain, tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("max_iters = = 3\n")
    result = train(f"--data={domain}", str(config))
    assert result.returncode == 2 and f"config file {config}: SyntaxError" in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(domain):
    result = train(f"--data={domain}", "--device=cuda")
    assert result.returncode == 2 and "device=cuda but no CUDA GPU" in result.stderr, result.stderr[-2000:]


def test_ddp_with_uneven_validation_shards_finishes(domain, tmp_path):
    """19 validation tiles over 2 ranks in batches of 3: rank 0 runs 4 evaluation batches, rank 1 runs 3.
    Evaluation issues no collective but the final sum, so this neither hangs nor aborts."""
    result = ok(train(f"--data={domain}", f"--out_dir={tmp_path}", "--max_iters=4", "--batch_size=3",
                      "--eval_tiles=19", "--eval_interval=2", "--log_interval=2", "--warmup_iters=1",
                      torchrun=True))
    assert result.stdout.count("| source val mIoU") == 2


def test_best_checkpoint_is_the_one_with_the_best_source_validation(domain, tmp_path):
    log = tmp_path / "log.csv"
    ok(train(f"--data={domain}", f"--out_dir={tmp_path}", "--max_iters=12", "--batch_size=4", "--eval_interval=2",
             "--log_interval=2", "--warmup_iters=2", "--ckpt_interval=0", f"--csv_log={log}", "--eval_tiles=8"))
    rows = [r for r in csv.DictReader(open(log)) if r["val_miou"]]
    assert [int(r["iter"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    best_row = max(rows, key=lambda r: float(r["val_miou"]))       # the first of equal maxima, as train.py keeps
    best, last = weights(tmp_path, "best.pt"), weights(tmp_path)
    assert best["iter_num"] == int(best_row["iter"]) and last["iter_num"] == 12
    assert best["best_val_miou"] == pytest.approx(float(best_row["val_miou"]))
    assert "optimizer" not in best and "optimizer" in last
    if best["iter_num"] != 12:
        assert any(not torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_damaged_checkpoints_give_a_clear_error_naming_the_file(domain, tmp_path):
    args = [f"--data={domain}", f"--out_dir={tmp_path}", "--batch_size=2", *COMMON]
    ok(train(*args, "--max_iters=1"))
    ok(train(*args, "--max_iters=2", "--resume=True"))              # a second save keeps the first as .prev
    path, prev = tmp_path / "ckpt.pt", tmp_path / "ckpt.prev.pt"
    assert weights(tmp_path, "ckpt.prev.pt")["iter_num"] == 1
    good = path.read_bytes()
    # a flipped byte inside a tensor: the file still loads, only the checksum sees it
    data = bytearray(good)
    data[len(good) // 2] ^= 0xFF                                     # inside the largest tensors
    for damaged, message in [(bytes(data), "cannot be read|checksum of"), (good[: len(good) // 3], "cannot be read"),
                             (b"", "is empty")]:
        path.write_bytes(damaged)
        result = train(*args, "--max_iters=3", "--resume=True")
        assert result.returncode == 2, result.stderr[-2000:]
        last_line = result.stderr.strip().splitlines()[-1]
        assert str(path) in last_line and str(prev) in last_line, last_line
        assert re.search(message, last_line), last_line


def test_a_flipped_byte_in_a_weight_is_caught_by_the_checksum(tmp_path):
    from nanosar.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    path = str(tmp_path / "ckpt.pt")
    weight = torch.arange(4096, dtype=torch.float32)
    save_checkpoint(path, {"model": {"w": weight}, "model_args": {}, "config": {}})
    data = bytearray(open(path, "rb").read())
    offset = bytes(data).index(weight[1000:1002].numpy().tobytes())   # the raw tensor bytes in the zip
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert torch.load(path, weights_only=True)["model"]["w"][1000] != 1000.0   # loads, silently different
    with pytest.raises(CheckpointError, match="checksum of 'model' does not match"):
        load_checkpoint(path)
    assert load_checkpoint(path, parts=("config",)) == {"config": {}}          # only what is asked is checked


def test_a_second_writer_of_a_run_folder_is_refused(domain, tmp_path):
    from nanosar.files import RunLock

    with RunLock(str(tmp_path)):
        result = train(f"--data={domain}", f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2", *COMMON)
    assert result.returncode == 2 and "is in use by another run" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "ckpt.pt").exists()


def test_resume_before_any_checkpoint_starts_fresh_and_removes_debris_of_killed_runs(domain, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = tmp_path / f"ckpt.pt.tmp-{int(dead.stdout)}"                        # the pid of a finished process
    debris.write_bytes(b"half a checkpoint")
    result = ok(train(f"--data={domain}", f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2",
                      "--resume=True", *COMMON))
    assert "does not exist yet: starting a fresh run" in result.stdout
    assert f"removed {debris.name}, a temporary file of a killed run" in result.stdout and not debris.exists()
    assert weights(tmp_path)["iter_num"] == 1


def test_resume_truncates_the_csv_log_to_the_checkpoint(domain, tmp_path):
    log = tmp_path / "log.csv"
    args = [f"--data={domain}", f"--out_dir={tmp_path}", "--batch_size=2", "--log_interval=2", "--eval_interval=0",
            "--warmup_iters=1", "--ckpt_interval=4", f"--csv_log={log}", "--max_iters=8"]
    ok(train(*args))
    # as if killed after iter 8 was logged but before it was saved: ckpt.pt is the iter-4 checkpoint
    shutil.copy(tmp_path / "ckpt.prev.pt", tmp_path / "ckpt.pt")
    ok(train(*args, "--resume=True"))
    assert [int(r["iter"]) for r in csv.DictReader(open(log))] == [2, 4, 6, 8]


def test_a_non_finite_loss_stops_the_run_without_saving(domain, tmp_path):
    result = train(f"--data={domain}", f"--out_dir={tmp_path}", "--max_iters=30", "--batch_size=2",
                   "--learning_rate=1e30", "--warmup_iters=0", "--log_interval=1", "--eval_interval=0",
                   "--ckpt_interval=0", "--grad_clip=0")
    assert result.returncode == 2 and "became NaN or infinite" in result.stderr, result.stdout[-1000:] + result.stderr[-2000:]
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "best.pt").exists()


def test_help_lists_every_key_and_exits_0():
    for flag in ("--help", "-h"):
        result = ok(train(flag))
        for key in ("max_iters", "learning_rate", "n_experts", "balance_loss_weight", "moe_dispatch", "patch_size"):
            assert f"--{key}=" in result.stdout, key
    assert "Switch load-balance loss weight" in result.stdout       # the comment of SARConfig's field


def test_every_kind_of_model_key_reaches_the_model(domain, tmp_path):
    """Keys naming SARConfig fields override the preset: int, float, str, bool-like int, tuple."""
    overrides = {"n_experts": 4, "top_k": 2, "mlp_ratio": 2.0, "balance_loss_weight": 0.0, "router_z_loss_weight": 0.01,
                 "moe_dispatch": "reference", "num_register_tokens": 2, "descriptor_dim": 0, "patch_size": 16,
                 "feature_layers": (0, 1, 2, 3), "layerscale_init": 0.0, "head_dim": 16}
    args = [f"--{k}={list(v) if isinstance(v, tuple) else v}" for k, v in overrides.items()]
    ok(train(f"--data={domain}", f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2", *COMMON, *args))
    saved = weights(tmp_path)
    for key, value in overrides.items():
        assert saved["model_args"][key] == value, key
    assert saved["model_args"]["embed_dim"] == 96                    # untouched: the tiny preset's
    result = train(f"--data={domain}", f"--out_dir={tmp_path / 'x'}", "--n_experts=two")
    assert result.returncode == 2 and "n_experts must be a int" in result.stderr
