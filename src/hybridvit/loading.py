"""ONE place that turns any weight source into a model: resolve, read safely, check the fit (the head
included), attach classes and preprocessing.

A weight source is one of (`resolve`):

- nothing: random weights;
- the published weights of a registered name (`pretrained=True`), downloaded once into the torch hub cache;
- an official or hybridvit checkpoint file (`.pth`, `.pth.tar`, `.pt`, `.safetensors`);
- a hybridvit run checkpoint, or a run folder (its `best.pt`): it names its model, classes, size and
  preprocessing;
- a Hub folder written by `save_pretrained`, or `hf-hub:ORG/REPO`.

Every file is read by `checkpoint.read_checkpoint_file` (no code from it runs). The configuration a file
stores (a run's `model_kwargs`, a Hub folder's `model_args`, `num_classes`, `pretrained_cfg`) is data: it
is checked against the family's construction keys (`models._schema`) before anything is built.

The head is checked always (`fit_state_dict`): for inference a classifier that is missing or of another
class count is an error saying which; for fine-tuning (a `num_classes` chosen by the caller, `hybridvit
train --pretrained`) it starts fresh and one log line says which keys and why.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from . import hub
from .checkpoint import extract_state_dict, is_run_checkpoint, read_checkpoint_file, read_run
from .deploy import EXPORTED_SUFFIXES
from .errors import CheckpointError, printable
from .models import adapt_input_channels
from .models._schema import MAX_CLASSES, check_file_config, checked_pretrained_cfg, schema_for
from .models._variant import with_input_size
from .registry import build_model, get_entry, resolve_name
from .runtime import check_img_size

log = logging.getLogger("hybridvit")

INFERENCE, FINETUNE = "inference", "finetune"


# --------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A resolved weight source: `kind` is none, published, file, run or hub."""

    kind: str
    where: str = ""                      # the path or hub id, for messages
    obj: dict[str, Any] | None = None    # the file's contents (file, run)
    run: dict[str, Any] | None = None    # read_run's layout (run)
    notes: list[str] = field(default_factory=list)


def resolve(pretrained: Any) -> Source:
    """The weight source `pretrained` names (False/None/'none', True/'true', a file, a run folder, a Hub
    folder or `hf-hub:ORG/REPO`); files are read here, once."""
    if pretrained is None or pretrained is False:
        return Source("none")
    if pretrained is True:
        return Source("published")
    spec = os.fspath(pretrained)
    if spec.lower() in ("", "none", "false"):
        return Source("none")
    if spec.lower() == "true":
        return Source("published")
    if spec.startswith(hub.HF_HUB_PREFIX):
        return Source("hub", spec)
    path = Path(spec)
    if path.suffix in EXPORTED_SUFFIXES and path.is_file():
        return Source("exported", spec)
    if path.is_dir():
        if (path / hub.CONFIG_NAME).is_file():
            return Source("hub", spec)
        if not (path / "best.pt").is_file():
            raise CheckpointError(f"{spec} is a folder with neither {hub.CONFIG_NAME} (a Hub folder written by "
                                  "save_pretrained) nor best.pt (a hybridvit run folder): pass the checkpoint file")
        path = path / "best.pt"
    obj = read_checkpoint_file(path)
    if is_run_checkpoint(obj):
        return Source("run", str(path), obj, _checked_run(obj, str(path)))
    return Source("file", str(path), obj)


def _checked_run(obj: dict[str, Any], where: str) -> dict[str, Any]:
    run = read_run(obj, where)
    try:
        entry = get_entry(run["model_name"])
    except ValueError as e:
        raise CheckpointError(f"{where} names model {printable(run['model_name'])!r}, which hybridvit does not "
                              "have (`hybridvit models` lists them)") from e
    run["model_kwargs"] = check_file_config(run["model_kwargs"], schema_for(entry.family, entry.builder), where,
                                            "model_kwargs")
    check_file_config({"num_classes": run["num_classes"]}, schema_for(entry.family, entry.builder), where, "run")
    run["pretrained_cfg"] = checked_pretrained_cfg(run["pretrained_cfg"] or dict(entry.pretrained_cfg), where)
    run["class_names"] = _checked_names(run.get("class_names"), run["num_classes"], where)
    return run


