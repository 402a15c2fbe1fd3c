"""Outputs (issue 19): every command that writes checks its output before the work (missing parents are
created; a read-only folder or a parent that is a file is one `error:` line), and a full disk says "No space
left on device" and keeps the previous file (`_io.atomic_write`, the one atomic write)."""
from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch

from hybridvit import _io
from hybridvit.checkpoint import CheckpointError, save_checkpoint
from hybridvit.cli import main

MISSING = "/nonexistent/checkpoint.pt"  # a command that reached the model loading would name this file


def _writing_commands(out_file: str, out_dir: str) -> dict[str, list[str]]:
    """Each command that writes, with its output at `out_file` / `out_dir` and a checkpoint that does not
    exist: when the output is checked first, the error names the output, not the checkpoint."""
    return {
        "models": ["models", "--no-macs", "fastervit_0", "--json", out_file],
        "eval": ["eval", "--pretrained", MISSING, "--json", out_file, "--no-progress"],
        "predict": ["predict", "--pretrained", MISSING, "img.png", "--json", out_file],
        "bench": ["bench", "--pretrained", MISSING, "--json", out_file],
        "export": ["export", "--pretrained", MISSING, "-o", out_file],
        "analyze": ["analyze", "--pretrained", MISSING, "--json", out_file],
        "analyze_attention": ["analyze", "attention", "--pretrained", MISSING, "-o", out_dir],
        "train": ["train", "--output", out_dir, "--no-progress", "--epochs", "1"],
    }


def _one_error_line(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert MISSING not in err, f"{argv[0]} did the work before checking its output: {err}"
    return err


@pytest.mark.parametrize("command", list(_writing_commands("f", "d")))
def test_an_output_under_a_file_is_refused_up_front(command, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = _writing_commands(str(blocker / "sub" / "out.json"), str(blocker / "sub" / "out"))[command]
    err = _one_error_line(argv, capsys)
    assert f"{blocker} is a file, not a folder" in err


def _deny_writes_like_a_user(monkeypatch) -> None:
    """As root every folder is writable; emulate an ordinary user's permission check (owner bits)."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, *a, **k):
        if mode & os.W_OK and os.path.exists(path) and not os.stat(path).st_mode & stat.S_IWUSR:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(_io.os, "access", access)


@pytest.mark.parametrize("command", list(_writing_commands("f", "d")))
def test_a_read_only_folder_is_refused_up_front(command, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    _deny_writes_like_a_user(monkeypatch)
    try:
        argv = _writing_commands(str(ro / "new" / "out.json"), str(ro / "new" / "out"))[command]
        err = _one_error_line(argv, capsys)
        assert f"{ro} is not writable" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_missing_parent_folders_are_created(tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "models.json"
    assert main(["models", "--no-macs", "fastervit_0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["name"] == "fastervit_0"
    assert _io.check_output_file(tmp_path / "a" / "b" / "m.onnx") == tmp_path / "a" / "b" / "m.onnx"
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(_io.OutputError, match="is a folder; pass a file name"):
        _io.check_output_file(tmp_path / "a")


class _FullDisk:
    """A file on a disk that fills up after `room` bytes (the write then fails with ENOSPC)."""

    room = 64

    def __init__(self, path) -> None:
        self.f, self.written = open(path, "wb"), 0

    def write(self, data) -> int:
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_a_full_disk_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    ck = tmp_path / "last.pt"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}}, ck)
    before = ck.read_bytes()
    table = tmp_path / "models.json"
    assert main(["models", "--no-macs", "fastervit_0", "--json", str(table)]) == 0
    table_before = table.read_bytes()
    monkeypatch.setattr(_io, "_open", _FullDisk)
    # torch.save's own report of the failed write is "[enforce fail ...] unexpected pos": not what we say
    with pytest.raises(CheckpointError) as e:
        save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, ck)
    msg = str(e.value)
    assert "no space left on device" in msg.lower() and "the previous last.pt is kept" in msg
    assert "unexpected pos" not in msg and "enforce fail" not in msg
    assert ck.read_bytes() == before
    capsys.readouterr()
    assert main(["models", "--no-macs", "fastervit_*", "--json", str(table), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not write") and "no space left on device" in err.lower()
    assert "the previous models.json is kept" in err and err.count("\n") == 1
    assert table.read_bytes() == table_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "models.json"]  # no temporary file


def test_fsync_failing_for_a_full_disk_is_reported_the_same(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    _io.write_json(path, {"a": 1})

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_io.os, "fsync", fsync)
    with pytest.raises(_io.OutputError, match="No space left on device"):
        _io.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
