"""Hugging Face Hub / timm folder layout: `model.safetensors` + `config.json`.

`save_pretrained(model, dir)` writes the layout timm's `push_to_hf_hub` writes, so the folder (or a Hub
repository holding it) loads, through `hybridvit.loading`, with `hybridvit.create_model(pretrained=DIR)`,
`create_model("hf-hub:ORG/REPO")` and, with timm installed, `timm.create_model("hf-hub:ORG/REPO",
pretrained=True)` after `import hybridvit`::

    config.json = {"architecture": "fastervit_0", "num_classes": 10, "num_features": 512,
                   "global_pool": "avg", "model_args": {"img_size": 64}, "label_names": ["cat", ...],
                   "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [...], ...}}

Weights are read and written as safetensors only: nothing on the Hub path is unpickled, and no code
from the folder runs. Remote repositories go through the optional `huggingface_hub` package
(`pip install 'hybridvit[hub]'`) into its standard cache (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .errors import CheckpointError
from .extras import install_hint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_HUB_PREFIX = "hf-hub:"



# --------------------------------------------------------------------------------------------- writing
def _jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively (JSON has no tuples); anything else JSON cannot hold is refused."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{value!r} ({type(value).__name__}) cannot be stored in config.json")


def hub_config(model: nn.Module, *, model_name: str | None = None,
               class_names: list[str] | None = None) -> dict[str, Any]:
    """The config.json of `model`: architecture, num_classes, num_features, model_args (the create_model
    overrides that rebuild it, plus in_chans when not 3), label_names and pretrained_cfg (timm's fields)."""
    name = model_name or getattr(model, "model_name", None)
    if not name:
        raise ValueError("save_pretrained needs the registered model name: build the model with "
                         "hybridvit.create_model or pass model_name='fastervit_0' (say)")
    args = dict(getattr(model, "model_kwargs", None) or {})
    in_chans = int(getattr(model, "in_chans", 3))
    if in_chans != 3:
        args["in_chans"] = in_chans
    classes = class_names if class_names is not None else getattr(model, "class_names", None)
    num_classes = int(getattr(model, "num_classes", 0))
    if classes is not None:
        classes = [str(c) for c in classes]
        if num_classes and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for a model with {num_classes} classes")
    pcfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items()
            # where the weights came from does not describe the folder's weights
            if k not in ("url", "file", "hf_hub_id", "source", "state_dict", "label_names", "num_classes",
                         "architecture", "tag")}
    pcfg["num_classes"] = num_classes
    try:
        cfg = {
            "architecture": name,
            "num_classes": num_classes,
            "num_features": int(getattr(model, "num_features", 0)),
            "global_pool": "avg",
            "model_args": _jsonable(args),
            "pretrained_cfg": _jsonable(pcfg),
        }
    except TypeError as e:
        raise ValueError(f"save_pretrained: {e}; model_kwargs and pretrained_cfg must be JSON values") from e
    if classes is not None:
        cfg["label_names"] = classes
    cfg["hybridvit_version"] = __version__
    return cfg


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, model_name: str | None = None,
                    class_names: list[str] | None = None) -> Path:
    """Writes `model.safetensors` (the state dict, float tensors as they are), `config.json` and a model
    card `README.md` (architecture, licence of the weights, classes, preprocessing, usage) into
    `save_directory` (created if needed) and returns the folder. Class names come from `class_names`
    or `model.class_names`; the rebuild arguments from `model.model_kwargs` (set by create_model)."""
    from safetensors.torch import save_file

    if getattr(model, "is_fused", False):
        raise ValueError("save_pretrained: this model was fused for inference (model.fuse()), so its weights no "
                         "longer match the architecture config.json describes. Save the unfused model; fuse after "
                         "loading it (hybridvit.load_model(DIR).fuse())")
    cfg = hub_config(model, model_name=model_name, class_names=class_names)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (views, tied weights) and wants contiguous data
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    num_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(_model_card(cfg, None, num_params=num_params))
    return out


# Hub licence ids of the weights' licences (`pretrained_cfg["license"]`, set per family in hybridvit.models)
_HUB_LICENSES = {"mit": ("mit", None), "apache-2.0": ("apache-2.0", None),
                 "nvidia-source-code-license-nc": ("other", "https://github.com/NVlabs/FasterViT/blob/main/LICENSE"),
                 "unspecified": ("unknown", None)}