def _checked_names(names: Any, num_classes: int, where: str) -> list[str] | None:
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise CheckpointError(f"{where}: the class names must be a list of strings")
    if len(names) != num_classes:
        raise CheckpointError(f"{where} names {len(names)} classes but states {num_classes}: the file is "
                              "inconsistent (a damaged or hand-edited file); write it again")
    return [printable(c) for c in names]


# ------------------------------------------------------------------------------------------- fit check
def _head_keys(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "classifier_prefixes", ("head.",)))


def _classes_in(sd: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """The class count of the classifier in `sd` (its weight's first dimension), None without one."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    w = sd.get(f"{name}.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() >= 1 else None


def _some(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], where: str, *, fresh_head: bool,
                   why: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of `sd` mapped onto `model` (official layouts converted) and the head keys that start
    fresh. Every key and shape must match; the classifier may differ (missing, another class count)
    only with `fresh_head` (fine-tuning), else a CheckpointError says which."""
    own = model.state_dict()
    if not sd or not set(sd) <= set(own):
        sd = model.convert_official(sd)
    sd = adapt_input_channels(sd, model)  # published RGB first layers -> the model's in_chans
    if hasattr(model, "resample_tables"):  # tables sized by the training resolution -> the model's (CabViT)
        sd = model.resample_tables(sd)
    is_head = lambda k: k.startswith(_head_keys(model))
    head_own = [k for k in own if is_head(k)]
    head_file = [k for k in sd if is_head(k)]
    fresh: list[str] = []
    if not head_own:  # a backbone (features_only, num_classes=0): the file's classifier has nowhere to go
        sd = {k: v for k, v in sd.items() if not is_head(k)}
    elif not head_file or (_classes_in(sd, model) or model.num_classes) != model.num_classes:
        # a classifier that is missing or for another class count; other shapes are the body's mismatch below
        have = _classes_in(sd, model)
        problem = (f"holds no classifier ({_some(head_own)} missing)" if not head_file else
                   f"has a classifier for {have} classes, the model {model.num_classes}")
        if not fresh_head:
            raise CheckpointError(f"{where} {problem}: its predictions would come from a random classifier. "
                                  "For inference pass the checkpoint of a trained classifier (a hybridvit run, or a "
                                  "class count matching the file); to fine-tune, pass num_classes=N to create_model "
                                  "or use hybridvit train --pretrained")
        sd = {k: v for k, v in sd.items() if not is_head(k)}
        fresh = head_own
        log.warning("%s", f"{where} {problem}: {_some(fresh)} start fresh{f' ({why})' if why else ''}")
    missing = [k for k in own if k not in sd and k not in fresh]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what}: {_some(v)}" for what, v in
                 (("shapes differ", shapes), ("model keys missing from the checkpoint", missing),
                  ("checkpoint keys unknown to the model", unexpected)) if v]
        name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(f"{where} does not fit model {name}: " + "; ".join(parts) +
                              ". Is it a checkpoint of another variant? Pass the matching model name.")
    return sd, fresh


def load_checkpoint(model: nn.Module, path: str | os.PathLike | dict[str, Any]) -> nn.Module:
    """Loads an official checkpoint (as published) or a hybridvit one into `model` (layout detected
    from the keys). A classifier of another class count, or none, leaves `model`'s head freshly
    initialised (one log line says so); any other difference is an error naming keys and shapes."""
    if isinstance(path, dict):
        obj, where = path, "the state dict"
    else:
        obj, where = read_checkpoint_file(path), os.fspath(path)
    sd, _ = fit_state_dict(model, extract_state_dict(obj, where), where, fresh_head=True,
                           why="the model's num_classes was chosen by the caller")
    model.load_state_dict(sd, strict=False)
    return model


# -------------------------------------------------------------------------------------------- building
def _download(name: str) -> str:
    entry = get_entry(name)
    if not entry.url:
        hint = entry.weights_hint or "no weights are published for this model"
        raise CheckpointError(f"{name}: {hint}. Download the file by hand and pass "
                              f"create_model({name!r}, pretrained='/path/to/file.pth').")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / os.path.basename(urlparse(entry.url).path)
    if not target.is_file():
        try:  # torch.hub writes a temporary file and renames it: no half files in the cache
            torch.hub.download_url_to_file(entry.url, str(target), progress=True)
        except Exception as e:
            raise CheckpointError(f"could not download {entry.url} ({e}). Without internet, download the file "
                                  f"elsewhere and pass pretrained='/path/to/{target.name}'.") from e
    return str(target)


