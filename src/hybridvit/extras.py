"""The one table of optional packages: which extra of hybridvit installs each (pyproject.toml's
[project.optional-dependencies]), and `require`, which imports one or says what to install. A leaf module."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# top-level import name -> the extra that installs it
EXTRAS: dict[str, str] = {
    "kornia": "train", "tqdm": "train", "sklearn": "train", "matplotlib": "train", "PIL": "predict",
    "safetensors": "safetensors", "timm": "timm", "huggingface_hub": "hub",
    "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "openvino": "openvino", "nncf": "int8",
}


def install_hint(module: str) -> str | None:
    """`pip install 'hybridvit[EXTRA]'` for an optional package (its top-level name), None for any other."""
    extra = EXTRAS.get(module.split(".")[0])
    return f"pip install 'hybridvit[{extra}]'" if extra else None


def require(module: str, load: bool = True) -> Any:
    """`module` imported (with load=False only found, not imported); a ModuleNotFoundError naming the extra
    to install when it is missing."""
    try:
        if not load:
            if importlib.util.find_spec(module) is None:
                raise ImportError(module)
            return None
        return importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(f"{module} is needed here: {install_hint(module) or 'pip install ' + module}",
                                  name=module) from e
