"""
The DDP set-up of train.py and eval.py, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK):
one process per GPU with NCCL (and gloo for small CPU values, which then need no GPU sync), or gloo
processes on CPUs; a plain single process without torchrun. And the stop signals of a scheduler
(SIGTERM, SIGUSR1), noted so that every process stops at the same step.
"""

import os
import signal

import torch
import torch.distributed as dist


def init_distributed(device="auto"):
    """device: "auto", "cpu" or "cuda" -> (rank, world, torch.device). Starts the process group under
    torchrun; each process takes its LOCAL_RANK's GPU."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world, local_rank = 0, 1, 0
    if int(os.environ.get("RANK", -1)) != -1:
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def close_distributed():
    """End the process group, if one was started."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed():
    """True when a process group is running (torchrun)."""
    return dist.is_available() and dist.is_initialized()


def max_over_processes(value):
    """The largest of an int given by every process (a CPU all-reduce: no GPU sync); `value` alone
    without a process group. Every process must call it at the same point."""
    if not is_distributed():
        return value
    t = torch.tensor(value, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def wait_for_every_process():
    """A barrier when a process group is running: the end of a run, so that no process destroys the group
    (and exits) while another still finishes a collective (gloo then aborts the late one)."""
    if is_distributed():
        dist.barrier()


def gather_from_processes(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects, e.g. RNG states); [obj]
    without a process group. Every process must call it at the same point."""
    if not is_distributed():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


class StopSignals:
    """SIGTERM and SIGUSR1 (a scheduler's notice of preemption: SLURM's --signal, a spot instance) noted
    instead of ending the process, so that the training loop can finish its step, save and exit 0.

        with StopSignals() as signals:
            ...
            if signals.agreed():   # every process, once per step: a signal seen by any stops them all
                save(); break

    The previous handlers are back when the block ends. Handlers can only be set in the main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = 0                                 # the number of the last signal noted, 0 = none
        self.previous = {}

    def note(self, signum, frame):
        self.received = signum

    def agreed(self):
        """The signal (signal.Signals) that stops every process at this step, or None; a collective."""
        signum = max_over_processes(self.received)
        return signal.Signals(signum) if signum else None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
