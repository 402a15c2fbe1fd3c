"""Checkpoint files: the one safe reader (no code from a file runs; see _unpickle.py), the state dict
inside a checkpoint, and the hybridvit run checkpoint's schema and atomic save. Turning a file into a
model is `hybridvit.loading`'s job."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import _unpickle
from .errors import CheckpointError, printable

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")


def _describe_object(obj: Any) -> str:
    return obj._pickle_global if isinstance(obj, _unpickle.Opaque) else type(obj).__name__


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a `.pth`, `.pth.tar`, `.pt` or `.safetensors` file into a dict, with actionable errors.

    The one reader that decides what a file is. `torch.save` files (zip archives and the legacy format)
    are read here, not by `torch.load`: the archive is listed by torch's own zip reader and by Python's,
    and refused when the two disagree; a TorchScript archive is refused; every pickle goes through the
    restricted unpickler (`hybridvit._unpickle`: tensors and containers are built, any other object
    becomes an inert stand-in); a storage larger than what the file holds is refused before anything is
    allocated. Every failure is a `CheckpointError` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a folder; pass a checkpoint file (a run folder holds best.pt "
                              "and last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted copy or download? Copy or download it "
                              "again.")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(path)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} ({size} bytes) is not a PyTorch checkpoint: it starts neither like a "
                              "torch.save file (zip archive or pickle) nor is it named .safetensors. Is it the "
                              "right file?")
    try:
        obj = _read_zip(path, size) if head.startswith(b"PK") else _read_legacy(path, size)
    except CheckpointError:
        raise
    except _unpickle.RefusedError as e:
        raise CheckpointError(f"{path} was refused: {e}. hybridvit builds only tensors and containers from a "
                              "file (no code from it runs); save the weights alone with "
                              "torch.save(model.state_dict(), path)") from e
    except MemoryError as e:
        raise CheckpointError(f"{path} ({size} bytes) could not be read: it asks for more memory than there "
                              "is. Is it the right file?") from e
    except Exception as e:  # EOFError, pickle, struct and torch errors of a damaged file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} ({size} bytes) could not be read as a PyTorch checkpoint ({type(e).__name__}: {msg[:200]}). "
            "The file is probably truncated or corrupt (an interrupted download or save?): download or copy "
            "it again.") from e
    if not isinstance(obj, dict) or isinstance(obj, _unpickle.Opaque):
        raise CheckpointError(f"{path} holds a {_describe_object(obj)} object, not a checkpoint: expected a "
                              "state dict or a dict with 'state_dict' or 'model' (nothing of the file ran)")
    return obj


# ------------------------------------------------------------------------- torch.save formats, read here
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_TORCHSCRIPT_RECORDS = ("constants.pkl", "code/", "constants/", "bytecode.pkl", "extra/")


def _refuse(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} was refused: {why}")


class _Bounded:
    """A read-only view of a binary file that never reads past its end: a pickle opcode claiming a
    huge length gets the bytes that are there (and then fails), not a huge allocation."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._size = f, size

    def _left(self) -> int:
        return max(0, self._size - self._f.tell())

    def read(self, n: int = -1) -> bytes:
        return self._f.read(self._left() if n is None or n < 0 else min(n, self._left()))

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(self._left() if limit is None or limit < 0 else min(limit, self._left()))

    def tell(self) -> int:
        return self._f.tell()


def _storage_id(saved_id: Any, expected_len: int) -> tuple:
    if not (isinstance(saved_id, tuple) and len(saved_id) == expected_len and saved_id[0] in ("storage", b"storage")):
        raise _unpickle.RefusedError(f"unexpected persistent id {type(saved_id).__name__} (only storages are read)")
    return saved_id[1:]


def _dtype_of(storage_type: Any) -> torch.dtype:
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    if isinstance(storage_type, _unpickle.StorageType):
        return storage_type.dtype
    raise _unpickle.RefusedError(f"a storage of type {storage_type!r}")


def _nbytes(numel: Any, dtype: torch.dtype) -> int:
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise _unpickle.RefusedError(f"a storage of {numel!r} elements")
    return numel * torch._utils._element_size(dtype)