def _check_classes(num_classes: Any, where: str = "num_classes") -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 0 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"{where} must be an integer from 0 to {MAX_CLASSES}, got {num_classes!r}")


def _trained_on(run: dict[str, Any]) -> dict[str, str] | None:
    """Where a run's images came from (its stored training configuration), for eval and analyze."""
    cfg = run.get("config") or {}
    keys = ("data", "train_split", "val_split")
    if isinstance(cfg.get("data"), str) and all(isinstance(cfg.get(k, ""), str) for k in keys):
        return {"data": cfg["data"], "train_split": cfg.get("train_split") or "train",
                "val_split": cfg.get("val_split") or "val"}
    return None


def _from_source(source: Source, name: str | None, *, num_classes: int | None, in_chans: int | None,
                 purpose: str, ema: bool, cache_dir: Any, overrides: dict[str, Any],
                 class_names_wanted: list[str] | None = None) -> nn.Module:
    """The model of `source` with its weights loaded, `class_names`, `pretrained_cfg`, `model_name`,
    `model_kwargs` and `load_note` (what loaded from where, which keys start fresh) attached."""
    if num_classes is not None:
        _check_classes(num_classes)
    if source.kind == "exported":
        return _exported(source, name, num_classes=num_classes, purpose=purpose, ema=ema, overrides=overrides)
    if ema and source.kind != "run":
        raise CheckpointError(f"EMA weights are kept in hybridvit run checkpoints; {source.where or 'this'} is "
                              f"{'a Hub folder' if source.kind == 'hub' else 'not one'}: leave ema/--ema out")
    if source.kind in ("none", "published", "file"):
        model, note = _from_registry(source, name, num_classes, in_chans, overrides, purpose == FINETUNE)
        class_names, pcfg_file = None, None
    else:
        stored = _stored_run(source, ema) if source.kind == "run" else _stored_hub(source, cache_dir)
        model, note, class_names, overrides = _from_stored(stored, name, num_classes, in_chans, overrides,
                                                           purpose == FINETUNE, class_names_wanted)
        name, pcfg_file = stored["arch"], stored["pretrained_cfg"]
    return _attach(model, source, name, class_names, pcfg_file, overrides, note)


def _from_registry(source: Source, name: str | None, num_classes: int | None, in_chans: int | None,
                   overrides: dict[str, Any], fresh_ok: bool) -> tuple[nn.Module, str]:
    """Random weights, the published weights or a checkpoint file, into the registered model `name`."""
    if not name:
        raise CheckpointError(f"{source.where} is not a hybridvit run checkpoint, so it does not name its "
                              "model: pass the model name (--model NAME; `hybridvit models` lists them)"
                              if source.kind == "file" else "pass a model name (--model NAME)")
    where = _download(name) if source.kind == "published" else source.where  # before anything is built
    model = build_model(name, num_classes=1000 if num_classes is None else num_classes, in_chans=in_chans or 3,
                        **overrides)
    if source.kind == "none":
        return model, f"{name} with random weights"
    obj = read_checkpoint_file(where) if source.obj is None else source.obj
    sd = extract_state_dict(obj, where)
    if num_classes is None and source.kind == "file":  # the file's own class count, when it has one
        sd = sd if set(sd) <= set(model.state_dict()) else model.convert_official(sd)
        have = _classes_in(sd, model)
        if have is not None and have != model.num_classes and 0 < have <= MAX_CLASSES:
            model.reset_classifier(have)
    sd, fresh = fit_state_dict(model, sd, where, fresh_head=fresh_ok, why="fine-tuning")
    model.load_state_dict(sd, strict=False)
    return model, f"{name} from {where}" + (f"; {', '.join(fresh)} start fresh" if fresh else "")


def _stored_run(source: Source, ema: bool) -> dict[str, Any]:
    """What a run checkpoint states of its model (checked by `resolve`), and its weights."""
    run, where = source.run, source.where
    if ema and not run.get("state_dict_ema"):
        raise CheckpointError(f"{where} has no EMA weights (the run was trained without --model-ema)")
    return {"arch": run["model_name"], "num_classes": run["num_classes"], "kwargs": run["model_kwargs"],
            "class_names": run["class_names"], "pretrained_cfg": run["pretrained_cfg"], "where": where,
            "weights_file": where, "weights": lambda: run["state_dict_ema"] if ema else run["state_dict"]}


