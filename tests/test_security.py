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


def _refusal(entry, path, tmp_path, capsys) -> str:
    """The message `entry` refuses `path` with: a CheckpointError from the API, or a command's one
    `error:` line and exit status 2."""
    if entry.startswith("api_"):
        with pytest.raises(CheckpointError) as err:
            ENTRY_POINTS[entry](path, tmp_path)
        return str(err.value)
    assert ENTRY_POINTS[entry](path, tmp_path) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and len(message.strip().splitlines()) == 1
    return message


def _check_never_runs(tmp_path, capsys, entry, fmt, payload_type):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    write_payload(path, fmt, payload_type(marker))
    if entry == "train_pretrained":
        pytest.importorskip("sklearn", reason="training on the embedded digits needs the train extra")
    message = _refusal(entry, path, tmp_path, capsys)
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


@pytest.mark.slow  # a real training run
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


@pytest.mark.slow  # a training run
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


# ------------------------------------------------------------------ TorchScript archives and zip parser mismatches
class ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose __setstate__ creates a file (torch.from_file with shared=True): loading
    the archive with torch.jit.load (or torch.load, which dispatches to it) creates the marker."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.size = 0

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.size = torch.from_file(self.marker, shared=True, size=8).numel()

    def forward(self, x):
        return x


def _torchscript_payload(path, marker):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(ScriptedPayload(str(marker))), str(path))


def _break_central_directory(path):
    """One field of the central directory ('version needed to extract') set so that Python's zipfile
    refuses the archive while torch's reader (miniz) still reads it."""
    import struct
    data = bytearray(path.read_bytes())
    i = data.find(b"PK\x01\x02")
    data[i + 6:i + 8] = struct.pack("<H", 0xFF)
    path.write_bytes(bytes(data))


def _duplicate_entry(path):
    """The archive again with data.pkl listed twice (zip readers disagree on which one wins)."""
    import zipfile
    src = zipfile.ZipFile(path)
    items = [(i, src.read(i)) for i in src.infolist()]
    out = path.with_suffix(".dup")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            z.writestr(info.filename, data)
        first = items[0][0].filename.split("/")[0]
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z.writestr(f"{first}/data.pkl", pickle.dumps({"x": 1}))
    out.replace(path)


TS_VARIANTS = {
    "plain": lambda p: None,
    "broken_central_directory": _break_central_directory,
    "prefixed": lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 60 + p.read_bytes()),
}


@pytest.mark.slow  # a Python subprocess
def test_the_payload_runs_under_torch_load(tmp_path):
    """The crafted archive is a real attack: torch.load itself dispatches it to torch.jit.load, which
    runs its code (here in a child process). hybridvit never calls torch.load on a file."""
    import subprocess
    import sys
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    _torchscript_payload(path, marker)
    _break_central_directory(path)
    code = f"import torch, warnings; warnings.simplefilter('ignore'); torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("variant", list(TS_VARIANTS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_torchscript_payload_never_runs(tmp_path, capsys, entry, variant):
    marker, path = tmp_path / "marker", tmp_path / "evil.pth"
    _torchscript_payload(path, marker)
    TS_VARIANTS[variant](path)
    message = _refusal(entry, path, tmp_path, capsys)
    assert str(path) in message and "inert" not in message
    assert any(w in message for w in ("TorchScript", "refused", "damaged zip", "not a torch.save archive"))
    assert not marker.exists()


def test_archive_with_a_repeated_entry_is_refused(tmp_path):
    path = tmp_path / "dup.pt"
    torch.save({"w": torch.ones(2)}, path)
    _duplicate_entry(path)
    with pytest.raises(CheckpointError, match="refused.*repeated names"):
        hybridvit.create_model("fastervit_nano", pretrained=str(path))