def _zip_agreement(path: Path, size: int) -> tuple[Any, dict[str, int]]:
    """torch's zip reader over `path`, and each record's size, after checking that Python's zip reader
    sees exactly the same records, uncompressed, at the same offsets (so no parser sees another file)."""
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except Exception as e:  # BadZipFile, NotImplementedError (a version field), struct and Unicode errors
        raise CheckpointError(f"{path} ({size} bytes) is a damaged zip archive ({e}): probably a torch.save "
                              "file that is truncated or corrupt (an interrupted download or save?). Download or "
                              "copy it again (hybridvit refuses archives that zip readers read differently)") from e
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = list(reader.get_all_records())
    except Exception as e:
        raise CheckpointError(f"{path} ({size} bytes) is not a torch.save archive torch can read "
                              f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}): it is probably "
                              "truncated or corrupt; download or copy it again") from e
    names = [i.filename for i in infos]
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or len(set(names)) != len(names) or any("/" not in n for n in names):
        raise _refuse(path, "its zip entries do not form one torch.save archive (several top folders or "
                      "repeated names, which zip readers resolve differently)")
    prefix = prefixes.pop() + "/"
    mine = {n[len(prefix):]: i for n, i in zip(names, infos)}
    if set(mine) != set(records):
        raise _refuse(path, "torch's zip reader and Python's see different files in it (a crafted archive)")
    if any(r == t or r.startswith(t) for r in records for t in _TORCHSCRIPT_RECORDS if t.endswith("/") or r == t):
        raise CheckpointError(f"{path} is a TorchScript archive: it carries code, which hybridvit never runs or "
                              "loads. Refused; pass a checkpoint saved with torch.save(model.state_dict(), path)")
    if "data.pkl" not in records:
        raise _refuse(path, "it is a zip archive without data.pkl, so not a torch.save checkpoint")
    sizes = {}
    with open(path, "rb") as f:
        for name, info in mine.items():
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise _refuse(path, f"its record {name} is compressed (torch.save stores records as they are)")
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise _refuse(path, f"its record {name} has no local header where the directory says")
            data_offset = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                + int.from_bytes(local[28:30], "little")
            torch_size = reader.get_record_size(name) if hasattr(reader, "get_record_size") else info.file_size
            if data_offset + info.file_size > size or reader.get_record_offset(name) != data_offset \
                    or torch_size != info.file_size:
                raise _refuse(path, f"zip readers place its record {name} differently (a crafted archive)")
            sizes[name] = info.file_size
    return reader, sizes


def _read_zip(path: Path, size: int) -> Any:
    import io

    reader, sizes = _zip_agreement(path, size)
    byteorder = reader.get_record("byteorder") if "byteorder" in sizes else b"little"
    if byteorder not in (b"little", b"big"):
        raise _refuse(path, f"unknown byte order {byteorder[:16]!r}")
    storages: dict[str, Any] = {}

    def persistent_load(saved_id: Any) -> Any:
        storage_type, key, _location, numel = _storage_id(saved_id, 5)
        dtype = _dtype_of(storage_type)
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(key, str):
            raise _unpickle.RefusedError(f"a storage key {type(key).__name__}")
        if key not in storages:
            nbytes, name = _nbytes(numel, dtype), f"data/{key}"
            if name not in sizes:
                raise _unpickle.RefusedError(f"a storage {name} that the archive does not hold")
            if nbytes > sizes[name]:
                raise CheckpointError(f"{path} declares a tensor of {nbytes} bytes in a record of {sizes[name]} "
                                      "bytes: it is truncated or corrupt (or crafted), refused before reading it")
            untyped = reader.get_storage_from_record(name, nbytes, torch.UntypedStorage)._typed_storage()
            untyped = untyped._untyped_storage
            if byteorder.decode() != sys.byteorder:
                untyped.byteswap(dtype)
            storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        if storages[key].dtype != dtype:
            raise _unpickle.RefusedError(f"storage {key} read with two dtypes")
        return storages[key]

    data = reader.get_record("data.pkl")
    return _unpickle.Unpickler(io.BytesIO(data), persistent_load=persistent_load, limit=len(data)).load()


