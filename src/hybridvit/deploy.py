"""Deployment runtimes: ONNX Runtime and OpenVINO, with the files `hybridvit export` writes.

- `export_openvino`: the model as OpenVINO IR (`.xml` + `.bin`), converted from its ONNX export, carrying
  the same metadata as the ONNX file (model name, class names, preprocessing) in its runtime info.
- `ExportedModel`: an exported `.onnx` or `.xml` file run by its runtime, with no PyTorch model, behind the
  module interface `eval` and `predict` use (`model(x)` on float (B, 3, H, W) -> logits, `pretrained_cfg`,
  `class_names`, `num_classes`, `model_name`).
- `runtime_model`: a PyTorch model wrapped in a runtime for `hybridvit bench --runtime`, timed side by
  side with eager and compiled PyTorch.

The files are data for their runtimes (protobuf / IR XML); their metadata is checked like every
configuration hybridvit reads (`loading.checked_pretrained_cfg`, escaped class names).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_save
from .errors import CheckpointError, printable
from .models._schema import checked_pretrained_cfg

EXPORTED_SUFFIXES = (".onnx", ".xml")
_INSTALL = {"onnxruntime": "pip install 'hybridvit[onnx]'", "openvino": "pip install 'hybridvit[openvino]'"}


def _require(module: str) -> Any:
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(f"{module} is needed here: {_INSTALL[module]}", name=module) from e


def export_onnx(model: torch.nn.Module, path: str | Path, img_size: tuple[int, int], dynamic_batch: bool = True,
                opset: int = 18, dtype: torch.dtype = torch.float32) -> Path:
    """Writes `model` (eval) as ONNX with input `images` (B, 3, H, W) and output `logits` (B, num_classes)."""
    try:
        import onnxscript  # noqa: F401  (the torch.export-based ONNX exporter needs it)
    except ImportError as e:
        raise ModuleNotFoundError("ONNX export needs the onnx extra: pip install 'hybridvit[onnx]'",
                                  name="onnxscript") from e
    model = model.eval()
    x = torch.randn(2 if dynamic_batch else 1, model.in_chans, *img_size, dtype=dtype)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    path = Path(path)
    prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                             dynamic_shapes=dyn, opset_version=opset, external_data=False)
    prog.model.metadata_props.update(file_metadata(model, img_size))
    atomic_save(path, lambda tmp: prog.save(str(tmp)))
    return path


def file_metadata(model: torch.nn.Module, img_size: tuple[int, int]) -> dict[str, str]:
    """What an exported file carries so that a runtime needs nothing else: the model name, the class names
    and the preprocessing (`data.transforms.Preprocess` at the exported size), as JSON strings (ONNX
    `metadata_props`)."""
    import json

    from ._version import __version__
    from .data.transforms import Preprocess
    from .models._variant import with_input_size

    pre = Preprocess.from_cfg(with_input_size(model.pretrained_cfg, model.in_chans, tuple(img_size)))
    return {"hybridvit.model_name": str(getattr(model, "model_name", "")),
            "hybridvit.num_classes": str(int(getattr(model, "num_classes", 0))),
            "hybridvit.class_names": json.dumps(getattr(model, "class_names", None)),
            "hybridvit.preprocess": json.dumps(pre.to_dict()),
            "hybridvit.version": __version__}


def check_onnx(model: torch.nn.Module, path: str | Path, img_size: tuple[int, int], batch: int = 2,
               dtype: torch.dtype = torch.float32) -> float:
    """Max abs difference between onnxruntime and PyTorch outputs for a random batch."""
    import onnxruntime as ort

    x = torch.randn(batch, model.in_chans, *img_size, dtype=dtype)
    with torch.no_grad():
        ref = model.eval()(x).float().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(["logits"], {"images": x.numpy()})
    return float(abs(out.astype("float32") - ref).max())


def export_openvino(model: nn.Module, path: str | os.PathLike, img_size: tuple[int, int],
                    dynamic_batch: bool = True) -> Path:
    """Writes `model` as OpenVINO IR: `path` (.xml) and its weights beside it (.bin), fp32 weights
    (OpenVINO's CPU plugin runs them in bf16 where the CPU has it, by its precision hint)."""
    ov = _require("openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is written as NAME.xml (+ NAME.bin), got {path}")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", img_size, dynamic_batch=dynamic_batch)
        ov_model = ov.convert_model(str(onnx_path))
        for key, value in file_metadata(model, img_size).items():
            ov_model.set_rt_info(value, ["hybridvit", key.removeprefix("hybridvit.")])
        out = Path(tmp) / path.name
        ov.save_model(ov_model, str(out), compress_to_fp16=False)
        shutil.move(str(out.with_suffix(".bin")), str(path.with_suffix(".bin")))  # the weights first: an
        shutil.move(str(out), str(path))  # .xml never points at a missing or older .bin
    return path


def _metadata_onnx(path: Path) -> tuple[dict[str, str], Any]:
    ort = _require("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map), sess


def _metadata_openvino(path: Path) -> tuple[dict[str, str], Any]:
    ov = _require("openvino")
    core = ov.Core()
    model = core.read_model(str(path))
    meta = {}
    for key in ("model_name", "num_classes", "class_names", "preprocess", "version"):
        if model.has_rt_info(["hybridvit", key]):
            meta[f"hybridvit.{key}"] = str(model.get_rt_info(["hybridvit", key]).astype(str))
    return meta, (core, model)


class ExportedModel(nn.Module):
    """An exported `.onnx` (ONNX Runtime) or `.xml` (OpenVINO) file behind the module interface of the
    commands: forward (B, C, H, W) float -> (B, num_classes) logits, on the CPU."""

    weights_source = "exported"
    trained_on = None
    features_only = False

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32") -> None:
        super().__init__()
        path = Path(path)
        self.path, self.runtime = path, "onnxruntime" if path.suffix == ".onnx" else "openvino"
        if not path.is_file():
            raise CheckpointError(f"exported model {path} does not exist")
        try:
            meta, handle = (_metadata_onnx if self.runtime == "onnxruntime" else _metadata_openvino)(path)
        except ModuleNotFoundError:
            raise
        except Exception as e:  # the runtimes' own parse errors
            raise CheckpointError(f"{path} could not be read by {self.runtime} ({str(e).splitlines()[0][:200]}): "
                                  "export it again with hybridvit export") from e
        if "hybridvit.preprocess" not in meta:
            raise CheckpointError(f"{path} carries no hybridvit metadata (preprocessing, classes): export it with "
                                  "hybridvit export, which records them")
        try:
            pre = json.loads(meta["hybridvit.preprocess"])
            names = json.loads(meta.get("hybridvit.class_names", "null"))
            num_classes = int(meta.get("hybridvit.num_classes", "0"))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: its hybridvit metadata is not valid ({e})") from e
        where = str(path)
        self.pretrained_cfg = checked_pretrained_cfg(pre, where)
        self.in_chans = int(self.pretrained_cfg["input_size"][0])
        self.num_classes = num_classes
        if names is not None and not (isinstance(names, list) and len(names) == num_classes
                                      and all(isinstance(c, str) for c in names)):
            raise CheckpointError(f"{path}: its class names do not match its {num_classes} classes")
        self.class_names = [printable(c) for c in names] if names else None
        self.model_name = printable(meta.get("hybridvit.model_name", path.stem))
        self.model_kwargs: dict[str, Any] = {}
        self.load_note = f"{self.model_name} exported to {path} ({self.runtime})"
        if self.runtime == "onnxruntime":
            self._session = handle
            self._input = handle.get_inputs()[0].name
        else:
            core, model = handle
            config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
            self._compiled = core.compile_model(model, "CPU", config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().contiguous().numpy()
        if self.runtime == "onnxruntime":
            out = self._session.run(None, {self._input: arr})[0]
        else:
            out = self._compiled(arr)[0]
        return torch.from_numpy(out.copy())


def runtime_model(model: nn.Module, runtime: str, img_size: tuple[int, int], folder: str | os.PathLike,
                  precision: str = "fp32") -> nn.Module:
    """`model` exported to `runtime` (onnxruntime, openvino) in `folder`, loaded back as an ExportedModel
    that remembers the PyTorch model for its MAC count (`macs_source`)."""
    folder = Path(folder)
    if runtime == "onnxruntime":
        path = export_onnx(model, folder / f"{model.model_name}.onnx", img_size)
    elif runtime == "openvino":
        path = export_openvino(model, folder / f"{model.model_name}.xml", img_size)
    else:
        raise ValueError(f"unknown runtime {runtime!r}; one of torch, compile, onnxruntime, openvino")
    exported = ExportedModel(path, precision=precision)
    exported.macs_source = model
    return exported
