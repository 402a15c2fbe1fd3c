"""Reading checkpoint files (official or hybridvit layout) and loading them into a model."""
from __future__ import annotations

import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class _Opaque(dict):
    """Stand-in for a non-tensor object stored next to the weights (the `args` Namespace of timm-style
    training scripts, the yacs config of CrossFormer's): built without running any code of the file."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.pickled_state = state


def _tolerant_pickle_module() -> types.SimpleNamespace:
    """A pickle module for torch.load that rebuilds tensors with the callables `weights_only` allows
    and turns every other global into an inert `_Opaque` subclass: no code of the file runs."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = _get_allowed_globals()
    stand_ins: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            if key not in stand_ins:
                stand_ins[key] = type(name, (_Opaque,), {"__module__": module})
            return stand_ins[key]

    return types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="hybridvit_tolerant_pickle")


def _load_weights_only(path: Path) -> object:
    """torch.load(weights_only=True); files that also pickle other objects (argparse Namespaces, yacs
    configs, numpy scalars) are read with `_tolerant_pickle_module`, which keeps them inert."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle_module())


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a `.pth`, `.pth.tar`, `.pt` or `.safetensors` file into a dict, with actionable errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
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
    try:
        obj = _load_weights_only(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} ({size} bytes) could not be read as a PyTorch checkpoint: {str(e).splitlines()[0]}. "
            "The file is probably truncated or corrupt (an interrupted download?): download or copy it again."
        ) from e
    except Exception as e:  # pickle.UnpicklingError from weights_only for arbitrary objects
        raise CheckpointError(f"{path} holds objects that cannot be loaded safely ({e}); "
                              "save the state dict alone with torch.save(model.state_dict(), path)") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict or a dict with "
                              "'state_dict' or 'model'")
    return obj


def extract_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
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
        raise CheckpointError("the checkpoint holds no tensors: keys are " + ", ".join(list(obj)[:10]))
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
    sd = extract_state_dict(obj)
    own = model.state_dict()
    if not set(sd) <= set(own) or not sd:
        sd = model.convert_official(sd)
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