def _read_legacy(path: Path, size: int) -> Any:
    """The format of `torch.save(..., _use_new_zipfile_serialization=False)` (torch < 1.6): five pickles
    (magic number, protocol, system info, the object, the storage keys), then each storage's raw bytes."""
    storages: dict[Any, Any] = {}
    declared = 0
    with open(path, "rb") as raw:
        f = _Bounded(raw, size)

        def restricted(**kwargs: Any) -> Any:
            return _unpickle.Unpickler(f, limit=size, **kwargs).load()

        if restricted() != _LEGACY_MAGIC:
            raise CheckpointError(f"{path} is a pickle file but not one written by torch.save; hybridvit reads "
                                  "torch.save and .safetensors files (save with torch.save(state_dict, path))")
        if restricted() != _LEGACY_PROTOCOL:
            raise _refuse(path, "its torch.save protocol version is not 1001")
        sys_info = restricted()
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not False

        def persistent_load(saved_id: Any) -> Any:
            nonlocal declared
            if isinstance(saved_id, tuple) and saved_id[:1] in (("module",), (b"module",)) and len(saved_id) == 4:
                return saved_id[1]  # the class of a pickled module: an inert stand-in already
            storage_type, root_key, _location, numel, view = _storage_id(saved_id, 6)
            dtype = _dtype_of(storage_type)
            if root_key not in storages:
                nbytes = _nbytes(numel, dtype)
                declared += nbytes
                if declared > size:
                    raise CheckpointError(f"{path} declares tensors of {declared} bytes or more but holds {size} "
                                          "bytes: it is truncated or corrupt (or crafted), refused before "
                                          "allocating them. Download or copy it again")
                storages[root_key] = torch.storage.TypedStorage(
                    wrap_storage=torch.UntypedStorage(nbytes), dtype=dtype, _internal=True)
            typed = storages[root_key]
            if view is None:
                return typed
            view_key, offset, view_size = view
            el = torch._utils._element_size(dtype)
            if not all(isinstance(v, int) and v >= 0 for v in (offset, view_size)) or \
                    (offset + view_size) * el > typed._untyped_storage.nbytes():
                raise _unpickle.RefusedError("a storage view outside its storage")
            if view_key not in storages:
                storages[view_key] = torch.storage.TypedStorage(
                    wrap_storage=typed._untyped_storage[offset * el:(offset + view_size) * el], dtype=dtype,
                    _internal=True)
            return storages[view_key]

        result = restricted(persistent_load=persistent_load)
        keys = restricted()
        if not isinstance(keys, list):
            raise _unpickle.RefusedError("the storage key list is not a list")
        for key in keys:
            if key not in storages:
                raise _unpickle.RefusedError(f"data of an unknown storage {key!r}")
            typed = storages[key]
            el = torch._utils._element_size(typed.dtype)
            head = f.read(8)
            if len(head) != 8:
                raise EOFError("the file ends inside the storage data")
            numel = int.from_bytes(head, "little" if little else "big", signed=True)
            nbytes = typed._untyped_storage.nbytes()
            if numel * el != nbytes:
                raise _unpickle.RefusedError(f"storage {key!r} holds {numel * el} bytes, {nbytes} declared")
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise EOFError("the file ends inside the storage data")
            if nbytes:
                typed._untyped_storage.copy_(torch.UntypedStorage.from_buffer(data, dtype=torch.uint8))
            if not little:
                typed._untyped_storage.byteswap(typed.dtype)
    return result


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 27)


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError("reading .safetensors files needs the safetensors package: "
                              "pip install 'hybridvit[safetensors]'") from e
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e)[:200]}); it may be truncated: "
                              "download or copy it again") from e


