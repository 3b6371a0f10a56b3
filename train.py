"""
Train the physics-guided MoE segmenter, in the spirit of nanoGPT's train.py: the configuration is the
plain variables below, overridden by config files and then by --key=value (type-checked; unknown keys
are errors), and saved with every checkpoint.

    python train.py --data=data/synth/N-G3-HH-db --preset=tiny --phase=cpt       # one process, CPU or GPU
    torchrun --standalone --nproc_per_node=8 train.py config/cpt_large.py          # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 train.py config/cpt_large.py              # 2 nodes (node_rank=1 on the other)

Two phases, as in the paper: "cpt" trains backbone and head (continued pre-training on a mix of
prepared datasets, from scratch or upcycled from a local DINOv2 checkpoint); "dg" freezes the backbone
(taken from an earlier run's checkpoint) and trains only the head on one source domain, evaluating
on held-out source tiles (model selection never sees a target domain).
"""

import ast
import builtins
import contextlib
import csv
import io
import math
import os
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosar.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanosar.data import Split, load_batch
from nanosar.files import RunLock, RunLockedError, remove_stale_temporaries, write_text_atomic
from nanosar.metrics import confusion_matrix, segmentation_scores
from nanosar.model import SARConfig, Segmenter, balance_loss_over_blocks, upcycle_from_dinov2

