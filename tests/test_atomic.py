"""atomic.py, the one place files and folders are written whole or not at all: the old target survives every
failure, a failed swap puts it back, and a twin finished first by another process is kept when the caller says
it is complete."""

from __future__ import annotations

import os

import pytest

from qlorakit import atomic


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    atomic.write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_bytes_writes_the_bytes_as_they_are(tmp_path):
    path = tmp_path / "plot.png"
    data = bytes(range(256)) + b"\r\n\n"  # no newline translation, no encoding
    atomic.write_bytes(path, data)
    assert path.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_write_text_failure_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(path, "new", fsync=True)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_new_folder_swaps_in_on_success_and_leaves_the_target_on_error(tmp_path):
    target = tmp_path / "adapter"
    with atomic.new_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".adapter.tmp-")
        (tmp / "w").write_text("1")
    assert (target / "w").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic.new_folder(target) as tmp:
            (tmp / "w").write_text("2")
            raise RuntimeError("killed halfway")
    assert (target / "w").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic.new_folder(target) as tmp:
        (tmp / "w").write_text("3")
    assert (target / "w").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target, built = tmp_path / "out", tmp_path / ".out.tmp"
    target.mkdir()
    (target / "keep").write_text("old")
    built.mkdir()
    real = os.rename

    def fail_second(src, dst):
        if str(src) == str(built):
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", fail_second)
    with pytest.raises(OSError, match="cross-device"):
        atomic.swap_in(built, target)
    assert (target / "keep").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_a_twin_finished_first_is_kept_only_when_complete(tmp_path, monkeypatch):
    target, built = tmp_path / "entry", tmp_path / ".scratch"
    built.mkdir()
    real = os.rename

    def racer(src, dst):  # another process renames its complete entry in between
        os.makedirs(dst)
        (dst / "manifest.json").write_text("{}")
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(atomic.os, "rename", racer)
    atomic.swap_in(built, target, theirs_ok=lambda e: (e / "manifest.json").is_file())
    assert (target / "manifest.json").is_file() and not built.exists()
    built.mkdir()
    (target / "manifest.json").unlink()
    target.rmdir()
    with pytest.raises(OSError):
        atomic.swap_in(built, target, theirs_ok=lambda e: False)
    monkeypatch.setattr(atomic.os, "rename", real)


def test_folder_lock_makes_a_second_builder_wait_for_the_first(tmp_path):
    import threading
    import time

    order = []

    def builder(name: str, hold: float) -> None:
        with atomic.folder_lock(tmp_path / "cache", "model"):
            order.append(f"{name} in")
            time.sleep(hold)
            order.append(f"{name} out")

    first = threading.Thread(target=builder, args=("first", 0.3))
    first.start()
    time.sleep(0.05)  # the first holds the lock now
    second = threading.Thread(target=builder, args=("second", 0.0))
    second.start()
    first.join(5)
    second.join(5)
    assert order == ["first in", "first out", "second in", "second out"]
    assert (tmp_path / "cache" / ".model.lock").is_file()