def _stored_hub(source: Source, cache_dir: Any) -> dict[str, Any]:
    """What a Hub folder's config.json states of its model, checked as data; its weights read on demand."""
    config_path, weights_path, where = hub.resolve(source.where, cache_dir=cache_dir)
    cfg = hub.read_config(config_path)
    try:
        entry = get_entry(cfg["architecture"])
    except ValueError as e:
        raise CheckpointError(f"{config_path} names architecture {printable(cfg['architecture'])!r}, which "
                              "hybridvit does not have") from e
    classes = cfg.get("num_classes", 1000)
    schema = schema_for(entry.family, entry.builder)
    kwargs = check_file_config(cfg.get("model_args") or {}, schema, str(config_path))
    check_file_config({"num_classes": classes}, schema, str(config_path), "config")
    return {"arch": cfg["architecture"], "num_classes": classes, "kwargs": kwargs,
            "class_names": _checked_names(cfg.get("label_names"), classes, str(config_path)),
            "pretrained_cfg": checked_pretrained_cfg(cfg["pretrained_cfg"], str(config_path))
            if cfg.get("pretrained_cfg") else None,
            "where": where, "weights_file": str(weights_path), "weights": lambda: hub.read_weights(weights_path)}


def _from_stored(stored: dict[str, Any], name: str | None, num_classes: int | None, in_chans: int | None,
                 overrides: dict[str, Any], fresh_ok: bool, class_names_wanted: list[str] | None
                 ) -> tuple[nn.Module, str, list[str] | None, dict[str, Any]]:
    """The model a run or Hub folder describes, its weights loaded (its head must match its own class
    count); a fine-tune to other classes then starts a fresh head. Returns (model, note, class names,
    construction overrides)."""
    arch, where, stored_classes, class_names = stored["arch"], stored["where"], stored["num_classes"], \
        stored["class_names"]
    if name is not None and name != arch:
        raise CheckpointError(f"{where} holds a {arch} model, not {name}: leave the model name out (the file "
                              f"knows its model) or pass {arch}")
    kwargs = {**stored["kwargs"], **overrides}
    chans = in_chans or int(kwargs.pop("in_chans", 3))
    kwargs.pop("in_chans", None)
    model = build_model(arch, num_classes=stored_classes, in_chans=chans, **kwargs)
    wfile = stored["weights_file"]
    sd, _ = fit_state_dict(model, extract_state_dict({"state_dict": stored["weights"]()}, wfile), wfile,
                           fresh_head=False)
    model.load_state_dict(sd, strict=False)
    note = f"{arch} from {where}"
    other_names = bool(fresh_ok and class_names and class_names_wanted and class_names != class_names_wanted)
    if num_classes is not None and (num_classes != stored_classes or other_names):
        if not fresh_ok:
            raise CheckpointError(f"{where} predicts {stored_classes} classes, not {num_classes}: leave "
                                  "--num-classes out, or fine-tune with hybridvit train --pretrained")
        why = (f"{stored_classes} -> {num_classes} classes" if num_classes != stored_classes else
               f"its classes ({', '.join(class_names[:5])}{' ...' if len(class_names) > 5 else ''}) are "
               "not the data's, in the data's order")
        model.reset_classifier(num_classes)
        class_names = None
        fresh = [k for k in model.state_dict() if k.startswith(_head_keys(model))]
        log.warning("%s", f"{where}: {_some(fresh)} start fresh ({why}; fine-tuning)")
        note += f"; {', '.join(fresh)} start fresh ({why})"
    return model, note, class_names, kwargs