def test_reader_never_calls_torch_load(tmp_path, monkeypatch):
    """Every format reaches the model without torch.load or torch.jit.load."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / torch.jit.load called")

    model = hybridvit.create_model("fastervit_nano", num_classes=10)
    zip_path, legacy_path = tmp_path / "z.pth", tmp_path / "l.pth"
    torch.save({"state_dict": model.state_dict()}, zip_path)
    torch.save({"model": model.state_dict()}, legacy_path, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    for path in (zip_path, legacy_path):
        other = hybridvit.create_model("fastervit_nano", pretrained=str(path))
        assert other.num_classes == 10  # the file's own class count
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


# ------------------------------------------------------------------------------- headers that claim huge tensors
class _StorageRef:
    """Pickled as the persistent id of a storage (how torch.save writes storages)."""

    def __init__(self, pid):
        self.pid = pid


class _Rebuild:
    def __init__(self, ref, numel):
        self.ref, self.numel = ref, numel

    def __reduce__(self):
        from collections import OrderedDict
        return (torch._utils._rebuild_tensor_v2, (self.ref, 0, (self.numel,), (1,), False, OrderedDict()))


def _pickle_with_storages(obj):
    import io

    class P(pickle.Pickler):
        def persistent_id(self, o):
            return o.pid if isinstance(o, _StorageRef) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _legacy_claiming(path, numel):
    """A legacy torch.save file whose one storage claims `numel` floats while holding 4 bytes."""
    ref = _StorageRef(("storage", torch.FloatStorage, "0", "cpu", numel, None))
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
             _pickle_with_storages({"w": _Rebuild(ref, numel)}), pickle.dumps(["0"], protocol=2),
             numel.to_bytes(8, "little"), b"\0\0\x80?"]
    path.write_bytes(b"".join(parts))


def _zip_claiming(path, numel):
    """A zip torch.save archive whose data.pkl claims `numel` floats in a 16-byte record."""
    import zipfile
    ref = _StorageRef(("storage", torch.FloatStorage, "0", "cpu", numel))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _pickle_with_storages({"w": _Rebuild(ref, numel)}))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", b"\0" * 16)
        z.writestr("archive/version", "3\n")


def test_crafted_files_of_the_right_size_load(tmp_path):
    """The crafting helpers make files the reader accepts when their claims are true."""
    from hybridvit.checkpoint import read_checkpoint_file
    _legacy_claiming(tmp_path / "l.pth", 1)
    assert torch.equal(read_checkpoint_file(tmp_path / "l.pth")["w"], torch.ones(1))
    _zip_claiming(tmp_path / "z.pth", 4)
    assert torch.equal(read_checkpoint_file(tmp_path / "z.pth")["w"], torch.zeros(4))


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_huge_tensor_claims_are_refused_through_every_entry(tmp_path, capsys, entry, fmt):
    path = tmp_path / "huge.pth"
    (_legacy_claiming if fmt == "legacy" else _zip_claiming)(path, 25 * 10**9)
    message = _refusal(entry, path, tmp_path, capsys)
    assert str(path) in message and "100000000000 bytes" in message and "before" in message


@pytest.mark.slow  # a Python subprocess
def test_huge_tensor_claims_are_refused_before_allocation(tmp_path):
    """A legacy header claiming a 100 GB storage, and a zip record claiming more than it holds, are refused
    by the reader without allocating (the child's peak memory stays far below the claim)."""
    import subprocess
    import sys
    legacy, zipped = tmp_path / "huge_legacy.pth", tmp_path / "huge_zip.pth"
    _legacy_claiming(legacy, 25 * 10**9)  # 25e9 floats = 100 GB
    _zip_claiming(zipped, 25 * 10**9)
    code = (
        "import resource, sys\n"
        "from hybridvit.checkpoint import read_checkpoint_file, CheckpointError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        read_checkpoint_file(p)\n"
        "        print('READ', p)\n"
        "    except CheckpointError as e:\n"
        "        print('REFUSED', e)\n"
        "print('GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(legacy), str(zipped)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("REFUSED") and "100000000000 bytes" in lines[0] and "before allocating" in lines[0]
    assert lines[1].startswith("REFUSED") and "100000000000 bytes in a record of 16 bytes" in lines[1]
    assert int(lines[-1].split()[1]) < 200_000  # under 200 MB of growth for a 100 GB claim


# ------------------------------------------------------------------------------ configuration is data
def _hub_folder(tmp_path, **cfg_changes):
    model = hybridvit.create_model("fastervit_nano", num_classes=3).eval()
    model.class_names = ["a", "b", "c"]
    folder = hybridvit.save_pretrained(model, tmp_path / "hubdir")
    cfg_path = folder / "config.json"
    import json
    cfg = json.loads(cfg_path.read_text())
    for k, v in cfg_changes.items():
        if k == "model_args":
            cfg["model_args"].update(v)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg))
    return folder


