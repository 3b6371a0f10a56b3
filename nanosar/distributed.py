"""
The DDP set-up of train.py and eval.py, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK):
one process per GPU with NCCL, or gloo processes on CPUs; a plain single process without torchrun.
"""

import os

import torch
import torch.distributed as dist


def init_distributed(device="auto"):
    """device: "auto", "cpu" or "cuda" -> (rank, world, torch.device). Starts the process group under
    torchrun; each process takes its LOCAL_RANK's GPU."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world, local_rank = 0, 1, 0
    if int(os.environ.get("RANK", -1)) != -1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def close_distributed():
    """End the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
