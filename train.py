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
from nanosar.distributed import close_distributed, init_distributed
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


def training_state(model, optimizer, it, cfg, best):
    """Everything to resume exactly, as plain data (loads with weights_only=True)."""
    return {"model": model.state_dict(), "model_args": dataclasses.asdict(model.cfg), "config": cfg,
            "optimizer": optimizer.state_dict(), "iter_num": it, "best_val_miou": best,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def save(path, state, keep_previous=False):
    """save_checkpoint (a full disk or a read-only folder: a one-line error), and say where it went."""
    or_fail(save_checkpoint, path, state, keep_previous=keep_previous)
    print(f"saved {path} (iter {state['iter_num']})", flush=True)


# -----------------------------------------------------------------------------


def main(argv):
    if {"-h", "--help"} & set(argv):
        return print_help()
    config, given = parse_config(argv, {**{k: globals()[k] for k in TRAIN_KEYS}, **MODEL_DEFAULTS}, fail)
    cfg = {k: config[k] for k in TRAIN_KEYS}
    model_overrides = {k: config[k] for k in MODEL_DEFAULTS if k in given}     # the rest: the preset's
    validate_config(cfg)
    cfg["model"] = model_overrides                            # saved with the checkpoints
    rank, world, device = init_distributed(cfg["device"])
    ddp, master, use_cuda = world > 1 or dist.is_initialized(), rank == 0, device.type == "cuda"
    torch.manual_seed(cfg["seed"] + rank)
    use_amp = use_cuda and cfg["dtype"] != "float32"
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg["dtype"])) if use_amp else contextlib.nullcontext()

    # data, then the run folder: one writer at a time, debris of killed runs removed
    splits = or_fail(open_splits, [d for d in cfg["data"].split(",") if d], cfg["train_split"])
    stream = or_fail(TileStream, splits, cfg["val_fraction"], cfg["seed"])
    ckpt_path, best_path = os.path.join(cfg["out_dir"], "ckpt.pt"), os.path.join(cfg["out_dir"], "best.pt")
    if master:
        lock = or_fail(RunLock(cfg["out_dir"]).acquire)      # released by the OS when this process ends
        for name in remove_stale_temporaries(cfg["out_dir"]):
            print(f"removed {name}, a temporary file of a killed run")
    resume_state = or_fail(load_checkpoint, ckpt_path) if cfg["resume"] and os.path.isfile(ckpt_path) else None
    if cfg["resume"] and resume_state is None and master:
        print(f"resume=True but {ckpt_path} does not exist yet: starting a fresh run")

    # model and optimizer
    model = build_model(cfg, model_overrides, splits, resume_state, master)
    model_cfg, trainable_backbone = model.cfg, cfg["phase"] == "cpt"
    model.backbone.requires_grad_(trainable_backbone)
    model.backbone.grad_checkpointing = cfg["act_ckpt"]
    model.to(device)
    set_train_mode(model, trainable_backbone)
    optimizer = make_optimizer(model, cfg, fused=use_cuda)
    start_iter, best = 0, -1.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        start_iter, best, rng = resume_state["iter_num"], resume_state["best_val_miou"], resume_state["rng"]
        torch.set_rng_state(rng["torch"])
        if use_cuda and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index] if use_cuda else None)
    if master:
        counts = raw_model.parameter_counts()
        print(f"model {cfg['preset']}: {counts['backbone_total'] / 1e6:.2f}M backbone "
              f"({counts['backbone_active'] / 1e6:.2f}M active), {counts['head'] / 1e6:.2f}M head; phase "
              f"{cfg['phase']}, {len(stream.train)} train / {len(stream.val)} val tiles, {world} process(es) on "
              f"{device.type}")
    columns = ["iter", "loss", "seg_loss", "balance_loss", "z_loss", "lr", "tiles_per_s", "mfu", "val_miou",
               "expert_load"]
    csv_file = (open_csv_log(cfg["csv_log"], columns, start_iter if resume_state is not None else None)
                if master and cfg["csv_log"] else None)

    # training loop
    B, A = cfg["batch_size"], cfg["grad_accum"]
    global_batch = B * A * world
    flops = raw_model.flops_per_tile(trainable_backbone) * global_batch
    moe = model_cfg.n_experts > 1
    load = torch.zeros((model_cfg.depth, model_cfg.n_experts) if moe else (0, 1), dtype=torch.long, device=device)
    sums = torch.zeros(4, device=device)                       # loss, seg, balance, z over the log interval
    non_finite = torch.zeros((), dtype=torch.long, device=device)  # steps whose loss was NaN or inf
    t0, run_t0, steps_in_interval, it = time.time(), time.time(), 0, start_iter
    while it < cfg["max_iters"]:
        lr = learning_rate_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(A):
            start = it * global_batch + (micro * world + rank) * B   # this process's slice of the global batch
            images, labels = (t.to(device, non_blocking=True) for t in stream.batch(start, B, cfg["augment"]))
            with contextlib.nullcontext() if not ddp or micro == A - 1 else model.no_sync():
                with autocast:
                    out = model(images)
                    # sum over pixels / all pixels: every process weighs its tiles alike, so DDP's mean of
                    # gradients equals the gradient of the global batch
                    seg = F.cross_entropy(out.logits.float(), labels, ignore_index=255, reduction="sum")
                    seg = seg / labels.numel()
                    balance = out.balance_loss
                    if ddp and moe:  # the balance loss of the global batch's routing: one all-reduce per step
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
        log_now = it % cfg["log_interval"] == 0 or last
        if log_now or evaluate_now or save_now:   # all ranks agree, and stop before a NaN model is used
            if ddp:
                dist.all_reduce(non_finite)
            if non_finite.item():
                fail(f"the loss became NaN or infinite by iter {it} (learning rate {lr:.3g}); stopped without "
                     f"saving; the last good checkpoint is {ckpt_path if os.path.isfile(ckpt_path) else 'none'}")
        val_miou = ""
        if evaluate_now:
            raw_model.eval()
            with autocast:
                scores = evaluate(raw_model, validation_batches(stream, cfg, rank, world), device, world)
            set_train_mode(raw_model, trainable_backbone)
            val_miou = scores["miou"]
            if master:
                print(f"iter {it:6d} | source val mIoU {100 * val_miou:.2f} | accuracy {100 * scores['accuracy']:.2f}"
                      f" | mean F1 {100 * scores['mean_f1']:.2f}", flush=True)
            if not math.isnan(val_miou) and val_miou > best:  # model selection on held-out source tiles only
                best = val_miou
                if master:   # best.pt is for evaluation: no optimizer, no RNG
                    state = training_state(raw_model, optimizer, it, cfg, best)
                    save(best_path, {k: v for k, v in state.items() if k not in ("optimizer", "rng")})
        if log_now:
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
                csv.writer(csv_file).writerow([it, loss_v, seg_v, bal_v, z_v, lr, tiles_per_s, mfu, val_miou, ";".join(
                    " ".join(f"{v:.4f}" for v in row) for row in fraction.tolist())])
                csv_file.flush()
            sums.zero_()
            load.zero_()
            t0, steps_in_interval = time.time(), 0
        if master and save_now:
            save(ckpt_path, training_state(raw_model, optimizer, it, cfg, best), keep_previous=True)
    if master:
        print(f"done: {ckpt_path} (last, iter {it})" + (f", {best_path} (best source val mIoU {100 * best:.2f})"
                                                          if best >= 0 else ""))
        lock.release()
        if csv_file:
            csv_file.close()
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
