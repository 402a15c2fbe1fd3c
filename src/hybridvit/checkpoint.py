"""The one owner of checkpoint files: reading any file safely (no code from it runs; see _unpickle.py),
loading official or hybridvit weights into a model, and the hybridvit run checkpoint (schema, atomic
save, `load_model`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from . import _unpickle

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def _describe_object(obj: Any) -> str:
    return obj._pickle_global if isinstance(obj, _unpickle.Opaque) else type(obj).__name__


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a `.pth`, `.pth.tar`, `.pt` or `.safetensors` file into a dict, with actionable errors.

    Pickled files (zip and legacy `torch.save` formats) go through the restricted unpickler of
    `hybridvit._unpickle`: tensors and containers are built, any other object becomes an inert stand-in.
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
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} ({size} bytes) is not a PyTorch checkpoint: it starts neither like a "
                              "torch.save file (zip archive or pickle) nor is it named .safetensors. Is it the "
                              "right file?")
    if head.startswith(b"PK") and _is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript archive (it carries code, which hybridvit never runs "
                              "while loading): pass a checkpoint saved with torch.save(model.state_dict(), path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_unpickle)
    except _unpickle.RefusedError as e:
        raise CheckpointError(f"{path} was refused: {e}. hybridvit builds only tensors and containers from a "
                              "file (no code from it runs); save the weights alone with "
                              "torch.save(model.state_dict(), path)") from e
    except Exception as e:  # zipfile.BadZipFile, EOFError, RuntimeError of torch's readers
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "magic number" in msg:
            raise CheckpointError(f"{path} is a pickle file but not one written by torch.save; hybridvit reads "
                                  "torch.save and .safetensors files (save with torch.save(state_dict, path))") from e
        raise CheckpointError(
            f"{path} ({size} bytes) could not be read as a PyTorch checkpoint ({type(e).__name__}: {msg}). "
            "The file is probably truncated or corrupt (an interrupted download or save?): download or copy "
            "it again.") from e
    if not isinstance(obj, dict) or isinstance(obj, _unpickle.Opaque):
        raise CheckpointError(f"{path} holds a {_describe_object(obj)} object (left inert, nothing of it ran), "
                              "expected a state dict or a dict with 'state_dict' or 'model'")
    return obj


def _is_torchscript(path: Path) -> bool:
    """torch.load hands TorchScript archives (their code and constants) to torch.jit.load: refuse them."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # a damaged archive: torch.load's error says so


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError("reading .safetensors files needs the safetensors package: "
                              "pip install 'hybridvit[safetensors]'") from e
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated: "
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
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        sd[k] = v
    if not sd:
        keys = ", ".join(map(str, list(obj)[:10])) or "none"
        raise CheckpointError(f"{source} holds no tensors (keys: {keys}): is it a model checkpoint?")
    return sd