# -----------------------------------------------------------------------------
# configuration: plain variables, overridden by config files and --key=value
out_dir = "out/train"
data = "data/synth/N-G3-HH-db"  # prepared domain folder(s) holding <train_split>/; comma-separated to mix
train_split = "train"
val_fraction = 0.1          # last fraction of each domain's training tiles, held out as source validation
phase = "cpt"               # "cpt": train backbone + head; "dg": frozen backbone, train the head only
init = "scratch"            # "scratch", "dinov2:PATH" (upcycle a local DINOv2 file), "ckpt:PATH" (a run's backbone)
preset = "tiny"             # tiny, small, base, large (nanosar/model.py)
n_experts = 6
top_k = 1
descriptors = True          # physics router on [token || descriptors]; False = router on tokens only
drop_path_rate = 0.0
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
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def fail(message):
    """Stop with a clear message (exit status 2), before anything expensive starts."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_config(argv, config):
    """Apply config files (python files of plain assignments) and --key=value overrides to config (a dict)."""

    def assign(key, value, where):
        if key not in config:
            fail(f"{where}: unknown config key {key!r}; known keys: {', '.join(sorted(config))}")
        expected = type(config[key])
        if expected is float and type(value) is int:
            value = float(value)
        if type(value) is not expected:
            fail(f"{where}: {key} must be a {expected.__name__}, got {value!r}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                fail(f"{arg}: overrides are written --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text                                    # a bare string
            assign(key, value, arg)
        else:
            if not os.path.isfile(arg):
                fail(f"config file {arg} not found")
            values = {}
            try:
                exec(builtins.compile(open(arg).read(), arg, "exec"), {}, values)  # `compile` is a config key
            except Exception as e:  # a config file is Python: any error in it is the user's to fix
                fail(f"config file {arg}: {type(e).__name__}: {e}")
            for key, value in values.items():
                assign(key, value, arg)
    return config


def validate_config(cfg):
    """Stop at start (exit 2) on a value that would otherwise train nothing, or train on NaN."""
    choices = dict(phase=("cpt", "dg"), schedule=("cosine", "poly", "constant"), device=("auto", "cpu", "cuda"),
                   dtype=("float32", "bfloat16", "float16"))
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            fail(f"{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    at_least = dict(batch_size=1, grad_accum=1, max_iters=1, log_interval=1, eval_tiles=1, n_experts=1, top_k=1,
                    warmup_iters=0, lr_decay_iters=0, eval_interval=0, ckpt_interval=0)
    for key, low in at_least.items():
        if cfg[key] < low:
            fail(f"{key} must be >= {low}, got {cfg[key]}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
        if not (math.isfinite(cfg[key]) and cfg[key] >= 0):
            fail(f"{key} must be a finite number >= 0, got {cfg[key]}")
    if cfg["learning_rate"] == 0:
        fail("learning_rate must be > 0")
    for key in ("val_fraction", "beta1", "beta2", "drop_path_rate"):
        if not 0 <= cfg[key] < 1:
            fail(f"{key} must be in [0, 1), got {cfg[key]}")
    if cfg["phase"] == "dg" and not cfg["init"].startswith("ckpt:"):
        fail("phase=dg freezes the backbone, so it needs init=ckpt:PATH (a pre-trained run)")
    if not (cfg["init"] == "scratch" or cfg["init"].startswith(("dinov2:", "ckpt:"))):
        fail(f"init must be scratch, dinov2:PATH or ckpt:PATH, got {cfg['init']!r}")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        fail("device=cuda but no CUDA GPU is visible to this process (use device=cpu or auto)")


# -----------------------------------------------------------------------------
# data: a deterministic stream of tiles, so that resuming and DDP see exactly the same batches


class TileStream:
    """The training tiles of one or more splits as one index space, read in a fresh permutation per
    epoch. Position p of the stream is tile perm_{p // n}[p % n]: any batch is a function of
    (seed, position) alone, which makes resume and the DDP/single-process equivalence exact."""

    def __init__(self, splits, val_fraction, seed):
        self.splits, self.seed = splits, seed
        self.train, self.val = [], []  # (split index, tile index)
        for s, split in enumerate(splits):
            n_val = int(len(split) * val_fraction)
            self.train += [(s, i) for i in range(len(split) - n_val)]
            self.val += [(s, i) for i in range(len(split) - n_val, len(split))]
        if not self.train:
            fail(f"no training tiles in {[sp.path for sp in splits]}")
        self._perm_epoch, self._perm = None, None

    def tiles_at(self, start, count):
        """(split, tile) pairs at stream positions start .. start + count - 1."""
        out, n = [], len(self.train)
        for p in range(start, start + count):
            epoch = p // n
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
                self._perm_epoch = epoch
            out.append(self.train[self._perm[p % n]])
        return out

    def batch(self, start, count, augment):
        """Images (B, C, H, W) float32 and labels (B, H, W) int64 at stream positions start...; flips and
        90-degree rotations are drawn per position, so they too are reproducible."""
        images, labels = read_tiles(self.splits, self.tiles_at(start, count))
        if augment:
            for b in range(count):
                k = int(np.random.default_rng([self.seed, start + b, 7]).integers(8))
                images[b], labels[b] = dihedral(images[b], k), dihedral(labels[b], k)
        return images, labels


def read_tiles(splits, pairs):
    """(split, tile) pairs -> images (B, C, H, W) float32, labels (B, H, W) int64, in the pairs' order;
    one batched read per split."""
    images = torch.empty(len(pairs), *splits[0].images.shape[1:])
    labels = torch.empty(len(pairs), *splits[0].labels.shape[1:], dtype=torch.long)
    for s, split in enumerate(splits):
        where = [b for b, (t, _) in enumerate(pairs) if t == s]
        if where:
            images[where], labels[where] = load_batch(split, [pairs[b][1] for b in where])
    return images, labels


def dihedral(x, k):
    """One of the 8 flips/rotations of the square, on the last two dims."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def open_splits(folders, split_name):
    splits = []
    for folder in folders:
        path = os.path.join(folder, split_name)
        if not os.path.isdir(folder):
            fail(f"data folder {folder} does not exist (prepare it first: python prepare.py synthetic --out ...)")
        try:
            splits.append(Split(path))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    first = splits[0].meta
    for sp in splits[1:]:
        for key in ("unit", "channels", "class_names", "tile_shape"):
            if sp.meta[key] != first[key]:
                fail(f"{sp.path} has {key}={sp.meta[key]} but {splits[0].path} has {first[key]}: "
                     f"mixed datasets must share units, channels, classes and tile size")
    return splits


def channel_statistics(splits, max_tiles=256):
    """Per-channel mean and std of the training pixels (in the data's unit): the model's input normalisation."""
    images = np.concatenate([np.asarray(sp.images[: max_tiles // len(splits)], np.float64) for sp in splits])
    mean = images.mean(axis=(0, 2, 3))
    std = images.std(axis=(0, 2, 3))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-6)) for s in std)


# -----------------------------------------------------------------------------
# optimisation


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
    no_decay_names = ("pos_embed", "cls_token", "register_tokens")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(no_decay_names) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def flops_per_tile(model, trainable_backbone):
    """Approximate training FLOPs per tile: 6 x active parameters x tokens (2x forward-only for a frozen
    backbone) plus attention scores, for the MFU estimate."""
    cfg = model.cfg
    tokens = 1 + cfg.num_register_tokens + (cfg.img_size // cfg.patch_size) ** 2
    counts = model.parameter_counts()
    backbone = (6 if trainable_backbone else 2) * counts["backbone_active"] * tokens
    attention = (3 if trainable_backbone else 1) * 4 * cfg.depth * cfg.embed_dim * tokens**2
    return backbone + attention + 6 * counts["head"] * tokens


# -----------------------------------------------------------------------------
# evaluation and checkpoints


@torch.no_grad()
def evaluate(model, stream, cfg, rank, world, device, autocast):
    """mIoU, accuracy and mean F1 on the held-out source tiles; each rank takes every world-th tile and
    the int64 confusion matrices are summed across ranks."""
    pairs = stream.val[: cfg["eval_tiles"]][rank::world]
    K = model.cfg.num_classes
    cm = torch.zeros(K, K, dtype=torch.long, device=device)
    model.eval()
    for b in range(0, len(pairs), cfg["batch_size"]):
        images, labels = read_tiles(stream.splits, pairs[b:b + cfg["batch_size"]])
        with autocast:
            logits = model(images.to(device)).logits
        cm += confusion_matrix(logits.argmax(1), labels.to(device), K)
    if world > 1:
        dist.all_reduce(cm)
    return segmentation_scores(cm)


def set_train_mode(model, trainable_backbone):
    """Training mode, except for a frozen backbone, which stays in eval mode (no drop path)."""
    model.train()
    if not trainable_backbone:
        model.backbone.eval()


def training_state(model, optimizer, it, cfg, best):
    """Everything to resume exactly, as plain data (loads with weights_only=True)."""
    return {
        "model": model.state_dict(),
        "model_args": asdict(model.cfg),
        "config": cfg,
        "optimizer": optimizer.state_dict(),
        "iter_num": it,
        "best_val_miou": best,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def save_or_fail(path, state, keep_previous=False):
    """save_checkpoint, turning a full disk or a read-only folder into a one-line error (exit 2)."""
    try:
        save_checkpoint(path, state, keep_previous=keep_previous)
    except OSError as e:
        fail(f"cannot save the checkpoint: {e.strerror or e}")
    print(f"saved {path} (iter {state['iter_num']})", flush=True)


def read_checkpoint(path, parts=None):
    """load_checkpoint, turning a missing or damaged file into a one-line error (exit 2)."""
    try:
        return load_checkpoint(path, parts)
    except CheckpointError as e:
        fail(str(e))


def truncate_csv_log(path, last_iter):
    """Drop the rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_iter]
    text = io.StringIO()
    csv.writer(text).writerows(kept)
    write_text_atomic(path, text.getvalue())


def model_config_from(cfg, splits):
    """SARConfig for the preset and the data's input contract (channels, unit, classes, tile size)."""
    meta = splits[0].meta
    mean, std = channel_statistics(splits)
    try:
        return SARConfig.preset(
            cfg["preset"], img_size=meta["tile_shape"][1], in_chans=len(meta["channels"]), input_unit=meta["unit"],
            channels=tuple(meta["channels"]), pixel_mean=mean, pixel_std=std, num_classes=len(meta["class_names"]),
            class_names=tuple(meta["class_names"]),
            n_experts=cfg["n_experts"], top_k=cfg["top_k"], descriptor_dim=3 if cfg["descriptors"] else 0,
            drop_path_rate=cfg["drop_path_rate"])
    except ValueError as e:
        fail(str(e))


def check_same_architecture(model_args, model_cfg, path):
    """A checkpoint must come from the same preset (widths, depth, experts, patch, channels)."""
    keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "n_experts", "top_k", "descriptor_dim", "patch_size",
            "in_chans", "num_register_tokens")
    ours = asdict(model_cfg)
    diff = {k: (model_args.get(k), ours[k]) for k in keys if model_args.get(k) != ours[k]}
    if diff:
        differences = ", ".join(f"{k}={a} (here {b})" for k, (a, b) in diff.items())
        fail(f"checkpoint {path} is from another model: {differences}")


# -----------------------------------------------------------------------------


def main(argv):
    cfg = parse_config(argv, {k: globals()[k] for k in config_keys})
    validate_config(cfg)

    # distributed set-up from torchrun's environment (one process per GPU, or gloo processes on the CPU)
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    master = rank == 0
    torch.manual_seed(cfg["seed"] + rank)
    use_amp = use_cuda and cfg["dtype"] != "float32"
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg["dtype"])) if use_amp else contextlib.nullcontext()

    # data, then the run folder: one writer at a time, debris of killed runs removed
    splits = open_splits([d for d in cfg["data"].split(",") if d], cfg["train_split"])
    stream = TileStream(splits, cfg["val_fraction"], cfg["seed"])
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    best_path = os.path.join(cfg["out_dir"], "best.pt")
    if master:
        try:
            lock = RunLock(cfg["out_dir"]).acquire()          # released by the OS when this process ends
        except (RunLockedError, OSError) as e:
            fail(str(e))
        removed = remove_stale_temporaries(cfg["out_dir"])
        if removed:
            print(f"removed {len(removed)} temporary file(s) of killed runs from {cfg['out_dir']}")

    # model
    resume_state = None
    if cfg["resume"] and os.path.isfile(ckpt_path):
        resume_state = read_checkpoint(ckpt_path)
    elif cfg["resume"] and master:
        print(f"resume=True but {ckpt_path} does not exist yet: starting a fresh run")
    if resume_state is not None:
        model_cfg = SARConfig(**resume_state["model_args"])
        check_same_architecture(resume_state["model_args"], model_config_from(cfg, splits), ckpt_path)
    else:
        model_cfg = model_config_from(cfg, splits)
    model = Segmenter(model_cfg)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    elif cfg["init"].startswith("dinov2:"):
        path = cfg["init"][len("dinov2:"):]
        if not os.path.isfile(path):
            fail(f"DINOv2 checkpoint {path} not found (download it once, then pass its local path)")
        report = upcycle_from_dinov2(model, torch.load(path, map_location="cpu", weights_only=True))
        if master:
            print(report)
    elif cfg["init"].startswith("ckpt:"):
        path = cfg["init"][len("ckpt:"):]
        source = read_checkpoint(path, parts=("model", "model_args"))
        check_same_architecture(source["model_args"], model_cfg, path)
        # the backbone keeps the input normalisation it was trained with
        model_cfg = replace(model_cfg, pixel_mean=tuple(source["model_args"]["pixel_mean"]),
                            pixel_std=tuple(source["model_args"]["pixel_std"]))
        model = Segmenter(model_cfg)
        backbone = {k[len("backbone."):]: v for k, v in source["model"].items() if k.startswith("backbone.")}
        model.backbone.load_state_dict(backbone)
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
        torch.set_rng_state(resume_state["rng"]["torch"])
        if use_cuda and resume_state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resume_state["rng"]["cuda"])
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if use_cuda else None)
    if master:
        counts = raw_model.parameter_counts()
        print(f"model {cfg['preset']}: {counts['backbone_total'] / 1e6:.2f}M backbone "
              f"({counts['backbone_active'] / 1e6:.2f}M "
              f"active), {counts['head'] / 1e6:.2f}M head; phase {cfg['phase']}, {len(stream.train)} train / "
              f"{len(stream.val)} val tiles, {world} process(es) on {device.type}")
    csv_file = None
    if master and cfg["csv_log"]:
        new = resume_state is None or not os.path.exists(cfg["csv_log"])
        if not new:
            truncate_csv_log(cfg["csv_log"], start_iter)
        csv_file = open(cfg["csv_log"], "w" if new else "a", newline="")
        writer = csv.writer(csv_file)
        if new:
            writer.writerow(["iter", "loss", "seg_loss", "balance_loss", "z_loss", "lr", "tiles_per_s", "mfu",
                             "val_miou", "expert_load"])

    # training loop
    B, A = cfg["batch_size"], cfg["grad_accum"]
    global_batch = B * A * world
    flops = flops_per_tile(raw_model, trainable_backbone) * global_batch
    moe = model_cfg.n_experts > 1
    load_shape = (model_cfg.depth, model_cfg.n_experts) if moe else (0, 1)   # tokens per expert, per MoE block
    load = torch.zeros(load_shape, dtype=torch.long, device=device)
    sums = torch.zeros(4, device=device)                       # loss, seg, balance, z over the log interval
    non_finite = torch.zeros((), dtype=torch.long, device=device)  # steps whose loss was NaN or inf
    t0, steps_in_interval = time.time(), 0
    run_t0, it = time.time(), start_iter

    def stop_if_non_finite():
        """All ranks agree (one all-reduce) and stop before a NaN model can be evaluated or saved."""
        if ddp:
            dist.all_reduce(non_finite)
        if non_finite.item():
            fail(f"the loss became NaN or infinite by iter {it} (learning rate {lr:.3g}); stopped without saving, "
                 f"the last good checkpoint is {ckpt_path}" + ("" if os.path.isfile(ckpt_path) else " (none yet)"))

    while it < cfg["max_iters"]:
        lr = learning_rate_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(A):
            start = it * global_batch + (micro * world + rank) * B   # this process's slice of the global batch
            images, labels = stream.batch(start, B, cfg["augment"])
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            sync = contextlib.nullcontext() if not ddp or micro == A - 1 else model.no_sync()
            with sync:
                with autocast:
                    out = model(images)
                    # sum over pixels / all pixels: every process weighs its tiles alike, so DDP's mean of
                    # gradients equals the gradient of the global batch
                    seg = F.cross_entropy(out.logits.float(), labels, ignore_index=255, reduction="sum")
                    seg = seg / labels.numel()
                    balance = out.balance_loss
                    if ddp and moe:  # the balance loss sees the global batch's routing: one all-reduce per step
                        global_load = out.expert_load.clone()
                        dist.all_reduce(global_load)
                        balance = balance_loss_over_blocks(global_load, out.router_prob)
                    aux = model_cfg.balance_loss_weight * balance + model_cfg.router_z_loss_weight * out.z_loss
                    loss = seg + (aux if trainable_backbone else 0.0)
                (loss / A).backward()
            non_finite += (~torch.isfinite(loss.detach())).long()
            sums += torch.stack([loss.detach(), seg.detach(), balance.detach(), out.z_loss.detach()]) / A
            load += out.expert_load
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        steps_in_interval += 1

        last = it == cfg["max_iters"]
        evaluate_now = (cfg["eval_interval"] and it % cfg["eval_interval"] == 0) or last
        save_now = (cfg["ckpt_interval"] and it % cfg["ckpt_interval"] == 0) or last
        if it % cfg["log_interval"] == 0 or evaluate_now or save_now:
            stop_if_non_finite()
        val_miou = ""
        if evaluate_now:
            scores = evaluate(raw_model, stream, cfg, rank, world, device, autocast)
            set_train_mode(raw_model, trainable_backbone)
            val_miou = scores["miou"]
            if master:
                print(f"iter {it:6d} | source val mIoU {100 * val_miou:.2f} | accuracy {100 * scores['accuracy']:.2f}"
                      f" | mean F1 {100 * scores['mean_f1']:.2f}", flush=True)
            if not math.isnan(val_miou) and val_miou > best:  # model selection on held-out source tiles only
                best = val_miou
                if master:
                    state = training_state(raw_model, optimizer, it, cfg, best)
                    del state["optimizer"], state["rng"]             # best.pt is for evaluation, not resuming
                    save_or_fail(best_path, state)
        if it % cfg["log_interval"] == 0 or last:
            if ddp:
                dist.all_reduce(sums)
                dist.all_reduce(load)
            if use_cuda:
                torch.cuda.synchronize()
            dt = time.time() - t0
            loss_v, seg_v, bal_v, z_v = (sums / (steps_in_interval * world)).tolist()
            tiles_per_s = steps_in_interval * global_batch / dt
            mfu = flops * steps_in_interval / dt / (cfg["peak_flops"] * world) if use_cuda else float("nan")
            fraction = load.float() / load.sum(dim=1, keepdim=True).clamp_min(1)   # (L, E) share of tokens
            if master:
                busiest = " ".join(f"{f.max().item():.2f}" for f in fraction) if fraction.numel() else "-"
                left = (time.time() - run_t0) / (it - start_iter) * (cfg["max_iters"] - it)
                print(f"iter {it:6d}/{cfg['max_iters']} | loss {loss_v:.4f} (seg {seg_v:.4f}, balance {bal_v:.3f}, "
                      f"z {z_v:.2f}) | lr {lr:.2e} | {tiles_per_s:7.1f} tiles/s"
                      + (f" | MFU {100 * mfu:.1f}%" if use_cuda else "")
                      + f" | busiest expert per layer {busiest} | {left / 60:.1f} min left", flush=True)
            if csv_file:
                writer.writerow([it, loss_v, seg_v, bal_v, z_v, lr, tiles_per_s, mfu, val_miou,
                                 ";".join(" ".join(f"{v:.4f}" for v in row) for row in fraction.tolist())])
                csv_file.flush()
            sums.zero_()
            load.zero_()
            t0, steps_in_interval = time.time(), 0
        if master and save_now:
            save_or_fail(ckpt_path, training_state(raw_model, optimizer, it, cfg, best), keep_previous=True)
    if csv_file:
        csv_file.close()
    if master:
        print(f"done: {ckpt_path} (last, iter {it})" + (f", {best_path} (best source val mIoU {100 * best:.2f})"
                                                          if best >= 0 else ""))
        lock.release()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