def _attach(model: nn.Module, source: Source, name: str, class_names: list[str] | None,
            pcfg_file: dict[str, Any] | None, overrides: dict[str, Any], note: str) -> nn.Module:
    """Classes, preprocessing (the file's, at the size asked), name, rebuild arguments and provenance."""
    pcfg = dict(model.pretrained_cfg)
    if pcfg_file:
        pcfg.update({k: v for k, v in pcfg_file.items() if k not in ("url", "file", "hf_hub_id", "source")})
    pcfg = with_input_size(pcfg, model.in_chans, overrides.get("img_size"))
    pcfg["num_classes"] = model.num_classes
    if source.kind == "hub" and source.where.startswith(hub.HF_HUB_PREFIX):
        pcfg.update(hf_hub_id=source.where[len(hub.HF_HUB_PREFIX):], source="hf-hub")
    elif source.kind == "hub":
        pcfg.update(file=str(Path(source.where).resolve()), source="local-dir")
    elif source.kind in ("file", "run"):
        pcfg.update(file=source.where, source="file")
    model.pretrained_cfg = pcfg
    model.class_names = class_names
    model.model_name = name
    model.model_kwargs = dict(overrides)
    if model.in_chans != 3:
        model.model_kwargs["in_chans"] = model.in_chans
    model.load_note = note
    model.weights_source = source.kind
    model.trained_on = _trained_on(source.run) if source.kind == "run" else None
    return model


def _exported(source: Source, name: str | None, *, num_classes: int | None, purpose: str, ema: bool,
              overrides: dict[str, Any]) -> nn.Module:
    """An exported .onnx / .xml file, run by its runtime (no PyTorch model): for inference only, as it is."""
    from .deploy import ExportedModel

    if purpose != INFERENCE or ema:
        what = "fine-tune the run checkpoint it came from" if purpose != INFERENCE else "leave --ema out"
        raise CheckpointError(f"{source.where} is an exported model (runs in its runtime as it is): {what}")
    model = ExportedModel(source.where)
    size = tuple(model.pretrained_cfg["input_size"][1:])
    asked = overrides.get("img_size")
    asked = (asked, asked) if isinstance(asked, int) else tuple(asked) if asked else None
    for what, given, have in (("--model", name, model.model_name), ("--num-classes", num_classes, model.num_classes),
                              ("--img-size", asked, size)):
        if given is not None and given != have:
            raise CheckpointError(f"{source.where} is {model.model_name} exported with {model.num_classes} classes "
                                  f"at {size[0]}x{size[1]}, not {what} {given}: leave {what} out")
    return model


def create_model(name: str | None, *, pretrained: Any = False, num_classes: int | None = None,
                 in_chans: int | None = None, features_only: bool = False, out_indices: tuple[int, ...] | None = None,
                 cache_dir: Any = None, **overrides: Any) -> nn.Module:
    """Builds a registered model, weights loaded from any source (see the module docstring).

    pretrained: False, True (the published weights), a checkpoint file (official or hybridvit), a run
    checkpoint or folder, a save_pretrained folder or "hf-hub:ORG/REPO" (then `name` may be None, or
    "hf-hub:ORG/REPO" itself). num_classes: None keeps the source's (1000 for random weights); another
    count than the weights' starts a fresh classifier (fine-tuning) with one log line. With
    `features_only=True` the model returns the NCHW maps of `out_indices` (default every stage) and the
    stages after the last of them, the final norm and the head are removed. Overrides replace any
    configuration field of the variant (`drop_path_rate`, `img_size`, `depths`, ...).
    """
    if isinstance(name, str) and name.startswith(hub.HF_HUB_PREFIX):
        source, name = Source("hub", name), None
    else:
        source = resolve(pretrained)
        name = resolve_name(name) if isinstance(name, str) else name  # an official name: hybridvit's model
    if name is None and source.kind not in ("hub", "run"):
        raise ValueError("create_model(None, ...) needs pretrained= a save_pretrained folder, a run checkpoint or "
                         "'hf-hub:ORG/REPO' (they name their architecture); otherwise pass a model name")
    model = _from_source(source, name, num_classes=num_classes, in_chans=in_chans,
                         purpose=FINETUNE if num_classes is not None or features_only else INFERENCE,
                         ema=False, cache_dir=cache_dir, overrides=overrides)
    if features_only:
        model.set_features_only(tuple(range(len(model.stage_info))) if out_indices is None else tuple(out_indices))
    return model


