"""No code from a file ever runs: crafted pickles through every entry point; bad files get plain messages;
a training epoch without a readable image stops; a full disk during a save keeps the previous checkpoint."""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import random
import re

import pytest
import torch

import hybridvit
from hybridvit import load_model
from hybridvit.checkpoint import CheckpointError, save_checkpoint
from hybridvit.cli import main


class SystemPayload:
    """Unpickling it would run a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload:
    """Unpickling it would evaluate Python code that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.marker!r}).touch()",))


def write_payload(path, fmt: str, payload) -> None:
    obj = {"state_dict": {"head.weight": payload}, "args": argparse.Namespace(lr=0.1)}
    if fmt == "raw_pickle":
        path.write_bytes(pickle.dumps(obj, protocol=4))
    elif fmt == "raw_pickle_protocol0":
        path.write_bytes(pickle.dumps(payload, protocol=0))
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif fmt == "zip":
        torch.save(obj, path)
    elif fmt == "zip_fake_run":  # the payload where a run checkpoint keeps its model name
        torch.save({"format": "hybridvit-run", "version": 2, "model_name": payload, "model_kwargs": {},
                    "num_classes": 10, "class_names": None, "pretrained_cfg": {"input_size": (3, 64, 64)},
                    "state_dict": {}, "state_dict_ema": None, "train_state": None, "config": None}, path)


FORMATS = ["raw_pickle", "raw_pickle_protocol0", "legacy", "zip", "zip_fake_run"]


def _api(kind):
    def run(path, tmp_path):
        if kind == "load_checkpoint":
            hybridvit.load_checkpoint(hybridvit.create_model("fastervit_nano", num_classes=10), path)
        elif kind == "create_model":
            hybridvit.create_model("fastervit_nano", pretrained=str(path), num_classes=10)
        else:
            load_model(path)
    return run


def _cli(args):
    def run(path, tmp_path):
        argv = [a.replace("CKPT", str(path)).replace("TMP", str(tmp_path)) for a in args]
        return main(argv)
    return run


ENTRY_POINTS = {
    "api_load_checkpoint": _api("load_checkpoint"),
    "api_create_model": _api("create_model"),
    "api_load_model": _api("load_model"),
    "eval": _cli(["eval", "--pretrained", "CKPT", "--no-progress"]),
    "predict": _cli(["predict", "--pretrained", "CKPT", "TMP/img.png"]),
    "export": _cli(["export", "--pretrained", "CKPT", "-o", "TMP/m.onnx"]),
    "bench": _cli(["bench", "--pretrained", "CKPT", "-b", "1", "--warmup", "0", "--repeats", "1"]),
    "analyze": _cli(["analyze", "--pretrained", "CKPT"]),
    "train_pretrained": _cli(["train", "--pretrained", "CKPT", "--epochs", "1", "--max-steps-per-epoch", "1",
                              "--output", "TMP/run", "--no-progress", "--no-plot"]),
    "train_resume": _cli(["train", "--resume", "CKPT", "--no-progress"]),
}


def _check_never_runs(tmp_path, capsys, entry, fmt, payload_type):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    write_payload(path, fmt, payload_type(marker))
    if entry == "train_pretrained":
        pytest.importorskip("sklearn", reason="training on the embedded digits needs the train extra")
    if entry.startswith("api_"):
        with pytest.raises(CheckpointError) as err:
            ENTRY_POINTS[entry](path, tmp_path)
        message = str(err.value)
    else:
        assert ENTRY_POINTS[entry](path, tmp_path) == 2
        message = capsys.readouterr().err
        assert message.startswith("error: ") and len(message.strip().splitlines()) == 1
    assert str(path) in message
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_crafted_pickle_never_runs(tmp_path, capsys, entry, fmt):
    """os.system payload, every file format, every entry point (API and each command)."""
    _check_never_runs(tmp_path, capsys, entry, fmt, SystemPayload)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("entry", ["api_load_model", "eval"])
def test_crafted_eval_payload_never_runs(tmp_path, capsys, entry, fmt):
    _check_never_runs(tmp_path, capsys, entry, fmt, EvalPayload)


def test_weights_next_to_a_payload_load_inert(tmp_path):
    """A legacy-format official file with a Namespace, a payload and weights: the weights load."""
    model = hybridvit.create_model("fastervit_nano", num_classes=10)
    marker = tmp_path / "marker"
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1), "x": SystemPayload(marker)},
               path, _use_new_zipfile_serialization=False)
    other = hybridvit.create_model("fastervit_nano", num_classes=10)
    hybridvit.load_checkpoint(other, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert not marker.exists()


def test_restricted_unpickler_refuses_to_patch_a_class(tmp_path):
    """GLOBAL torch.Size + BUILD would set an attribute on torch's class: refused, nothing changes."""
    path = tmp_path / "patch.pt"
    path.write_bytes(b"\x80\x02ctorch\nSize\n}X\x03\x00\x00\x00fooK\x01sb.")
    with pytest.raises(CheckpointError, match="refus") as err:
        load_model(path)
    assert str(path) in str(err.value) and not hasattr(torch.Size, "foo")


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript archive") as err:
        load_model(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("kind,message", [
    ("empty", "is empty (0 bytes)"),
    ("random", "is not a PyTorch checkpoint"),
    ("truncated_zip", "truncated or corrupt"),
    ("truncated_legacy", "truncated or corrupt"),
    ("plain_pickle", "not one written by torch.save"),
])
def test_bad_files_get_their_own_message(tmp_path, capsys, kind, message):
    path = tmp_path / f"{kind}.pt"
    sd = hybridvit.create_model("fastervit_nano", num_classes=10).state_dict()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        rng = random.Random(0)
        path.write_bytes(b"\x13" + bytes(rng.randrange(256) for _ in range(4096)))
    elif kind == "truncated_zip":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated_legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert main(["eval", "--pretrained", str(path)]) == 2
    err_line = capsys.readouterr().err
    assert message in err_line and err_line.count("\n") == 1 and "Traceback" not in err_line


# ------------------------------------------------------------------------------------------ saving
def _fail_after_some_bytes(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _fail_after_some_bytes)
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert "previous last.pt is kept" in str(err.value) and str(path) in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


TINY = ["--model", "fastervit_nano", "--img-size", "32", "--batch-size", "8", "--threads", "1", "--workers", "0",
        "--no-progress", "--no-plot", "--randaugment", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0"]


def test_full_disk_during_training_and_stale_temp_files(tmp_path, monkeypatch, capsys):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    from hybridvit import checkpoint

    root = make_folder(tmp_path / "data", n_train=8, n_val=4)
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".last.pt.tmp99999"  # left by a save that was killed
    stale.write_bytes(b"PK partial")
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kwargs):  # epoch 1 writes last.pt and best.pt; epoch 2 finds a full disk
        calls.append(f)
        if len(calls) > 2:
            return _fail_after_some_bytes(obj, f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fail)
    assert main(["train", "--data", str(root), "--output", str(out), "--epochs", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous last.pt is kept" in err and str(out / "last.pt") in err
    assert not stale.exists() and not list(out.glob(".*.tmp*"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 1  # the checkpoint of epoch 1, intact
    assert load_model(out / "last.pt").num_classes == 2


def test_epoch_without_readable_image_stops_naming_the_folder(tmp_path, capsys):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    root = make_folder(tmp_path / "data", n_train=8, n_val=4)
    for f in (root / "train").rglob("*.png"):
        f.write_bytes(b"not an image")
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--output", str(out), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(root / "train") in err and "no image" in err
    assert not (out / "best.pt").exists() and not (out / "summary.json").exists()