def _model_card(cfg: dict[str, Any], repo_id: str | None, num_params: int | None = None) -> str:
    """README.md of a Hub folder, after timm's model cards: front matter (library, licence of the weights,
    tags), the architecture and its paper and code, the classes, the preprocessing and how to load it."""
    arch, pcfg = cfg["architecture"], cfg.get("pretrained_cfg", {})
    licence = str(pcfg.get("license", "unspecified"))
    hub_licence, link = _HUB_LICENSES.get(licence, ("other", None))
    classes = cfg.get("label_names")
    source = f"hf-hub:{repo_id}" if repo_id else "/path/to/this/folder"
    front = ["---", "library_name: timm", f"license: {hub_licence}"]
    if hub_licence == "other":
        front += [f"license_name: {licence}"] + ([f"license_link: {link}"] if link else [])
    front += ["tags:", "- image-classification", "- timm", "- hybridvit", "---", ""]
    size = pcfg.get("input_size", [3, 224, 224])
    args = cfg.get("model_args") or {}
    paper = str(pcfg.get("paper_ids", ""))
    lines = [f"# {repo_id or arch}", "",
             f"A `{arch}` image classifier saved by hybridvit's `save_pretrained`.", "",
             "## Model details", "",
             f"- **Architecture:** `{arch}`" + (f" with `{json.dumps(args)}`" if args else "") +
             (f", {num_params / 1e6:.2f} M parameters" if num_params else ""),
             f"- **Classes:** {cfg['num_classes']}, {cfg.get('num_features', '?')} features before the classifier",
             f"- **Licence of the weights:** {licence}" +
             (" (the licence of the published weights and the official code this architecture comes from; "
              "weights fine-tuned from them inherit it)" if licence != "unspecified" else
              " (the official repository states none)"),
             f"- **Paper:** {paper}" + (f" (https://arxiv.org/abs/{paper.split(':', 1)[1]})"
                                       if paper.startswith("arXiv:") else ""),
             f"- **Official code:** {pcfg.get('origin_url', 'unknown')}", ""]
    if classes:
        shown = ", ".join(f"`{c}`" for c in classes[:100]) + (" ..." if len(classes) > 100 else "")
        lines += ["## Classes", "", f"{len(classes)} classes, index order: {shown}", ""]
    lines += ["## Preprocessing", "",
              f"- input size: {size[-2]}x{size[-1]}, {size[0]} channels (any other size works too)",
              f"- resize: {pcfg.get('interpolation', 'bicubic')}, crop_pct {pcfg.get('crop_pct')}, "
              f"crop_mode {pcfg.get('crop_mode', 'center')}",
              f"- normalise: mean {tuple(pcfg.get('mean', ()))}, std {tuple(pcfg.get('std', ()))}", "",
              "## Usage", "", "```python", "import hybridvit", "",
              f'model = hybridvit.create_model("{source}").eval()   # the classes are model.class_names', "",
              "# or through timm, after `import hybridvit`", "import timm",
              f'model = timm.create_model("{source if repo_id else "local-dir:/path/to/this/folder"}", '
              'pretrained=True).eval()',
              "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))", "```", ""]
    return "\n".join(front + lines)