def _run_file(tmp_path, **changes):
    from hybridvit.checkpoint import make_run_checkpoint
    model = hybridvit.create_model("fastervit_nano", num_classes=3)
    fields = dict(model_name="fastervit_nano", model_kwargs={}, num_classes=3, class_names=["a", "b", "c"],
                  pretrained_cfg=dict(model.pretrained_cfg), state_dict=model.state_dict())
    fields.update(changes)
    path = tmp_path / "run.pt"
    torch.save(make_run_checkpoint(**fields), path)
    return path


SMUGGLED = {
    "pretrained_file": ({"pretrained": "/etc/passwd"}, "'pretrained', a loading argument"),
    "pretrained_hub": ({"pretrained": "hf-hub:evil/repo"}, "'pretrained', a loading argument"),
    "checkpoint_path": ({"checkpoint_path": "/tmp/x.pth"}, "'checkpoint_path', a loading argument"),
    "unknown_key": ({"exec": "print(1)"}, "'exec', which is not a construction key"),
    "wrong_type": ({"depths": "1,1,2,2"}, r"\['depths'\] must be a list of integers"),
    "huge_image": ({"img_size": 10**6}, r"\['img_size'\] must be an integer in"),
}


@pytest.mark.parametrize("case", list(SMUGGLED))
def test_hub_config_cannot_smuggle_arguments(tmp_path, case):
    args, message = SMUGGLED[case]
    folder = _hub_folder(tmp_path, model_args=args)
    for load in (lambda: hybridvit.load_model(folder), lambda: hybridvit.create_model(None, pretrained=folder)):
        with pytest.raises(CheckpointError, match=message) as err:
            load()
        assert "config.json" in str(err.value) and "\n" not in str(err.value)


def test_hub_folder_naming_itself_is_refused_not_recursed(tmp_path):
    folder = tmp_path / "hubdir"
    folder = _hub_folder(tmp_path, model_args={"pretrained": str(folder)})
    with pytest.raises(CheckpointError, match="loading argument"):
        hybridvit.load_model(folder)


