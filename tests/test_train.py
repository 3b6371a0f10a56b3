"""train.py end to end on CPU: learning, exact resume, 2-process DDP = 1 process, the DG phase, bad configs,
and the faults of real runs: bad tiles, a full disk, preemption (SIGTERM) with and without DDP."""

import csv
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train as train_script
from nanosar import sim
from nanosar.checkpoint import load_checkpoint
from nanosar.data import Split, stream_indices

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


@pytest.fixture
def one_thread():
    """One torch thread in this process, as the subprocess runs have (OMP_NUM_THREADS=1): the same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_here(capsys, *args):
    """Run train.py's main in this process, where a test can patch it: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        train_script.main(list(args))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def signal_at_step(done, signum=signal.SIGTERM):
    """A learning_rate_at for train.py that sends this process `signum` as the step after `done` finished steps
    begins: train.py then stops after step done + 1."""
    def learning_rate_at(it, cfg):
        if it == done:
            os.kill(os.getpid(), signum)
        return real_learning_rate_at(it, cfg)
    real_learning_rate_at = train_script.learning_rate_at
    return learning_rate_at


def only_error(err):
    """train.py's one-line error: the last line of stderr, with no traceback before it."""
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("train.py: error: "), err
    return err.strip().splitlines()[-1]


def same_weights(a, b):
    """The model weights of two checkpoints are bit for bit equal."""
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)


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
    """With 2 micro-steps per step: the balance loss of micro-step m uses the expert counts of every process's
    micro-step m (all-reduced once per micro-step), as one process's micro-step of twice the tiles does."""
    args = [f"--data={domain}", "--max_iters=6", "--grad_accum=2", *COMMON]
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


# -----------------------------------------------------------------------------
# faults of real runs: a bad tile, a full disk, preemption


@pytest.mark.parametrize("where", ["train", "val"])
def test_a_label_outside_the_classes_is_one_line_naming_the_tile_and_keeps_the_checkpoint(where, domain, tmp_path,
                                                                                          capsys, one_thread):
    """A labels.npy edited after meta.json (which still lists only 0..6 and 255): a training tile read at step 3
    stops the run naming the last checkpoint (iter 2); a validation tile met by the evaluation at step 2 saves
    that step first. Either way one line naming the split, the tile and the value, exit status 2."""
    data = tmp_path / "domain"
    shutil.copytree(domain, data)
    split = Split(str(data / "train"))
    tile = stream_indices(180, 0, 3 * 2, 1)[0] if where == "train" else len(split) - 1   # read at step 3 / val
    labels = np.load(data / "train" / "labels.npy", mmap_mode="r+")
    labels[tile, 10, 20] = 9
    labels.flush()
    del labels
    status, _, err = train_here(capsys, f"--data={data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=4",
                                "--batch_size=2", "--ckpt_interval=2", "--eval_interval=2", "--eval_tiles=20",
                                "--log_interval=2", "--warmup_iters=1")
    ckpt, err = tmp_path / "run" / "ckpt.pt", only_error(err)
    assert status == 2
    assert f"split {data / 'train'}: tile {tile} has label value 9" in err and "re-run prepare.py" in err, err
    kept = "the last good checkpoint" if where == "train" else "the run is saved in"
    assert f"{kept} {ckpt} (iter 2)" in err, err
    assert load_checkpoint(str(ckpt))["iter_num"] == 2


@pytest.mark.parametrize("error, message", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), "the disk is probably full"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
])
def test_a_full_disk_while_saving_is_one_line_and_the_last_checkpoint_stays(error, message, domain, tmp_path,
                                                                            capsys, monkeypatch, one_thread):
    """torch.save fails as on a full disk (torch's own writer: RuntimeError "unexpected pos"; a Python file:
    ENOSPC) when ckpt.pt is saved the second time: one line naming the file and the intact one, no temporary."""
    real_save, saved = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if "ckpt.pt" in getattr(f, "name", str(f)):
            saved.append(f)
            if len(saved) > 1:
                f.write(b"half a checkpoint")
                raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    run = tmp_path / "run"
    status, _, err = train_here(capsys, f"--data={domain}", f"--out_dir={run}", "--max_iters=4", "--batch_size=2",
                                "--ckpt_interval=2", "--eval_interval=0", "--log_interval=2", "--warmup_iters=1")
    err = only_error(err)
    assert status == 2 and err.startswith(f"train.py: error: {run / 'ckpt.pt'}: ") and message in err, err
    assert f"the last good checkpoint {run / 'ckpt.pt'} (iter 2) is intact" in err, err
    assert load_checkpoint(str(run / "ckpt.pt"))["iter_num"] == 2              # every checksum verified
    assert sorted(os.listdir(run)) == [".lock", "best.pt", "ckpt.prev.pt", "ckpt.pt"]