def load_for_command(pretrained: Any, model_name: str | None = None, *, num_classes: int | None = None,
                     img_size: int | None = None, ema: bool = False, purpose: str = INFERENCE,
                     class_names: list[str] | None = None, **overrides: Any) -> nn.Module:
    """The model a command works on, in eval mode (every command loads through here).

    pretrained: a run checkpoint or run folder, a Hub folder or `hf-hub:ORG/REPO` (these know their
    model, classes, size and preprocessing, so `model_name` may be left out), an official checkpoint
    file (then `model_name` is needed), 'true' for the published weights, or None for random weights.
    purpose: INFERENCE (eval, predict, export, bench, analyze: the head must match) or FINETUNE
    (train --pretrained: `num_classes` other than the source's starts a fresh head).
    img_size: below the model's minimum input size, a ValueError naming it (before anything is built).
    class_names: for FINETUNE, the data's classes: a run or Hub folder whose classes differ (in names or
    order) starts a fresh head even at the same class count.
    """
    source = resolve(pretrained)
    name = resolve_name(model_name) if model_name else (source.run["model_name"] if source.kind == "run" else None)
    if not name and source.kind == "file":
        raise CheckpointError(f"{source.where} is not a hybridvit run checkpoint, so it does not name its model: "
                              "pass --model NAME (see `hybridvit models`)")
    elif not name and source.kind not in ("hub", "exported"):  # those name their model
        raise ValueError("pass --model NAME (see `hybridvit models`) or --pretrained RUN_CHECKPOINT")
    if name:
        check_img_size(name, img_size)
    if img_size:
        overrides["img_size"] = img_size
    model = _from_source(source, name, num_classes=num_classes, in_chans=None, purpose=purpose, ema=ema,
                         cache_dir=None, overrides=overrides, class_names_wanted=class_names)
    if source.kind == "hub":
        check_img_size(model.model_name, img_size)
    if purpose == INFERENCE:  # fine-tuning at another size is what the warning would advise
        _warn_far_size(source, model, img_size)
    return model.eval() if purpose == INFERENCE else model


def _warn_far_size(source: Source, model: nn.Module, img_size: Any) -> None:
    """One warning line when `img_size` is far (a factor of 2 or more) from the size the weights were trained
    at: they still load (every family runs at any size), but the accuracy measured there may drop a lot."""
    if not img_size or source.kind in ("none", "exported"):
        return
    if source.kind == "run":
        trained = source.run["pretrained_cfg"].get("input_size")
    else:
        trained = get_entry(model.model_name).pretrained_cfg.get("input_size")
    side = min(img_size) if isinstance(img_size, (list, tuple)) else img_size
    if trained and (side * 2 <= trained[-1] or side >= trained[-1] * 2):
        log.warning("%s", f"warning: --img-size {side} is far from the {trained[-1]} px the weights were trained "
                          f"at: the model runs, but expect lower accuracy (fine-tune at that size: hybridvit train "
                          f"--pretrained ... --img-size {side})")


def load_model(path: str | os.PathLike, *, ema: bool = False, device: str | torch.device | None = None
               ) -> nn.Module:
    """A hybridvit run checkpoint (a file, or a run folder: its best.pt), a Hub folder written by
    `save_pretrained`, or `hf-hub:ORG/REPO`, ready for inference.

    Returns the model in eval mode on `device` (default CPU) with `class_names` (list[str] or None),
    `pretrained_cfg` (input size, crop, interpolation, mean, std), `model_name` and `model_kwargs`
    attached. `ema=True` takes the EMA weights of a run. No code from the file runs.
    """
    source = resolve(path)
    if source.kind not in ("run", "hub"):
        raise CheckpointError(f"{os.fspath(path)} is not a hybridvit run checkpoint or Hub folder, so it does not "
                              "name its model: use hybridvit.create_model(NAME, pretrained=path)")
    model = _from_source(source, None, num_classes=None, in_chans=None, purpose=INFERENCE, ema=ema, cache_dir=None,
                         overrides={}).eval()
    return model.to(device) if device is not None else model


def run_defaults(pretrained: Any) -> dict[str, Any]:
    """What `hybridvit train --pretrained RUN` takes from a run checkpoint or run folder unless the command
    line overrides it: {'model': ..., 'img_size': ...} (empty for any other source)."""
    try:
        source = resolve(pretrained)
    except CheckpointError:
        return {}  # the loader reports it when the model is built
    if source.kind != "run":
        return {}
    out = {"model": source.run["model_name"]}
    if isinstance(source.run["model_kwargs"].get("img_size"), int):
        out["img_size"] = source.run["model_kwargs"]["img_size"]
    return out