def push_to_hub(model: nn.Module, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None, commit_message: str = "Add hybridvit model",
                model_card: bool = True) -> str:
    """Uploads `save_pretrained`'s folder (plus a README model card) to the Hub repository `repo_id`
    (created if missing) and returns the commit URL. Needs a token with write access: `token=`, the
    `HF_TOKEN` variable or `hf auth login`."""
    HfApi = _hub_api("HfApi")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, tmp)
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        if model_card:  # the card names the repository
            num_params = sum(p.numel() for p in model.parameters())
            (folder / "README.md").write_text(_model_card(cfg, repo_id, num_params=num_params))
        else:
            (folder / "README.md").unlink()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, repo_type="model")
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------- reading
def is_folder(path: Any) -> bool:
    """True for a directory holding config.json (a save_pretrained / Hub folder)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def is_hub_source(path: Any) -> bool:
    """True for `hf-hub:ORG/REPO` or a save_pretrained folder: what `load_folder` reads."""
    return (isinstance(path, str) and path.startswith(HF_HUB_PREFIX)) or is_folder(path)


# config.json nests a few levels (model_args, pretrained_cfg, their lists); deeper is not a config, and Python's
# json parser would fail on it with a RecursionError
MAX_JSON_DEPTH = 32


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of the JSON `text` nest (0: a scalar), counted without recursion."""
    import re

    depth = deepest = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', text):  # brackets inside strings do not count
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a config.json; errors name the file and the keys that are missing or wrong."""
    from .errors import printable

    path = Path(path)
    try:
        text = path.read_text()
        if json_depth(text) > MAX_JSON_DEPTH:
            raise CheckpointError(f"{printable(path, None)} nests its values {json_depth(text)} levels deep (a "
                                  f"config.json has a few, at most {MAX_JSON_DEPTH}): it is not a hybridvit config; "
                                  "write the folder again with hybridvit.save_pretrained")
        cfg = json.loads(text)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{printable(path, None)} is not valid JSON ({printable(e)}); write the folder "
                              "again with hybridvit.save_pretrained") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} holds a JSON {type(cfg).__name__}, expected an object")
    problems = []
    if not isinstance(cfg.get("architecture"), str):
        problems.append("'architecture' (the model name) is missing or not a string")
    if "num_classes" in cfg and not (isinstance(cfg["num_classes"], int) and cfg["num_classes"] >= 0):
        problems.append(f"'num_classes' must be a non-negative integer, got {cfg['num_classes']!r}")
    for key in ("model_args", "pretrained_cfg"):
        if key in cfg and not isinstance(cfg[key], dict):
            problems.append(f"'{key}' must be an object, got {type(cfg[key]).__name__}")
    labels = cfg.get("label_names")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(c, str) for c in labels)):
        problems.append("'label_names' must be a list of strings")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return cfg


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """model.safetensors -> state dict; a missing, truncated or foreign file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a hybridvit Hub folder holds {WEIGHTS_NAME} next to "
                              f"{CONFIG_NAME} (pickle files are not read on this path)")
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                              "corrupt: download or save it again") from e


def _hub_api(name: str) -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(f"'hf-hub:' models need huggingface_hub: {install_hint('huggingface_hub')}") from e
    return getattr(huggingface_hub, name)


def download(repo: str, filename: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """One file of `ORG/REPO[@revision]` through huggingface_hub into its cache; a local path back."""
    hf_hub_download = _hub_api("hf_hub_download")
    from huggingface_hub import errors

    repo_id, _, revision = repo.partition("@")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir))
    except errors.RepositoryNotFoundError as e:
        raise CheckpointError(f"Hub repository {repo_id!r} not found (or private: log in with `hf auth login` "
                              "or set HF_TOKEN)") from e
    except errors.RevisionNotFoundError as e:
        raise CheckpointError(f"Hub repository {repo_id!r} has no revision {revision!r}") from e
    except errors.EntryNotFoundError as e:
        raise CheckpointError(f"Hub repository {repo!r} has no {filename}: is it a hybridvit/timm model folder "
                              f"(save_pretrained writes {CONFIG_NAME} and {WEIGHTS_NAME})?") from e
    except (errors.LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"could not fetch {filename} of {repo!r} ({e}). Without internet, copy the "
                              "folder here and pass pretrained='/path/to/folder', or set HF_HUB_OFFLINE=1 "
                              "to use the files already in the Hugging Face cache") from e


def resolve(source: str, *, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path, str]:
    """(config.json path, model.safetensors path, description) of a folder or an `hf-hub:` id."""
    if source.startswith(HF_HUB_PREFIX):
        repo = source[len(HF_HUB_PREFIX):]
        if repo.count("/") != 1 or not all(repo.split("@")[0].split("/")):
            raise ValueError(f"{source!r}: expected 'hf-hub:ORG/REPO' (optionally '@revision')")
        config = download(repo, CONFIG_NAME, cache_dir=cache_dir)
        read_config(config)  # a bad config fails before the (large) weights download
        return config, download(repo, WEIGHTS_NAME, cache_dir=cache_dir), source
    folder = Path(source)
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME, str(folder)
