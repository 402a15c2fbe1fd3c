"""Deployment runtimes: ONNX Runtime and OpenVINO, with the files `hybridvit export` writes.

- `export_openvino`: the model as OpenVINO IR (`.xml` + `.bin`), converted from its ONNX export, carrying
  the same metadata as the ONNX file (model name, class names, preprocessing) in its runtime info; with
  `calibration`, quantised to INT8 by NNCF's post-training quantisation (the int8 extra).
- `calibration_batches`: the images that calibration runs on (a folder of images, or the embedded digits),
  through the model's own preprocessing.
- `ExportedModel`: an exported `.onnx` or `.xml` file run by its runtime, with no PyTorch model, behind the
  module interface `eval` and `predict` use (`model(x)` on float (B, 3, H, W) -> logits, `pretrained_cfg`,
  `class_names`, `num_classes`, `model_name`).
- `runtime_model`: a PyTorch model wrapped in a runtime for `hybridvit bench --runtime`, timed side by
  side with eager and compiled PyTorch.

The files are data for their runtimes (protobuf / IR XML); their metadata is checked like every
configuration hybridvit reads (`loading.checked_pretrained_cfg`, escaped class names).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_save
from ._stop import remove_on_stop
from .errors import CheckpointError, printable
from .extras import require
from .models._schema import checked_pretrained_cfg

EXPORTED_SUFFIXES = (".onnx", ".xml")
# NNCF's scheme for export --int8 (benchmarks/results/cpu_int8_openvino.json): "performance" quantises every
# product's inputs symmetrically; "transformer" also smooths the linears' activations (SmoothQuant) and keeps
# softmax, norms and residual adds in floating point. "performance" was faster for all three families and
# kept top-1 within 0.3 points on the digits runs, where "transformer" lost 16 points on FasterViT.
INT8_SCHEMES = ("performance", "transformer")


_require = require  # the one `require` (hybridvit.extras)


@contextlib.contextmanager
def quiet_exporter():
    """Silences what PyTorch's exporters print while they work: their progress lines on stdout, the warnings
    of their loggers (optional torchvision operators skipped, ...) and deprecation warnings from inside
    PyTorch. An exception still propagates, and what the exporter printed before it is shown on stderr."""
    import io
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    printed = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    except BaseException:
        sys.stderr.write(printed.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
    with quiet_exporter():
        prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                                 dynamic_shapes=dyn, opset_version=opset, external_data=False, verbose=False)
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
                    dynamic_batch: bool = True, calibration: list[torch.Tensor] | None = None,
                    scheme: str | None = None) -> Path:
    """Writes `model` as OpenVINO IR: `path` (.xml) and its weights beside it (.bin), fp32 weights
    (OpenVINO's CPU plugin runs them in bf16 where the CPU has it, by its precision hint).

    With `calibration` (normalised float batches (B, 3, H, W) at `img_size`, e.g. from
    `calibration_batches`), the model is quantised to INT8 by NNCF's post-training quantisation before
    it is written: int8 weights (per channel) and activations, ranges from the calibration images.
    `scheme` is one of `INT8_SCHEMES` (NNCF's presets; default: performance)."""
    ov = _require("openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is written as NAME.xml (+ NAME.bin), got {path}")
    if calibration is not None:
        _require("nncf", load=False)  # before the export: a missing extra is said before minutes of work
        scheme = scheme or INT8_SCHEMES[0]
        if scheme not in INT8_SCHEMES:
            raise ValueError(f"unknown INT8 scheme {scheme!r}; one of {', '.join(INT8_SCHEMES)}")
        if not calibration:
            raise ValueError("INT8 calibration needs at least one image")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, remove_on_stop(tmp):
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", img_size, dynamic_batch=dynamic_batch)
        ov_model = ov.convert_model(str(onnx_path))
        meta = file_metadata(model, img_size)
        if calibration is not None:
            ov_model = _quantize(ov, ov_model, calibration, scheme, Path(tmp))
            from importlib.metadata import version
            meta["hybridvit.int8"] = json.dumps({"scheme": scheme, "calibration_images":
                                                 sum(len(b) for b in calibration), "nncf": version("nncf")})
        for key, value in meta.items():
            ov_model.set_rt_info(value, ["hybridvit", key.removeprefix("hybridvit.")])
        out = Path(tmp) / path.name
        ov.save_model(ov_model, str(out), compress_to_fp16=False)
        shutil.move(str(out.with_suffix(".bin")), str(path.with_suffix(".bin")))  # the weights first: an
        shutil.move(str(out), str(path))  # .xml never points at a missing or older .bin
    return path


def _quantize(ov: Any, ov_model: Any, calibration: list[torch.Tensor], scheme: str, tmp: Path) -> Any:
    """NNCF post-training quantisation of an OpenVINO model on the calibration batches, run in a child
    Python process (`_quantize_files`) on files in `tmp`. NNCF leaves threads, progress displays and
    telemetry behind in the process that runs it, and a pytest run of ours crashed in a later subprocess
    call after it had quantised in-process; the child keeps all of that out of the user's process."""
    import subprocess
    import sys

    import numpy as np

    ov.save_model(ov_model, str(tmp / "fp32.xml"), compress_to_fp16=False)
    (tmp / "calibration").mkdir()
    for i, b in enumerate(calibration):
        np.save(tmp / "calibration" / f"{i:06d}.npy", b.detach().float().cpu().contiguous().numpy())
    code = "import sys; from hybridvit.deploy import _quantize_files; _quantize_files(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # finds this hybridvit
    done = subprocess.run([sys.executable, "-c", code, str(tmp / "fp32.xml"), str(tmp / "int8.xml"),
                           str(tmp / "calibration"), scheme], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"NNCF quantisation failed (exit {done.returncode}):\n{tail}")
    return ov.Core().read_model(str(tmp / "int8.xml"))


def _quantize_files(src: str, dst: str, calibration: str, scheme: str) -> None:
    """The child process of `_quantize`: `src` IR quantised on the .npy batches in `calibration` -> `dst`."""
    import logging

    import nncf
    import numpy as np
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.WARNING)
    batches = [np.load(p, allow_pickle=False) for p in sorted(Path(calibration).glob("*.npy"))]
    kwargs: dict[str, Any] = {"subset_size": len(batches)}
    if scheme == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    else:
        kwargs["preset"] = nncf.QuantizationPreset.PERFORMANCE
    model = nncf.quantize(ov.Core().read_model(src), nncf.Dataset(batches), **kwargs)
    ov.save_model(model, dst, compress_to_fp16=False)


def calibration_batches(source: str | os.PathLike, pretrained_cfg: dict[str, Any], limit: int = 300,
                        batch_size: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    """The INT8 calibration images: `source` is a folder (its images, searched recursively, as `hybridvit
    predict` finds them; at most `limit`, spread evenly over the sorted list) or "digits" (the embedded
    training split), each through the model's eval preprocessing (`pretrained_cfg`). Returns the
    normalised batches and the unreadable files, which are skipped; none readable is a DataError."""
    from .data.digits import DIGITS_NAME, DigitsDataset
    from .data.folder import DataError
    from .data.transforms import Preprocess

    pre = Preprocess.from_cfg(pretrained_cfg)
    images, failed = [], []
    if str(source) == DIGITS_NAME:
        ds = DigitsDataset("train")
        picks = _spread(len(ds), limit)
        images = [pre(ds.load(i)) for i in picks]
    else:
        from .data.folder import find_images, read_image

        files = find_images([str(source)])
        for i in _spread(len(files), limit):
            try:
                images.append(read_image(files[i], pre))
            except DataError:
                failed.append(files[i])
        if not images:
            raise DataError(f"none of the {len(failed)} calibration image(s) in {source} could be read "
                            f"({', '.join(failed[:3])}): check the files, e.g. open them with PIL")
    batches = [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return batches, failed


def _spread(n: int, limit: int) -> list[int]:
    """`limit` indices spread evenly over range(n) (all of them when n <= limit)."""
    if limit < 1:
        raise ValueError(f"the calibration size must be at least 1, got {limit}")
    return list(range(n)) if n <= limit else [i * n // limit for i in range(limit)]


def _metadata_onnx(path: Path) -> tuple[dict[str, str], Any]:
    ort = _require("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map), sess


def _metadata_openvino(path: Path) -> tuple[dict[str, str], Any]:
    ov = _require("openvino")
    core = ov.Core()
    model = core.read_model(str(path))
    meta = {}
    for key in ("model_name", "num_classes", "class_names", "preprocess", "version", "int8"):
        if model.has_rt_info(["hybridvit", key]):
            meta[f"hybridvit.{key}"] = str(model.get_rt_info(["hybridvit", key]).astype(str))
    return meta, (core, model)


def _check_self_contained(path: Path) -> None:
    """An exported file is untrusted input: refuse what hybridvit never writes before a runtime parses it.

    - an OpenVINO `.xml` must be IR (root element `<net>`) without a document type declaration (entities);
      its weights are the `.bin` of the same name beside it;
    - an ONNX file must hold its weights itself: an initializer with external data (a path the runtime would
      open, possibly outside the file's folder) is refused, whatever the runtime's own path checks.
    """
    if path.suffix == ".xml":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"<?xml"):
            head = head[head.find(b"?>") + 2:].lstrip() if b"?>" in head else b""
        if b"<!DOCTYPE" in head.upper() or b"<!ENTITY" in head.upper() or not head.startswith(b"<net"):
            raise CheckpointError(f"{path} is not an OpenVINO IR file as hybridvit writes it (root element <net>, "
                                  "no document type declaration): export it again with hybridvit export")
        if not path.with_suffix(".bin").is_file():
            raise CheckpointError(f"{path}: its weights {path.with_suffix('.bin').name} are missing beside it")
        return
    try:
        import onnx
    except ImportError:  # onnxruntime alone: its own checks refuse external paths outside the folder
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's parse errors
        why = printable(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CheckpointError(f"{path} is not a readable ONNX file ({why}): export it again with hybridvit "
                              "export") from e
    external = [t.name for t in _onnx_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise CheckpointError(f"{path} holds tensor {printable(external[0])} with external data, which hybridvit "
                              "never writes (its ONNX files are self-contained): export it again with hybridvit "
                              "export")


def _onnx_tensors(graph: Any):
    """Every tensor an ONNX graph holds: initializers (sparse ones too), tensor attributes, and those of the
    subgraphs its nodes carry (If / Loop / Scan bodies), at any depth."""
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)


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
        _check_self_contained(path)
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
        self.int8 = meta.get("hybridvit.int8") is not None  # quantised by export --int8 (NNCF)
        self.load_note = f"{self.model_name} exported to {path} ({self.runtime}{', int8' if self.int8 else ''})"
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
    """`model` exported to `runtime` (onnxruntime, openvino, openvino-int8) in `folder`, loaded back as an ExportedModel
    that remembers the PyTorch model for its MAC count (`macs_source`)."""
    folder = Path(folder)
    if runtime == "onnxruntime":
        path = export_onnx(model, folder / f"{model.model_name}.onnx", img_size)
    elif runtime == "openvino":
        path = export_openvino(model, folder / f"{model.model_name}.xml", img_size)
    elif runtime == "openvino-int8":  # calibrated on noise: the speed of the int8 graph, not its accuracy
        g = torch.Generator().manual_seed(0)
        noise = [torch.randn(1, model.in_chans, *img_size, generator=g) for _ in range(16)]
        path = export_openvino(model, folder / f"{model.model_name}_int8.xml", img_size, calibration=noise)
    else:
        raise ValueError(f"unknown runtime {runtime!r}; one of torch, compile, onnxruntime, openvino, openvino-int8")
    exported = ExportedModel(path, precision=precision)
    exported.macs_source = model
    return exported