def _describe(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(model: nn.Module, path: str | os.PathLike | dict[str, Any]) -> nn.Module:
    """Loads an official checkpoint (as published) or a hybridvit one into `model`.

    The layout is detected from the keys: a state dict whose keys are the model's own loads directly,
    anything else goes through the family's official converter (`model.convert_official`). When the
    classifier shape differs (another `num_classes`), the classifier stays freshly initialised and
    everything else loads. Any other difference is an error naming the keys and shapes.
    """
    obj = read_checkpoint_file(path) if not isinstance(path, dict) else path
    sd = extract_state_dict(obj, str(path) if not isinstance(path, dict) else "the state dict")
    own = model.state_dict()
    if not set(sd) <= set(own) or not sd:
        sd = model.convert_official(sd)
    sd = model.adapt_input_channels(sd) if hasattr(model, "adapt_input_channels") else sd  # RGB -> in_chans
    head_prefixes = tuple(getattr(model, "classifier_prefixes", ("head.",)))
    is_head = lambda k: k.startswith(head_prefixes)
    # A classifier of another shape (other num_classes) or none at all stays freshly initialised.
    for k in [k for k in sd if is_head(k) and (k not in own or own[k].shape != sd[k].shape)]:
        del sd[k]
    keeps_head = any(is_head(k) for k in sd)
    missing = [k for k in own if k not in sd and (keeps_head or not is_head(k))]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        name = getattr(model, "model_name", type(model).__name__)
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shapes differ: {_describe(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} model keys missing from the checkpoint: {_describe(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys unknown to the model: {_describe(unexpected)}")
        src = path if not isinstance(path, dict) else "the state dict"
        raise CheckpointError(f"{src} does not fit model {name}: " + "; ".join(parts) +
                              ". Is it a checkpoint of another variant? Pass the matching model name.")
    model.load_state_dict(sd, strict=False)
    return model


def resolve_pretrained(entry: Any, pretrained: bool | str | os.PathLike) -> str:
    """A local file for `pretrained=True` (download once into the torch hub cache) or a given path."""
    if pretrained is True:
        if not entry.url:
            hint = entry.weights_hint or "no weights are published for this model"
            raise CheckpointError(f"{entry.name}: {hint}. Download the file by hand and pass "
                                  f"create_model({entry.name!r}, pretrained='/path/to/file.pth').")
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / os.path.basename(urlparse(entry.url).path)
        if not target.is_file():
            try:
                # writes to a temporary file in the same folder, then renames: no half files in the cache
                torch.hub.download_url_to_file(entry.url, str(target), progress=True)
            except Exception as e:
                raise CheckpointError(f"could not download {entry.url} ({e}). Without internet, download the "
                                      f"file elsewhere and pass pretrained='/path/to/{target.name}'.") from e
        return str(target)
    return os.fspath(pretrained)


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
    train_state = {k: obj[k] for k in _V1_TRAIN_KEYS if k in obj} if "optimizer" in obj else None
    pcfg = obj.get("pretrained_cfg")
    if not pcfg:
        from .registry import get_entry
        pcfg = dict(get_entry(obj["model_name"]).pretrained_cfg)
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
              "pretrained_cfg": ok(run.get("pretrained_cfg"), dict) and "input_size" in run["pretrained_cfg"],
              "state_dict": ok(run.get("state_dict"), dict),
              "state_dict_ema": ok(run.get("state_dict_ema"), dict, True),
              "train_state": ok(run.get("train_state"), dict, True), "config": ok(run.get("config"), dict, True)}
    bad = [k for k, good in checks.items() if not good]
    if bad:
        raise CheckpointError(f"{source} is not a valid hybridvit run checkpoint: {', '.join(bad)} missing or of "
                              "the wrong type (a damaged or foreign file)")
    if not all(isinstance(k, str) and k.isidentifier() for k in run["model_kwargs"]):
        raise CheckpointError(f"{source}: model_kwargs must map option names to values")
    return run


def _head_size(sd: dict[str, torch.Tensor]) -> int:
    w = sd.get("head.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else 1000


def model_from_run(run: dict[str, Any], *, ema: bool = False, source: str = "the checkpoint",
                   **overrides: Any) -> nn.Module:
    """The model of a run checkpoint (read_run layout) in eval mode, with `class_names`, `pretrained_cfg`,
    `model_name` and `model_kwargs` attached. `overrides` change construction fields (e.g. img_size)."""
    from .registry import create_model

    kwargs = {**run["model_kwargs"], **overrides}
    model = create_model(run["model_name"], num_classes=run["num_classes"], **kwargs)
    weights = run["state_dict"]
    if ema:
        if not run.get("state_dict_ema"):
            raise CheckpointError(f"{source} has no EMA weights (the run was trained without --model-ema)")
        weights = run["state_dict_ema"]
    load_checkpoint(model, {"state_dict": weights})
    pcfg = dict(run["pretrained_cfg"])
    if "img_size" in overrides and isinstance(overrides["img_size"], int):
        pcfg["input_size"] = (pcfg["input_size"][0], overrides["img_size"], overrides["img_size"])
    model.pretrained_cfg = pcfg
    model.class_names = list(run["class_names"]) if run.get("class_names") else None
    model.model_name = run["model_name"]
    model.model_kwargs = kwargs
    return model.eval()


def run_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run checkpoint file: `path` itself, or a run folder's best.pt."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() and (path / "best.pt").is_file() else path


def load_model(path: str | os.PathLike, *, ema: bool = False, device: str | torch.device | None = None
               ) -> nn.Module:
    """A hybridvit run checkpoint (a file, or a run folder: its best.pt), a Hub folder written by
    `save_pretrained`, or `hf-hub:ORG/REPO`, ready for inference.

    Returns the model in eval mode on `device` (default CPU) with `class_names` (list[str] or None),
    `pretrained_cfg` (input size, crop, interpolation, mean, std), `model_name` and `model_kwargs`
    attached. `ema=True` takes the EMA weights of a run. No code from the file runs.
    """
    from . import hub

    if hub.is_hub_source(path):
        if ema:
            raise CheckpointError(f"{path} is a Hub folder, which holds one set of weights: leave ema out "
                                  "(EMA weights are in a run checkpoint)")
        return hub.load_folder(path, device=device)
    path = run_checkpoint_path(path)
    run = read_run(read_checkpoint_file(path), str(path))
    model = model_from_run(run, ema=ema, source=str(path))
    return model.to(device) if device is not None else model


def temp_path(path: Path) -> Path:
    """The temporary file a save writes before renaming (a hidden sibling, marked with the process id)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, synced, then renamed over `path`: a crash or a
    full disk never leaves a half-written `path`, and a failed save removes its temporary file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0]
        raise CheckpointError(f"could not write {path}: {reason} ({kept}). Free disk space or choose another "
                              "output folder, then resume with --resume.") from e


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that killed saves left in `folder` (`.NAME.tmpPID`); returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
