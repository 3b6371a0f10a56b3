"""
Checkpoints that are never silently wrong: one writer and one reader for train.py and eval.py.

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts), so it loads with
torch.load(weights_only=True): no pickled code runs when a file from elsewhere is opened.

    {"model": state_dict, "model_args": asdict(SARConfig), "config": train.py's config,
     "optimizer": state_dict, "iter_num": int, "best_val_miou": float,
     "rng": [{"torch": state, "cuda": [states]} per DDP rank], "checksums": {part: sha256 hex}}

Every top-level part gets a sha256 of its content, verified when that part is read, so a flipped byte
inside a tensor is an error, not a silently worse model. Saving writes a temporary file and renames it
(a kill at any moment leaves the old file or the new one), and keeps the file it replaces as
`<name>.prev.pt`, the one to fall back to if the newest is ever damaged. A save that fails (a full disk)
is an OSError of one line naming the file, and leaves the file it would have replaced as it was.
"""

import hashlib
import os

import torch

from nanosar.files import explain_os_error, remove_path, write_atomic


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or not a nanosar checkpoint."""


def previous_path(path):
    """ckpt.pt -> ckpt.prev.pt: the checkpoint that `path` replaced when it was last saved."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def _update(digest, value):
    """Feed a nested value (dicts, lists, tensors, numbers, strings) into a hash, deterministically."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for k, v in value.items():
            _update(digest, k)
            _update(digest, v)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for v in value:
            _update(digest, v)
    else:
        digest.update(f"{type(value).__name__}:{value!r}".encode())


def checksum(value):
    """sha256 hex digest of a nested checkpoint part."""
    digest = hashlib.sha256()
    _update(digest, value)
    return digest.hexdigest()


def save_checkpoint(path, state, keep_previous=False):
    """Write `state` (a dict of plain data) to `path` atomically, with a checksum per top-level part.

    With keep_previous the file being replaced stays as previous_path(path) (a hard link, no copy).
    Raises OSError with a one-line explanation (disk full, read-only folder); `path` is then unchanged.
    """
    state = {**state, "checksums": {part: checksum(value) for part, value in state.items()}}
    if keep_previous and os.path.isfile(path):
        link = f"{previous_path(path)}.tmp-{os.getpid()}"
        remove_path(link)
        try:
            os.link(path, link)               # the current file under a second name, then renamed: atomic
            os.replace(link, previous_path(path))
        except OSError as e:
            remove_path(link)
            raise OSError(e.errno, explain_os_error(e, previous_path(path))) from e
    write_atomic(path, lambda tmp: write_torch_file(state, tmp))


def write_torch_file(state, path):
    """torch.save(state) to `path` through a Python file, flushed to the disk. A full disk is then OSError
    ENOSPC from the write (torch's own file writer reports it as RuntimeError "unexpected pos"); a failure
    of torch's zip writer all the same becomes a one-line OSError."""
    try:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())              # on the disk before the rename makes it the checkpoint
    except RuntimeError as e:
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        reason = str(e).splitlines()[0]
        raise OSError(f"torch could not write it ({reason}): the disk is probably full; free some space and "
                      f"run again (nothing was replaced)") from e


def load_checkpoint(path, parts=None):
    """Read a checkpoint written by save_checkpoint, with weights_only=True and memory-mapped tensors.

    parts: the top-level keys wanted (e.g. ("model", "model_args")) or None for all; only those are
    read from disk and checked against their checksums. Raises CheckpointError naming the file and
    what to do for a missing, empty, truncated, corrupt or foreign file.
    """
    previous = previous_path(path)
    hint = f"; the previous checkpoint {previous} may be intact" if os.path.isfile(previous) else ""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes){hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, UnicodeDecodeError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}): truncated, corrupt or not a "
                              f"nanosar checkpoint{hint}") from None
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path} is not a nanosar checkpoint (no model / model_args); train.py writes them")
    checksums = state.get("checksums", {})
    wanted = list(state) if parts is None else list(parts)
    for part in wanted:
        if part == "checksums":
            continue
        if part not in state:
            raise CheckpointError(f"checkpoint {path} has no {part!r}")
        if part in checksums and checksum(state[part]) != checksums[part]:
            raise CheckpointError(f"checkpoint {path}: the checksum of {part!r} does not match: the file is "
                                  f"corrupt{hint}")
    return {part: state[part] for part in wanted if part != "checksums"}


ARCHITECTURE_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "n_experts", "top_k", "descriptor_dim",
                     "descriptors", "patch_size", "in_chans", "num_register_tokens")
OLDER_DEFAULTS = {"descriptors": "paper"}   # keys that checkpoints of earlier versions lack, with their meaning


def check_same_architecture(model_args, ours, path):
    """CheckpointError unless the checkpoint's model_args (dict) have the architecture of `ours` (dict of
    SARConfig fields): widths, depth, experts, router input, patch, channels, registers."""
    theirs = {**OLDER_DEFAULTS, **model_args}
    diff = {k: (theirs.get(k), ours[k]) for k in ARCHITECTURE_KEYS if theirs.get(k) != ours[k]}
    if diff:
        differences = ", ".join(f"{k}={a} (here {b})" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} is from another model: {differences}")