def test_sigterm_finishes_the_step_saves_exits_0_and_resume_continues_exactly(domain, tmp_path, capsys, one_thread,
                                                                              monkeypatch):
    """SIGTERM in the middle of step 7 (between two logs and checkpoints): the step ends, ckpt.pt is saved, one
    line says so, main returns (exit 0) with the handlers restored; resume=True then gives the weights and the
    logged losses of a run never interrupted (drop path on: the random state is resumed too)."""
    args = [f"--data={domain}", "--batch_size=2", "--max_iters=10", "--drop_path_rate=0.1", "--log_interval=1",
            "--eval_interval=0", "--ckpt_interval=4", "--warmup_iters=2"]
    assert train_here(capsys, *args, f"--out_dir={tmp_path / 'full'}", f"--csv_log={tmp_path / 'full.csv'}")[0] == 0
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_script, "learning_rate_at", signal_at_step(6))           # step 7 begins at it = 6
    run, log = tmp_path / "stopped", f"--csv_log={tmp_path / 'stopped.csv'}"
    status, out, _ = train_here(capsys, *args, f"--out_dir={run}", log)
    assert status == 0 and signal.getsignal(signal.SIGTERM) is handler
    assert out.strip().splitlines()[-1] == f"train.py: SIGTERM at step 7: saved {run / 'ckpt.pt'}; resume with resume=True"
    assert weights(run)["iter_num"] == 7
    monkeypatch.undo()
    assert train_here(capsys, *args, f"--out_dir={run}", log, "--resume=True")[0] == 0
    same_weights(weights(tmp_path / "full"), weights(run))
    rows = [list(csv.DictReader(open(tmp_path / name))) for name in ("full.csv", "stopped.csv")]
    columns = ("iter", "loss", "seg_loss", "balance_loss", "z_loss", "lr")
    assert [[r[c] for c in columns] for r in rows[1]] == [[r[c] for c in columns] for r in rows[0]]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank, port, args, signal_step):
    """One of 2 gloo processes running train.py's main, with the environment torchrun gives it; rank 1 only
    gets SIGTERM when step signal_step + 1 begins (if not None)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1 and signal_step is not None:
        train_script.learning_rate_at = signal_at_step(signal_step)
    train_script.main(args)


def train_two_processes(*args, signal_step=None):
    """train.py in 2 gloo processes (torch.multiprocessing: faster to start than torchrun)."""
    mp.spawn(run_rank, args=(free_port(), list(args), signal_step), nprocs=2)


def test_ddp_sigterm_on_one_process_stops_both_and_resume_restores_each_processs_random_state(domain, tmp_path,
                                                                                               capfd):
    """2 processes seeded seed + rank, drop path on: SIGTERM reaching rank 1 alone stops both after the same step
    (the flag is agreed), ckpt.pt holds both random states, and resume=True gives each process its own back:
    stopped + resumed = a run never interrupted."""
    args = [f"--data={domain}", "--batch_size=2", "--max_iters=6", "--drop_path_rate=0.2", "--log_interval=3",
            "--eval_interval=0", "--ckpt_interval=0", "--warmup_iters=2", "--eval_tiles=4"]
    train_two_processes(*args, f"--out_dir={tmp_path / 'full'}")
    train_two_processes(*args, f"--out_dir={tmp_path / 'stopped'}", signal_step=2)
    out = capfd.readouterr().out
    assert out.count(f"train.py: SIGTERM at step 3: saved {tmp_path / 'stopped' / 'ckpt.pt'}") == 1, out[-2000:]
    stopped = weights(tmp_path / "stopped")
    assert stopped["iter_num"] == 3 and len(stopped["rng"]) == 2
    assert not torch.equal(stopped["rng"][0]["torch"], stopped["rng"][1]["torch"])
    train_two_processes(*args, f"--out_dir={tmp_path / 'stopped'}", "--resume=True")
    same_weights(weights(tmp_path / "full"), weights(tmp_path / "stopped"))
