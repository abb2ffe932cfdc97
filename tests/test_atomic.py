"""Crash-safe writes: a full disk or a failed write leaves the previous file (or folder) exactly as it was."""

import errno
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

import sdlora.atomic as atomic
from sdlora.atomic import atomic_dir, save_safetensors, write_text
from sdlora.errors import DiskSpaceError

Usage = namedtuple("Usage", "total used free")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_too_little_free_space_refuses_before_writing(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_safetensors({"w": torch.ones(4)}, path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: Usage(10**9, 10**9, atomic.DISK_RESERVE + 100))
    message = r"lora.*not enough disk space \(0\.0 MiB to write.*nothing was overwritten"
    with pytest.raises(DiskSpaceError, match=message):
        save_safetensors({"w": torch.zeros(1000)}, path)
    assert torch.equal(load_file(path)["w"], torch.ones(4))
    assert _leftovers(tmp_path) == []


def test_disk_filling_up_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_safetensors({"w": torch.ones(4)}, path)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(DiskSpaceError, match=r"lora\.safetensors: the disk filled up"):
        save_safetensors({"w": torch.zeros(4)}, path)
    assert torch.equal(load_file(path)["w"], torch.ones(4))
    assert _leftovers(tmp_path) == []


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "checkpoint-2"
    with atomic_dir(folder) as tmp:
        write_text(tmp / "state.json", "old")
    with pytest.raises(DiskSpaceError), atomic_dir(folder) as tmp:
        write_text(tmp / "state.json", "new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (folder / "state.json").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError), atomic.atomic_path(tmp_path / "x.txt"):
        raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []
    assert shutil.disk_usage(tmp_path).free > 0
