"""
Files that survive faults: atomic writes, debris of killed processes, one writer per run folder.

    write_atomic(path, lambda tmp: torch.save(obj, tmp))   # tmp file, then rename; nothing half-written
    remove_stale_temporaries(folder)                         # *.tmp-PID of processes that are gone
    replace_folder(tmp, path)                                # a finished folder into place, old one aside
    restore_stale_backups(folder)                            # *.old-PID of a run killed mid-replace put back
    with RunLock(out_dir): ...                               # a second writer of out_dir gets a clear error

Every temporary is named `<final name>.tmp-<pid>` and every backup `<final name>.old-<pid>`, so the
process that owns it is known and the debris of a dead process (kill -9, power loss) can be recognised
and cleaned up at the next start. Process ids are only meaningful on one machine: two machines writing
into one shared folder would see each other's temporaries as stale.
"""

import csv
import ctypes
import errno
import fcntl
import io
import os
import re
import shutil

TMP_PATTERN = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>\d+)$")
OLD_PATTERN = re.compile(r"^(?P<name>.+)\.old-(?P<pid>\d+)$")


def temporary_name(path):
    """The temporary name of `path` for this process: `<path>.tmp-<pid>`."""
    return f"{path}.tmp-{os.getpid()}"


def backup_name(path):
    """The name `path` is moved to while this process replaces it: `<path>.old-<pid>`."""
    return f"{path}.old-{os.getpid()}"


def pid_alive(pid):
    """True if a process with this id runs on this machine (it may belong to another user). A zombie
    (exited, not yet reaped by its parent: common for orphans in containers) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"    # state follows "(command name)"
    except (OSError, IndexError):
        return True                                                 # no /proc (macOS): trust kill(0)


def remove_path(path):
    """Remove a file or a folder tree; no error if it is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def leftovers_of_dead_processes(folder, pattern, name=None):
    """(entry, match) for the entries of `folder` named by `pattern` (TMP_PATTERN, OLD_PATTERN) whose
    process is dead, or is this one (which has none in use when it asks); only `<name>.*` when given."""
    if not os.path.isdir(folder):
        return
    for entry in sorted(os.listdir(folder)):
        match = pattern.match(entry)
        if match is None or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not pid_alive(pid):
            yield entry, match


def remove_stale_temporaries(folder, name=None):
    """Remove `*.tmp-PID` files and folders in `folder` whose process is dead (or is this process, which
    has none open yet when it calls this); only `<name>.tmp-PID` when `name` is given (for a folder shared
    with other data). Returns the removed names."""
    removed = []
    for entry, _ in leftovers_of_dead_processes(folder, TMP_PATTERN, name):
        remove_path(os.path.join(folder, entry))
        removed.append(entry)
    return removed


def replace_folder(tmp, path):
    """Move the finished folder `tmp` to `path`. An existing `path` is first moved aside to
    backup_name(path) and removed once the new one is in place; if moving the new one in fails, the old
    one is put back. A kill between the two renames leaves only the backup, which
    restore_stale_backups puts back at the next start."""
    old = backup_name(path)
    remove_path(old)                      # a stale backup of an earlier process with this pid (containers)
    had_old = os.path.exists(path)
    if had_old:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if had_old:
            os.replace(old, path)
        raise
    if had_old:
        remove_path(old)


def restore_stale_backups(folder, name=None):
    """Deal with `*.old-PID` backups (replace_folder) of dead processes (or of this process, which is not
    replacing anything when it calls this) in `folder`: put one back under its name if nothing took that
    name (the process died between its two renames), else remove it; only `<name>.old-PID` when `name`
    is given. Returns the names acted on."""
    done = []
    for entry, match in leftovers_of_dead_processes(folder, OLD_PATTERN, name):
        backup, final = os.path.join(folder, entry), os.path.join(folder, match["name"])
        if os.path.exists(final):
            remove_path(backup)
        else:
            os.replace(backup, final)
        done.append(entry)
    return done


def explain_os_error(error, path):
    """A one-line explanation of an OSError met while writing `path` (disk full, read-only, ...)."""
    if error.errno == errno.ENOSPC:
        return f"{path}: no space left on the device; free some space and run again (nothing was replaced)"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{path}: cannot write there ({os.strerror(error.errno)}); choose another output folder"
    if error.errno == errno.EISDIR:
        return f"{path} is a directory; give a file name"
    return f"{path}: {os.strerror(error.errno) if error.errno else error}"


def write_atomic(path, write):
    """Call write(tmp) to fill the temporary `path.tmp-PID`, then rename it to `path` (atomic on POSIX).

    On any failure (disk full, an exception in write) the temporary is removed, the old `path` is left
    as it was, and an OSError is re-raised with a one-line explanation naming `path`.
    """
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        remove_path(tmp)
        raise OSError(e.errno, explain_os_error(e, path)) from e
    except BaseException:
        remove_path(tmp)
        raise


def write_text_atomic(path, text):
    """Write a text file under a temporary name, then rename it into place."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder (`<folder>/.lock`, flock), held while a run writes there.

    The kernel drops a flock when its process dies, so the lock of a killed run is never stale: the next
    run takes it at once. A second live writer gets RunLockedError naming the holder's pid.
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, ".lock")
        self.file = None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            self.file = None
            raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another run (pid {holder}); "
                                 f"wait for it to end, or choose another out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def release(self):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def open_csv_log(path, header, resumed_at=None):
    """A CSV log opened for appending rows whose first column is the iteration: new (with `header`), or,
    when a run resumes from iteration `resumed_at`, cut back to the rows up to it (the later ones are
    logged again), so a kill between two checkpoints never leaves repeated rows."""
    if resumed_at is None or not os.path.exists(path):
        f = open(path, "w", newline="")
        csv.writer(f).writerow(header)
        return f
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    text = io.StringIO()
    csv.writer(text).writerows(rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= resumed_at])
    write_text_atomic(path, text.getvalue())
    return open(path, "a", newline="")


def release_freed_memory():
    """Hand freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere). A long job that
    frees and reallocates large buffers block after block (eval.py's scene prediction) otherwise keeps
    the freed memory, and its resident size creeps up with the scene's size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_output_path(out, inputs):
    """ValueError for an output file that is a folder, sits in a missing or read-only folder, or is one of
    the `inputs` (also through links), which writing it would destroy."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give the output file name, e.g. {out.rstrip('/')}/mask.tif")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: the folder {folder} does not exist")
    for path in inputs:
        if os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
            raise ValueError(f"--out {out} is the input {path}: it would be overwritten; choose another name")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: cannot write to {folder} (read-only or no permission)")