def extract_state_dict(obj: dict[str, Any], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict (`state_dict`/`model` wrappers, `module.` prefixes removed)."""
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue  # epoch, optimizer counters and other bookkeeping stored next to the weights
        if not isinstance(k, str):
            raise CheckpointError(f"{source} holds a tensor under a key that is not a parameter name "
                                  f"({printable(repr(k))[:80]}): it is damaged or not a model checkpoint")
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        sd[k] = v
    if not sd:
        keys = ", ".join(map(str, list(obj)[:10])) or "none"
        raise CheckpointError(f"{source} holds no tensors (keys: {keys}): is it a model checkpoint?")
    return sd


# ------------------------------------------------------------------------------ hybridvit run checkpoints
RUN_FORMAT = "hybridvit-run"
RUN_VERSION = 2
# the training state stored for resume (TrainState.state_dict() minus the weights, which sit at the top)
_V1_TRAIN_KEYS = ("optimizer", "scaler", "scheduler", "epoch", "step_in_epoch", "best_top1", "rng", "running",
                  "skipped_images", "ema_updates", "world_size")


def make_run_checkpoint(*, model_name: str, model_kwargs: dict[str, Any], num_classes: int,
                        class_names: list[str] | None, pretrained_cfg: dict[str, Any],
                        state_dict: dict[str, torch.Tensor], state_dict_ema: dict[str, torch.Tensor] | None = None,
                        train_state: dict[str, Any] | None = None, config: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """The run checkpoint (schema version 2): what rebuilds the model for inference (name, construction
    overrides, classes, preprocessing, weights and EMA weights) and, for resume, the training state and
    configuration. The weights sit under `state_dict`, so official-style readers find them too."""
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "model_name": model_name,
            "model_kwargs": dict(model_kwargs), "num_classes": int(num_classes),
            "class_names": list(class_names) if class_names is not None else None,
            "pretrained_cfg": dict(pretrained_cfg), "state_dict": state_dict, "state_dict_ema": state_dict_ema,
            "train_state": train_state, "config": config}


def is_run_checkpoint(obj: dict[str, Any]) -> bool:
    """A hybridvit run checkpoint of any version (version 1: written by hybridvit 0.1's trainer)."""
    return obj.get("format") == RUN_FORMAT or ("model_name" in obj and isinstance(obj.get("state_dict"), dict))


def read_run(obj: dict[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """The run checkpoint `obj` in the current schema; version 1 files (top-level training keys) are
    upgraded in memory."""
    if not is_run_checkpoint(obj):
        raise CheckpointError(f"{source} is not a hybridvit run checkpoint (no model name stored): for an "
                              "official checkpoint pass the model name, e.g. --model fastervit_0")
    version = obj.get("version", 1)
    if version == RUN_VERSION:
        return _checked_run(obj, source)
    if version != 1:
        raise CheckpointError(f"{source} is a run checkpoint of format version {version}; this hybridvit reads "
                              f"versions 1 to {RUN_VERSION}: upgrade hybridvit")
    if not isinstance(obj.get("model_name"), str) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{source} says it is a hybridvit run checkpoint but holds no model name and "
                              "weights (`model_name`, `state_dict`): it is damaged or was not written by "
                              "hybridvit; use the run's intact best.pt or last.pt")
    train_state = {k: obj[k] for k in _V1_TRAIN_KEYS if k in obj} if "optimizer" in obj else None
    pcfg = obj.get("pretrained_cfg") or {}  # empty: the loader takes the registry's
    return _checked_run(make_run_checkpoint(
        model_name=obj["model_name"], model_kwargs=obj.get("model_kwargs") or {},
        num_classes=obj.get("num_classes") or _head_size(obj["state_dict"]), class_names=obj.get("class_names"),
        pretrained_cfg=pcfg, state_dict=obj["state_dict"], state_dict_ema=obj.get("state_dict_ema"),
        train_state=train_state, config=obj.get("config")), source)


def _checked_run(run: dict[str, Any], source: str) -> dict[str, Any]:
    """`run` when its fields have the types the schema says (a crafted file gets a clear error)."""
    def ok(value: Any, types: type | tuple[type, ...], optional: bool = False) -> bool:
        return (optional and value is None) or (isinstance(value, types) and not isinstance(value, _unpickle.Opaque))

    checks = {"model_name": ok(run.get("model_name"), str), "model_kwargs": ok(run.get("model_kwargs"), dict),
              "num_classes": ok(run.get("num_classes"), int) and run["num_classes"] >= 0,
              "class_names": ok(run.get("class_names"), list, True)
              and all(isinstance(c, str) for c in run.get("class_names") or []),
              "pretrained_cfg": ok(run.get("pretrained_cfg"), dict),
              "state_dict": ok(run.get("state_dict"), dict) and _is_state_dict(run["state_dict"]),
              "state_dict_ema": ok(run.get("state_dict_ema"), dict, True)
              and _is_state_dict(run.get("state_dict_ema") or {}),
              "train_state": ok(run.get("train_state"), dict, True), "config": ok(run.get("config"), dict, True)}
    bad = [k for k, good in checks.items() if not good]
    if bad:
        raise CheckpointError(f"{source} is not a valid hybridvit run checkpoint: {', '.join(bad)} missing or of "
                              "the wrong type (a damaged or foreign file)")
    if not all(isinstance(k, str) and k.isidentifier() for k in run["model_kwargs"]):
        raise CheckpointError(f"{source}: model_kwargs must map option names to values")
    return run


def _is_state_dict(sd: dict[Any, Any]) -> bool:
    """Whether `sd` maps parameter names (str) to tensors, as a run's weights must."""
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


def _head_size(sd: dict[str, torch.Tensor]) -> int:
    w = sd.get("head.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else 1000




def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save through the one atomic write (`_io.atomic_write`): a crash or a full disk never leaves a
    half-written `path` and keeps the previous one; its error is a CheckpointError."""
    from ._io import OutputError, save_torch

    try:
        save_torch(obj, path)
    except OutputError as e:
        raise CheckpointError(f"{e}, then resume with --resume") from e.__cause__
