"""Debris of killed processes (nanosar/files.py): which temporaries and backups are stale, and what happens
to them. A dead pid is the pid of a child that has exited and been reaped."""

import os
import subprocess
import sys

import pytest

from nanosar import files


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make(path, text="x"):
    os.makedirs(path)
    with open(os.path.join(path, "f"), "w") as f:
        f.write(text)


def test_remove_stale_temporaries_spares_live_processes(tmp_path):
    dead, live, me = dead_pid(), os.getppid(), os.getpid()
    for name in (f"a.tmp-{dead}", f"b.tmp-{live}", f"c.tmp-{me}", "d", f"e.old-{dead}", f"f.tmp-{dead}"):
        make(tmp_path / name)
    assert files.remove_stale_temporaries(str(tmp_path), name="a") == [f"a.tmp-{dead}"]
    assert files.remove_stale_temporaries(str(tmp_path)) == [f"c.tmp-{me}", f"f.tmp-{dead}"]
    assert sorted(os.listdir(tmp_path)) == sorted([f"b.tmp-{live}", "d", f"e.old-{dead}"])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are recognised through /proc")
def test_a_zombie_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        os.sched_yield()                                    # exited, not reaped: a zombie
    assert not files.pid_alive(child.pid) and files.pid_alive(os.getpid())
    child.wait()


def test_replace_folder_moves_the_new_one_in_and_the_old_one_out(tmp_path):
    make(tmp_path / "s", "old")
    make(tmp_path / "s.tmp-1", "new")
    files.replace_folder(str(tmp_path / "s.tmp-1"), str(tmp_path / "s"))
    assert os.listdir(tmp_path) == ["s"] and (tmp_path / "s" / "f").read_text() == "new"


def test_replace_folder_puts_the_old_one_back_when_the_new_one_cannot_move(tmp_path, monkeypatch):
    make(tmp_path / "s", "old")
    make(tmp_path / "s.tmp-1", "new")
    real_replace = os.replace

    def replace(src, dst):
        if src.endswith(".tmp-1"):
            raise PermissionError(13, "Permission denied", src)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        files.replace_folder(str(tmp_path / "s.tmp-1"), str(tmp_path / "s"))
    assert (tmp_path / "s" / "f").read_text() == "old" and not (tmp_path / f"s.old-{os.getpid()}").exists()


def test_restore_stale_backups_puts_back_a_lost_folder_and_drops_a_superseded_one(tmp_path):
    dead, live = dead_pid(), os.getppid()
    make(tmp_path / f"lost.old-{dead}", "old")          # killed between the two renames: "lost" is gone
    make(tmp_path / "kept", "new")
    make(tmp_path / f"kept.old-{dead}", "old")          # killed after the new one moved in
    make(tmp_path / f"busy.old-{live}", "old")          # a live process is replacing "busy" right now
    assert files.restore_stale_backups(str(tmp_path)) == [f"kept.old-{dead}", f"lost.old-{dead}"]
    assert sorted(os.listdir(tmp_path)) == sorted(["lost", "kept", f"busy.old-{live}"])
    assert (tmp_path / "lost" / "f").read_text() == "old" and (tmp_path / "kept" / "f").read_text() == "new"


def test_backups_named_with_this_pid_are_stale_too(tmp_path):
    """In containers a rerun often gets the pid of the killed run's process: its debris is stale all the same."""
    me = os.getpid()
    make(tmp_path / f"s.old-{me}", "old")
    assert files.restore_stale_backups(str(tmp_path)) == [f"s.old-{me}"] and os.listdir(tmp_path) == ["s"]
    make(tmp_path / f"s.old-{me}", "older")                # left by an earlier process with this pid
    make(tmp_path / "s.tmp-1", "new")
    files.replace_folder(str(tmp_path / "s.tmp-1"), str(tmp_path / "s"))
    assert os.listdir(tmp_path) == ["s"] and (tmp_path / "s" / "f").read_text() == "new"