@pytest.mark.parametrize("case", list(SMUGGLED))
def test_run_checkpoint_cannot_smuggle_arguments(tmp_path, capsys, case):
    args, message = SMUGGLED[case]
    path = _run_file(tmp_path, model_kwargs=args)
    with pytest.raises(CheckpointError, match=message.replace("model_args", "model_kwargs")):
        hybridvit.load_model(path)
    assert main(["eval", "--pretrained", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "model_kwargs" in err


HOLLOW_RUNS = {  # what the fuzzer found (a hybridvit-run header without its fields) and its neighbours
    "format_only": {"format": "hybridvit-run"},
    "version_1_no_weights": {"format": "hybridvit-run", "version": 1, "model_name": "fastervit_nano"},
    "weights_not_a_dict": {"format": "hybridvit-run", "model_name": "fastervit_nano", "state_dict": [1, 2]},
    "name_not_a_string": {"format": "hybridvit-run", "model_name": 7, "state_dict": {}},
}


@pytest.mark.parametrize("case", list(HOLLOW_RUNS))
def test_run_checkpoint_without_its_fields_is_refused(tmp_path, capsys, case):
    path = tmp_path / "hollow.pt"
    torch.save(HOLLOW_RUNS[case], path)
    with pytest.raises(CheckpointError, match="holds no model name and weights"):
        hybridvit.load_model(path)
    assert main(["eval", "--pretrained", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err


@pytest.mark.parametrize("where", ["hub", "run"])
def test_class_counts_are_bounded_before_allocation(tmp_path, monkeypatch, where):
    """num_classes = 2e6 in a file is refused before the builder runs (no 2 GB head)."""
    from hybridvit import registry
    built = []
    monkeypatch.setattr(registry, "build_model", lambda *a, **k: built.append(k) or pytest.fail("built"))
    if where == "hub":
        path = _hub_folder(tmp_path, num_classes=2_000_000)
    else:
        path = _run_file(tmp_path, num_classes=2_000_000, class_names=None)
    with pytest.raises(CheckpointError, match=r"num_classes'\] must be an integer in \[0, 100000\]"):
        hybridvit.load_model(path)
    assert not built


# ----------------------------------------------------------------------------------------- the head, always
def test_missing_head_is_an_error_for_inference_and_fresh_for_fine_tuning(tmp_path, capsys, caplog):
    model = hybridvit.create_model("fastervit_nano", num_classes=10)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "no_head.pth"
    torch.save(sd, path)
    data = tmp_path / "data"
    from _imagedata import make_folder
    make_folder(data, n_train=2, n_val=2)
    rc = main(["eval", "--model", "fastervit_nano", "--num-classes", "10", "--pretrained", str(path),
               "--data", str(data / "val"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no classifier" in err and str(path) in err and err.count("\n") == 1
    with pytest.raises(CheckpointError, match="holds no classifier"):
        hybridvit.create_model("fastervit_nano", pretrained=str(path))
    import logging
    with caplog.at_level(logging.WARNING, logger="hybridvit"):
        tuned = hybridvit.create_model("fastervit_nano", pretrained=str(path), num_classes=4)
    assert tuned.num_classes == 4
    assert torch.equal(tuned.stem.conv1.weight, model.stem.conv1.weight)
    notes = [r.getMessage() for r in caplog.records if r.name == "hybridvit"]
    assert len(notes) == 1 and "head.weight" in notes[0] and "start fresh" in notes[0] and "fine-tuning" in notes[0]


def test_other_class_count_is_an_error_for_inference(tmp_path):
    model = hybridvit.create_model("fastervit_nano", num_classes=10)
    path = tmp_path / "ten.pth"
    torch.save(model.state_dict(), path)
    from hybridvit.loading import load_for_command
    with pytest.raises(CheckpointError, match="classifier for 10 classes, the model 3"):
        load_for_command(str(path), "fastervit_nano", num_classes=3)
    assert load_for_command(str(path), "fastervit_nano").num_classes == 10


def test_run_whose_head_does_not_match_its_class_count_is_refused(tmp_path):
    wrong = hybridvit.create_model("fastervit_nano", num_classes=5).state_dict()
    path = _run_file(tmp_path, state_dict=wrong)  # states 3 classes, holds a 5-class head
    with pytest.raises(CheckpointError, match="classifier for 5 classes, the model 3"):
        hybridvit.load_model(path)


def test_hub_folder_whose_config_and_weights_disagree_is_refused(tmp_path):
    folder = _hub_folder(tmp_path, num_classes=5, label_names=["a", "b", "c", "d", "e"])
    with pytest.raises(CheckpointError, match="classifier for 3 classes, the model 5"):
        hybridvit.load_model(folder)
    folder = _hub_folder(tmp_path / "x", label_names=["a", "b"])
    with pytest.raises(CheckpointError, match="names 2 classes but states 3"):
        hybridvit.load_model(folder)


# ------------------------------------------------------------------------------------ names from files
def test_class_names_from_files_are_escaped(tmp_path, capsys):
    evil = ["\x1b[2J\x1b[31mcat", "dog\nerror: forged line", "ok"]
    path = _run_file(tmp_path, class_names=evil)
    model = hybridvit.load_model(path)
    assert model.class_names == ["\\x1b[2J\\x1b[31mcat", "dog\\nerror: forged line", "ok"]
    assert all(c.isprintable() for name in model.class_names for c in name)
    from PIL import Image
    Image.new("RGB", (64, 64), (100, 50, 20)).save(tmp_path / "img.png")
    assert main(["predict", "--pretrained", str(path), str(tmp_path / "img.png"), "--topk", "3"]) == 0
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\nerror: forged" not in out.out


def test_unknown_model_name_in_a_file_is_escaped(tmp_path):
    path = _run_file(tmp_path, model_name="\x1b[31mfastervit\nX")
    with pytest.raises(CheckpointError) as err:
        hybridvit.load_model(path)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_resume_never_loads_what_the_stored_configuration_names(tmp_path, monkeypatch, capsys):
    """A last.pt whose stored training configuration names `pretrained` (a file, a hub id) resumes from its
    own weights: the named source is never resolved."""
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    from hybridvit import loading
    root = make_folder(tmp_path / "data", n_train=4, n_val=2)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--output", str(out), "--epochs", "1", *TINY]) == 0
    obj = torch.load(out / "last.pt", weights_only=False)
    obj["config"]["pretrained"] = "hf-hub:evil/repo"
    obj["config"]["epochs"] = 1
    torch.save(obj, out / "last.pt")
    seen = []
    real = loading.resolve
    monkeypatch.setattr(loading, "resolve", lambda p: seen.append(p) or real(p))
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert "hf-hub:evil/repo" not in seen
