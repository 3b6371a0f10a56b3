"""
Train the physics-guided MoE segmenter, in the spirit of nanoGPT's train.py: the configuration is the
plain variables below plus every field of nanosar.model.SARConfig (n_experts, top_k, descriptor_dim,
balance_loss_weight, moe_dispatch, patch_size, ...: they override the preset), set by config files and
then by --key=value (type-checked; unknown keys are errors), and saved with every checkpoint.

    python train.py --help                                                          # every key
    python train.py --data=data/synth/N-G3-HH-db --preset=tiny --phase=cpt       # one process, CPU or GPU
    torchrun --standalone --nproc_per_node=8 train.py config/cpt_large.py          # one node, 8 GPUs (README: more)

Two phases, as in the paper: "cpt" trains backbone and head (continued pre-training on a mix of prepared
datasets, from scratch or upcycled from DINOv2); "dg" freezes the backbone of an earlier run and trains
the head on one source domain. Model selection (best.pt) uses held-out source tiles, never a target.

SIGTERM or SIGUSR1 (a scheduler's notice of preemption) on any process ends the current step on every
process, saves ckpt.pt and exits 0: resume=True continues exactly. A bad tile, a NaN loss or a full disk
stops the run with one line naming the file and the checkpoint to resume from.
"""

import contextlib
import csv
import dataclasses
import inspect
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosar.checkpoint import check_same_architecture, load_checkpoint, save_checkpoint
from nanosar.configurator import key_comments, parse_config
from nanosar.data import TileStream, channel_statistics, open_splits, read_tiles
from nanosar.dinov2 import upcycle_from_dinov2
from nanosar.distributed import (StopSignals, close_distributed, gather_from_processes, init_distributed,
                                 max_over_processes, wait_for_every_process)
from nanosar.files import RunLock, RunLockedError, open_csv_log, remove_stale_temporaries
from nanosar.metrics import evaluate
from nanosar.model import SARConfig, Segmenter, balance_loss_over_blocks, weight_decay_groups

# -----------------------------------------------------------------------------
# configuration: plain variables, overridden by config files and --key=value
out_dir = "out/train"
data = "data/synth/N-G3-HH-db"  # prepared domain folder(s) holding <train_split>/; comma-separated to mix
train_split = "train"
val_fraction = 0.1          # last fraction of each domain's training tiles, held out as source validation
phase = "cpt"               # "cpt": train backbone + head; "dg": frozen backbone, train the head only
init = "scratch"            # "scratch", "dinov2:PATH" (upcycle a local DINOv2 file), "ckpt:PATH" (a run's backbone)
preset = "tiny"             # tiny, small, base, large (nanosar/model.py); SARConfig keys override it
batch_size = 8              # tiles per process per micro-step
grad_accum = 1              # micro-steps per optimizer step (global batch = batch_size * grad_accum * world)
max_iters = 200
learning_rate = 1e-3
min_lr = 1e-5
warmup_iters = 20
lr_decay_iters = 0          # 0 = max_iters; set it to keep the schedule when extending a run
schedule = "cosine"         # "cosine", "poly" (power 0.9, as mmseg) or "constant"
weight_decay = 0.05         # AdamW; none on norms, biases, LayerScale and embeddings
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0             # 0 = off
augment = True              # random flips and 90-degree rotations
dtype = "bfloat16"          # autocast dtype on GPU ("float32" = off); the CPU runs float32
compile = False             # torch.compile the model
act_ckpt = False            # activation checkpointing of the transformer blocks (large preset)
device = "auto"             # "auto", "cpu", "cuda"
seed = 0
log_interval = 10
eval_interval = 100         # 0 = only at the end
eval_tiles = 256            # held-out source tiles per evaluation (all of them if fewer)
ckpt_interval = 100         # 0 = only at the end
csv_log = ""                # optional CSV file of the logged values
resume = False              # continue from out_dir/ckpt.pt (a fresh start if there is none yet)
peak_flops = 989e12         # per GPU, for the MFU estimate (H100/H200 dense bf16)
# -----------------------------------------------------------------------------
TRAIN_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# SARConfig fields a run may set; the others are the data's input contract (read from the prepared split)
DATA_CONTRACT = ("img_size", "in_chans", "input_unit", "channels", "pixel_mean", "pixel_std", "num_classes",
                 "class_names")
MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SARConfig) if f.name not in DATA_CONTRACT}
# what a backbone from init=ckpt:PATH brings along: it was trained on these inputs (pixels and router features)
BACKBONE_INPUTS = ("pixel_mean", "pixel_std", "descriptors", "descriptor_mean", "descriptor_std", "multilook",
                   "entropy_bins", "roughness_block")
CSV_COLUMNS = ["iter", "loss", "seg_loss", "balance_loss", "z_loss", "lr", "tiles_per_s", "mfu", "val_miou",
               "expert_load"]


def fail(message):
    """Stop with a clear message (exit status 2), before anything expensive starts."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def or_fail(function, *args, **kwargs):
    """function(*args, **kwargs), a user's fault (a missing or damaged file, bad data, a full disk, a busy
    run folder: OSError or ValueError, which CheckpointError and RunLockedError are) ending in fail()."""
    try:
        return function(*args, **kwargs)
    except (OSError, ValueError, RunLockedError) as e:
        fail(e.strerror if isinstance(e, OSError) and e.strerror and not e.filename else str(e))


def print_help():
    """Every key with its default, type and the comment of its definition (train.py's block, SARConfig)."""
    comments = key_comments(inspect.getsource(sys.modules[__name__]), inspect.getsource(SARConfig))
    print(__doc__.strip())
    for title, keys in (("training keys", {k: globals()[k] for k in TRAIN_KEYS}),
                        ("model keys (nanosar.model.SARConfig; default: the preset's value)", MODEL_DEFAULTS)):
        print(f"\n{title}:\n" + "\n".join(f"  --{f'{k}={v!r}':<40} {type(v).__name__:6} {comments.get(k, '')}"
                                          for k, v in keys.items()))


def validate_config(cfg):
    """Stop at start (exit 2) on a value that would otherwise train nothing, or train on NaN."""
    choices = dict(phase=("cpt", "dg"), schedule=("cosine", "poly", "constant"), device=("auto", "cpu", "cuda"),
                   dtype=("float32", "bfloat16", "float16"))
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            fail(f"{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    at_least = dict(batch_size=1, grad_accum=1, max_iters=1, log_interval=1, eval_tiles=1, warmup_iters=0,
                    lr_decay_iters=0, eval_interval=0, ckpt_interval=0)
    for key, low in at_least.items():
        if cfg[key] < low:
            fail(f"{key} must be >= {low}, got {cfg[key]}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
        if not (math.isfinite(cfg[key]) and cfg[key] >= (1e-30 if key == "learning_rate" else 0)):
            fail(f"{key} must be a finite number {'> 0' if key == 'learning_rate' else '>= 0'}, got {cfg[key]}")
    for key in ("val_fraction", "beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            fail(f"{key} must be in [0, 1), got {cfg[key]}")
    if cfg["phase"] == "dg" and not cfg["init"].startswith("ckpt:"):
        fail("phase=dg freezes the backbone, so it needs init=ckpt:PATH (a pre-trained run)")
    if not (cfg["init"] == "scratch" or cfg["init"].startswith(("dinov2:", "ckpt:"))):
        fail(f"init must be scratch, dinov2:PATH or ckpt:PATH, got {cfg['init']!r}")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        fail("device=cuda but no CUDA GPU is visible to this process (use device=cpu or auto)")


# -----------------------------------------------------------------------------
# data and model


def model_config_from(cfg, model_overrides, splits):
    """SARConfig: the preset, the run's model keys, and the data's input contract (channels, unit, classes,
    tile size, per-channel mean and std of the training pixels as the input normalisation)."""
    meta = splits[0].meta
    mean, std = channel_statistics(splits)
    contract = dict(img_size=meta["tile_shape"][1], in_chans=len(meta["channels"]), input_unit=meta["unit"],
                    channels=tuple(meta["channels"]), num_classes=len(meta["class_names"]),
                    class_names=tuple(meta["class_names"]), pixel_mean=mean, pixel_std=std)
    return or_fail(SARConfig.preset, cfg["preset"], **model_overrides, **contract)


def build_model(cfg, model_overrides, splits, resume_state, master):
    """The Segmenter: resumed, upcycled from DINOv2, with the backbone of an earlier run, or from scratch."""
    if resume_state is not None:
        model_cfg = SARConfig(**resume_state["model_args"])
        or_fail(check_same_architecture, resume_state["model_args"],
                dataclasses.asdict(model_config_from(cfg, model_overrides, splits)), cfg["out_dir"] + "/ckpt.pt")
        model = Segmenter(model_cfg)
        model.load_state_dict(resume_state["model"])
        return model
    model_cfg = model_config_from(cfg, model_overrides, splits)
    kind, _, path = cfg["init"].partition(":")
    if kind == "ckpt":   # the backbone keeps the input normalisation and router inputs it was trained with
        source = or_fail(load_checkpoint, path, parts=("model", "model_args"))
        kept = {k: source["model_args"][k] for k in BACKBONE_INPUTS if k in source["model_args"]}
        model_cfg = or_fail(dataclasses.replace, model_cfg, **kept)
        or_fail(check_same_architecture, source["model_args"], dataclasses.asdict(model_cfg), path)
    model = Segmenter(model_cfg)
    if kind == "ckpt":
        model.backbone.load_state_dict({k[9:]: v for k, v in source["model"].items() if k.startswith("backbone.")})
    elif kind == "dinov2":
        if not os.path.isfile(path):
            fail(f"DINOv2 checkpoint {path} not found (download it once, then pass its local path)")
        report = or_fail(upcycle_from_dinov2, model, torch.load(path, map_location="cpu", weights_only=True))
        if master:
            print(report)
    return model


# -----------------------------------------------------------------------------
# optimisation, evaluation, checkpoints


def learning_rate_at(it, cfg):
    """Linear warm-up, then cosine or poly decay to min_lr over lr_decay_iters (or constant)."""
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / cfg["warmup_iters"]
    if cfg["schedule"] == "constant" or it >= decay_iters:
        return cfg["learning_rate"] if cfg["schedule"] == "constant" else cfg["min_lr"]
    progress = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg["schedule"] == "cosine" else (1 - progress) ** 0.9
    return cfg["min_lr"] + shape * (cfg["learning_rate"] - cfg["min_lr"])


def make_optimizer(model, cfg, fused):
    """AdamW; weight decay on matrices and conv kernels only (not norms, biases, LayerScale, embeddings)."""
    groups = weight_decay_groups(model, cfg["weight_decay"])
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def validation_batches(stream, cfg, rank, world):
    """This process's share (every world-th) of the held-out source tiles, in batches."""
    pairs = stream.val[: cfg["eval_tiles"]][rank::world]
    for b in range(0, len(pairs), cfg["batch_size"]):
        yield read_tiles(stream.splits, pairs[b:b + cfg["batch_size"]])


def set_train_mode(model, trainable_backbone):
    """Training mode, except for a frozen backbone, which stays in eval mode (no drop path)."""
    model.train()
    if not trainable_backbone:
        model.backbone.eval()


# -----------------------------------------------------------------------------


def main(argv):
    if {"-h", "--help"} & set(argv):
        return print_help()
    config, given = parse_config(argv, {**{k: globals()[k] for k in TRAIN_KEYS}, **MODEL_DEFAULTS}, fail)
    cfg = {k: config[k] for k in TRAIN_KEYS}
    model_overrides = {k: config[k] for k in MODEL_DEFAULTS if k in given}     # the rest: the preset's
    validate_config(cfg)
    cfg["model"] = model_overrides                            # saved with the checkpoints
    with contextlib.ExitStack() as cleanup:   # signal handlers, process group, run lock, CSV log: undone at any exit
        signals = cleanup.enter_context(StopSignals())        # SIGTERM / SIGUSR1: finish the step, save, exit 0
        rank, world, device = init_distributed(cfg["device"])
        cleanup.callback(close_distributed)
        run = set_up_run(cfg, model_overrides, rank, world, device, cleanup)
        stopped_by = training_loop(run, signals)
        wait_for_every_process()          # no process tears the group down while another still uses it
        if run.master and stopped_by is not None:
            print(f"train.py: {stopped_by.name} at step {run.it}: saved {run.ckpt_path}; resume with resume=True",
                  flush=True)
        elif run.master:
            print(f"done: {run.ckpt_path} (last, iter {run.it})" + (
                f", {run.best_path} (best source val mIoU {100 * run.best:.2f})" if run.best >= 0 else ""))


def training_loop(run, signals):
    """Train from run.it to max_iters; returns the signal that stopped it early (after saving), or None."""
    cfg, model, rank, world = run.cfg, run.model, run.rank, run.world
    B, A = cfg["batch_size"], cfg["grad_accum"]
    interval = IntervalStats(run.raw_model.cfg, run.device)   # losses, expert load since the last log
    while run.it < cfg["max_iters"]:
        lr = learning_rate_at(run.it, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        for micro in range(A):
            start = run.it * run.global_batch + (micro * world + rank) * B   # this process's slice of the global batch
            images, labels = (t.to(run.device, non_blocking=True) for t in read_training_batch(run, start))
            with contextlib.nullcontext() if not run.ddp or micro == A - 1 else model.no_sync():
                with run.autocast:
                    out = model(images)
                    loss, seg, balance = training_loss(out, labels, run)
                (loss / A).backward()
            interval.add(loss, seg, balance, out, A)
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_([p for p in run.raw_model.parameters() if p.requires_grad],
                                           cfg["grad_clip"])
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.it += 1
        interval.steps += 1

        it, last = run.it, run.it == cfg["max_iters"]
        stopped_by = signals.agreed()            # a signal on any process stops every process at this step
        evaluate_now = (cfg["eval_interval"] and it % cfg["eval_interval"] == 0) or last
        save_now = (cfg["ckpt_interval"] and it % cfg["ckpt_interval"] == 0) or last or stopped_by is not None
        log_now = it % cfg["log_interval"] == 0 or last or stopped_by is not None
        if log_now or evaluate_now or save_now:   # all ranks agree, and stop before a NaN model is used
            stop_if_not_finite(run, interval, lr)
        val_miou = evaluate_and_keep_best(run) if evaluate_now else ""
        if log_now:
            log_progress(run, interval, lr, val_miou)
        if save_now:
            save_training_state(run)
        if stopped_by is not None:
            return stopped_by
    return None


# -----------------------------------------------------------------------------
# the run: its set-up, one training step's loss, and the robustness around the loop


@dataclasses.dataclass
class Run:
    """What the training loop and its helpers share: the configuration, the processes, the model (as called:
    compiled and/or DDP-wrapped; raw: as saved and evaluated), the data, the files, and where it stands."""
    cfg: dict
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    raw_model: Segmenter
    optimizer: torch.optim.Optimizer
    stream: TileStream
    autocast: object
    trainable_backbone: bool
    ckpt_path: str
    best_path: str
    csv_file: object            # open CSV log (rank 0, csv_log set) or None
    flops_per_tile: float       # training FLOPs of one tile (MFU)
    it: int                     # optimizer steps done
    best: float                 # best source-validation mIoU so far (-1: none yet)
    start_iter: int = 0
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world > 1 or dist.is_initialized()

    @property
    def use_cuda(self):
        return self.device.type == "cuda"

    @property
    def global_batch(self):
        return self.cfg["batch_size"] * self.cfg["grad_accum"] * self.world


def set_up_run(cfg, model_overrides, rank, world, device, cleanup):
    """Data, the run folder (locked, debris of killed runs removed), the model and optimizer (resumed, with
    this process's random state), the CSV log -> Run. cleanup (ExitStack) releases the lock and the log."""
    master, use_cuda = rank == 0, device.type == "cuda"
    torch.manual_seed(cfg["seed"] + rank)
    use_amp = use_cuda and cfg["dtype"] != "float32"
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg["dtype"])) if use_amp else contextlib.nullcontext()

    # data, then the run folder: one writer at a time, debris of killed runs removed
    splits = or_fail(open_splits, [d for d in cfg["data"].split(",") if d], cfg["train_split"])
    stream = or_fail(TileStream, splits, cfg["val_fraction"], cfg["seed"])
    ckpt_path, best_path = os.path.join(cfg["out_dir"], "ckpt.pt"), os.path.join(cfg["out_dir"], "best.pt")
    if master:
        or_fail(cleanup.enter_context, RunLock(cfg["out_dir"]))   # the OS also drops it if this process dies
        for name in remove_stale_temporaries(cfg["out_dir"]):
            print(f"removed {name}, a temporary file of a killed run")
    resume_state = or_fail(load_checkpoint, ckpt_path) if cfg["resume"] and os.path.isfile(ckpt_path) else None
    if cfg["resume"] and resume_state is None and master:
        print(f"resume=True but {ckpt_path} does not exist yet: starting a fresh run")

    # model and optimizer
    model = build_model(cfg, model_overrides, splits, resume_state, master)
    trainable_backbone = cfg["phase"] == "cpt"
    model.backbone.requires_grad_(trainable_backbone)
    model.backbone.grad_checkpointing = cfg["act_ckpt"]
    model.to(device)
    set_train_mode(model, trainable_backbone)
    optimizer = make_optimizer(model, cfg, fused=use_cuda)
    start_iter, best = 0, -1.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        start_iter, best = resume_state["iter_num"], resume_state["best_val_miou"]
        restore_random_state(resume_state["rng"], rank, world, ckpt_path)
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if world > 1 or dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if use_cuda else None)
    if master:
        counts = raw_model.parameter_counts()
        print(f"model {cfg['preset']}: {counts['backbone_total'] / 1e6:.2f}M backbone "
              f"({counts['backbone_active'] / 1e6:.2f}M active), {counts['head'] / 1e6:.2f}M head; phase "
              f"{cfg['phase']}, {len(stream.train)} train / {len(stream.val)} val tiles, {world} process(es) on "
              f"{device.type}")
    csv_file = None
    if master and cfg["csv_log"]:
        csv_file = cleanup.enter_context(open_csv_log(cfg["csv_log"], CSV_COLUMNS,
                                                      start_iter if resume_state is not None else None))
    return Run(cfg, rank, world, device, model, raw_model, optimizer, stream, autocast, trainable_backbone,
               ckpt_path, best_path, csv_file, raw_model.flops_per_tile(trainable_backbone), it=start_iter, best=best,
               start_iter=start_iter)


def training_loss(out, labels, run):
    """(loss, seg, balance) of one micro-batch, each (): out a SegmenterOutput, labels (B, H, W).

    seg is the cross-entropy summed over pixels / this process's pixels: every process weighs its tiles
    alike, so DDP's mean of gradients equals the gradient of the global batch. Under DDP the balance loss
    is that of the routing of every process's micro-batch: its expert counts are all-reduced here, once per
    micro-step (micro-step m's backward needs them; the counts of later micro-steps do not exist yet).
    """
    cfg = run.raw_model.cfg
    seg = F.cross_entropy(out.logits.float(), labels, ignore_index=255, reduction="sum") / labels.numel()
    balance = out.balance_loss
    if run.ddp and cfg.n_experts > 1:
        global_load = out.expert_load.clone()
        dist.all_reduce(global_load)
        balance = balance_loss_over_blocks(global_load, out.router_prob)
    aux = cfg.balance_loss_weight * balance + cfg.router_z_loss_weight * out.z_loss
    return seg + (aux if run.trainable_backbone else 0.0), seg, balance


class IntervalStats:
    """What the loop sums between two logs: losses (4,) = loss, seg, balance, z (micro-step means), expert
    assignments (L, E), and steps whose loss was NaN or infinite (never reset: one stops the run)."""

    def __init__(self, model_cfg, device):
        moe = model_cfg.n_experts > 1
        self.sums = torch.zeros(4, device=device)
        self.load = torch.zeros((model_cfg.depth, model_cfg.n_experts) if moe else (0, 1), dtype=torch.long,
                                device=device)
        self.non_finite = torch.zeros((), dtype=torch.long, device=device)
        self.steps, self.t0 = 0, time.time()

    def add(self, loss, seg, balance, out, micro_steps):
        """One micro-step's losses (no host sync) and expert assignments."""
        self.non_finite += (~torch.isfinite(loss.detach())).long()
        self.sums += torch.stack([loss.detach(), seg.detach(), balance.detach(), out.z_loss.detach()]) / micro_steps
        self.load += out.expert_load

    def reset(self):
        self.sums.zero_()
        self.load.zero_()
        self.steps, self.t0 = 0, time.time()


def read_training_batch(run, start):
    """This process's batch_size tiles at stream position `start` (images, labels), augmented. A tile that
    cannot be read (a bad label, an I/O error) stops the run with one line; the half-done step is not saved."""
    try:
        return run.stream.batch(start, run.cfg["batch_size"], run.cfg["augment"])
    except (OSError, ValueError) as e:
        fail(f"{e}; {last_good_checkpoint(run.ckpt_path)}")


def stop_if_not_finite(run, interval, lr):
    """Stop every process, saving nothing, if a loss since the start was NaN or infinite (a collective)."""
    if run.ddp:
        dist.all_reduce(interval.non_finite)
    if interval.non_finite.item():
        fail(f"the loss became NaN or infinite by iter {run.it} (learning rate {lr:.3g}); stopped without saving; "
             f"{last_good_checkpoint(run.ckpt_path)}")


def evaluate_and_keep_best(run):
    """Source-validation mIoU, printed; a new best is saved as best.pt (model selection never sees a target).
    A validation tile that cannot be read on any process saves ckpt.pt and stops every process."""
    faults = []
    run.raw_model.eval()
    with run.autocast:
        batches = until_fault(validation_batches(run.stream, run.cfg, run.rank, run.world), faults)
        scores = evaluate(run.raw_model, batches, run.device, run.world)
    set_train_mode(run.raw_model, run.trainable_backbone)
    if max_over_processes(len(faults)):
        stop_after_bad_validation_tile(run, faults)
    if run.master:
        print(f"iter {run.it:6d} | source val mIoU {100 * scores['miou']:.2f} | accuracy "
              f"{100 * scores['accuracy']:.2f} | mean F1 {100 * scores['mean_f1']:.2f}", flush=True)
    if not math.isnan(scores["miou"]) and scores["miou"] > run.best:
        run.best = scores["miou"]
        if run.master:
            save(run.best_path, model_state(run), run.ckpt_path)
    return scores["miou"]


def until_fault(batches, faults):
    """The batches, up to one that cannot be read (ValueError, OSError: a bad tile), whose error goes to the
    list `faults`: evaluation then still reaches its final all-reduce, so no process waits forever."""
    try:
        yield from batches
    except (OSError, ValueError) as e:
        faults.append(e)


def stop_after_bad_validation_tile(run, faults):
    """Save ckpt.pt (the step is complete: nothing is lost), then stop every process (exit status 2): those
    that met a bad tile with its one-line error, rank 0 otherwise with a pointer to it."""
    save_training_state(run)
    max_over_processes(0)          # no process exits (and has a launcher kill the others) before rank 0 has saved
    saved = f"the run is saved in {run.ckpt_path} (iter {run.it}): resume=True continues it"
    if faults:
        fail(f"{faults[0]}; {saved}")
    if run.master:
        fail(f"another process met a validation tile it cannot read (its own line names it); {saved}")
    sys.exit(2)


def log_progress(run, interval, lr, val_miou):
    """Print the means since the last log (losses, tiles/s, MFU on GPUs, the busiest expert's share per
    block, time left) on rank 0 and append them to the CSV log; then start a new interval (a collective)."""
    cfg, world = run.cfg, run.world
    if run.ddp:
        dist.all_reduce(interval.sums)
        dist.all_reduce(interval.load)
    if run.use_cuda:
        torch.cuda.synchronize()
    dt = time.time() - interval.t0
    loss_v, seg_v, bal_v, z_v = (interval.sums / (interval.steps * world)).tolist()
    tiles_per_s = interval.steps * run.global_batch / dt
    flops = run.flops_per_tile * run.global_batch * interval.steps
    mfu = flops / dt / (cfg["peak_flops"] * world) if run.use_cuda else float("nan")
    fraction = interval.load.float() / interval.load.sum(dim=1, keepdim=True).clamp_min(1)   # (L, E) token shares
    if run.master:
        busiest = " ".join(f"{f.max().item():.2f}" for f in fraction) if fraction.numel() else "-"
        left = (time.time() - run.started) / (run.it - run.start_iter) * (cfg["max_iters"] - run.it)
        print(f"iter {run.it:6d}/{cfg['max_iters']} | loss {loss_v:.4f} (seg {seg_v:.4f}, balance {bal_v:.3f}, "
              f"z {z_v:.2f}) | lr {lr:.2e} | {tiles_per_s:7.1f} tiles/s" + (f" | MFU {100 * mfu:.1f}%" if run.use_cuda
                                                                              else "")
              + f" | busiest expert per layer {busiest} | {left / 60:.1f} min left", flush=True)
    if run.csv_file:
        expert_load = ";".join(" ".join(f"{v:.4f}" for v in row) for row in fraction.tolist())
        csv.writer(run.csv_file).writerow([run.it, loss_v, seg_v, bal_v, z_v, lr, tiles_per_s, mfu, val_miou,
                                           expert_load])
        run.csv_file.flush()
    interval.reset()


# -----------------------------------------------------------------------------
# checkpoints


def random_state():
    """This process's random state: torch's CPU generator and its GPU's (drop path draws from them)."""
    return {"torch": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}


def restore_random_state(saved, rank, world, ckpt_path):
    """Each process takes back its own random state from a checkpoint's list of them (one per process).
    A checkpoint of an older version holds one (rank 0's); one of another number of processes cannot
    continue every stream, so each keeps its fresh seed (rank 0 says so)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != world:
        if rank == 0:
            print(f"note: {ckpt_path} holds the random state of {len(states)} process(es), this run has {world}: "
                  f"each process continues from seed + rank (drop path draws differ from an uninterrupted run)")
        return
    torch.set_rng_state(states[rank]["torch"])
    if torch.cuda.is_available() and states[rank]["cuda"]:
        torch.cuda.set_rng_state(states[rank]["cuda"][0])


def model_state(run):
    """What evaluation needs (best.pt): the model, its configuration, the run's config, where it stands."""
    return {"model": run.raw_model.state_dict(), "model_args": dataclasses.asdict(run.raw_model.cfg),
            "config": run.cfg, "iter_num": run.it, "best_val_miou": run.best}


def save_training_state(run):
    """Save ckpt.pt: everything to resume exactly, as plain data (loads with weights_only=True), with the
    random state of every process. A collective: every process calls it, rank 0 writes."""
    states = gather_from_processes(random_state())
    if run.master:
        state = {**model_state(run), "optimizer": run.optimizer.state_dict(), "rng": states}
        save(run.ckpt_path, state, run.ckpt_path, keep_previous=True)


def save(path, state, ckpt_path, keep_previous=False):
    """save_checkpoint, and say where it went. A save that fails (a full disk, a read-only folder) leaves
    the file it would have replaced as it was and stops the run with one line naming the checkpoint to
    resume from (ckpt_path)."""
    try:
        save_checkpoint(path, state, keep_previous=keep_previous)
    except OSError as e:
        fail(f"{e.strerror or e}; {last_good_checkpoint(ckpt_path)}")
    print(f"saved {path} (iter {state['iter_num']})", flush=True)


def last_good_checkpoint(ckpt_path):
    """Where a stopped run resumes from, in words: ckpt_path and its iteration, or that there is none."""
    if not os.path.isfile(ckpt_path):
        return "no checkpoint of this run was saved yet"
    try:
        it = load_checkpoint(ckpt_path, parts=("iter_num",))["iter_num"]
    except ValueError:
        return f"the last checkpoint {ckpt_path} cannot be read either"
    return f"the last good checkpoint {ckpt_path} (iter {it}) is intact: resume=True continues from it"


if __name__ == "__main__":
    main(sys.argv[1:])
