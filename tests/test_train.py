"""train.py end to end on CPU: learning, exact resume, 2-process DDP = 1 process, the DG phase, bad configs."""

import csv
import os
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


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=False)


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


@pytest.mark.parametrize("args, message", [
    (["--learning_rat=0.1"], "unknown config key 'learning_rat'"),
    (["--max_iters=ten"], "max_iters must be a int, got 'ten'"),
    (["--batch_size=2.5"], "batch_size must be a int"),
    (["--data=/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
    (["--phase=dg"], "needs init=ckpt:PATH"),
    (["no_such_config.py"], "config file no_such_config.py not found"),
])
def test_bad_configuration_fails_at_start_with_a_clear_message(args, message, domain):
    result = train(f"--data={domain}", *args) if not any(a.startswith("--data=") for a in args) else train(*args)
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
