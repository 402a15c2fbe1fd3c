"""The model and images an analysis runs on: ONE model loader (`load_model`) and the image batch."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .plotting import AnalysisError


def load_model(name: str | None, pretrained: str | None = None, img_size: int | None = None) -> nn.Module:
    """The model to analyse, in eval mode, with `model_name`, `pretrained_cfg` (input size, preprocessing)
    and `class_names` (a hybridvit run's classes, else None), loaded like every other command loads
    (`hybridvit.loading.load_for_command`).

    pretrained: None/'none' (random weights), 'true' (the published weights), an official checkpoint file
    (needs `name`), or a hybridvit run checkpoint or run folder (knows its model, classes and size).
    img_size: the input side to analyse at (default: the model's or the run's).
    """
    from ..loading import load_for_command
    from ..models._variant import with_input_size

    spec = None if pretrained is None or str(pretrained).lower() in ("none", "false", "") else str(pretrained)
    if spec is not None and spec.lower() != "true" and not Path(spec).exists():
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist: pass a file, a run folder, 'true' "
                                "for the published weights, or leave --pretrained out for random weights")
    if spec is None and not name:
        raise AnalysisError("--model is needed (or --pretrained RUN); `hybridvit models` lists the models")
    model = load_for_command(spec, name)
    if img_size:  # the size to analyse at; the model keeps its configured size
        model.pretrained_cfg = with_input_size(model.pretrained_cfg, model.in_chans, img_size)
    return model.eval()


def default_images(model: nn.Module) -> list[str]:
    """The images an analysis takes when none are named: a run's own validation images (said in one line);
    for random weights the embedded digits (or noise without the train extra); for other trained weights
    an error asking for images (digits through a photo model would measure nothing)."""
    import importlib.util

    trained = getattr(model, "trained_on", None)
    if trained:
        if trained["data"] == "digits":
            return ["digits"]
        from ..data.loader import split_folder
        folder = str(split_folder(trained["data"], trained["val_split"]))
        print(f"images: {folder}, the validation folder recorded in the run (pass IMAGE ... for others)")
        return [folder]
    if getattr(model, "weights_source", "none") not in ("none", None):
        raise AnalysisError(f"pass the images to analyse (files or folders, 'digits' or 'random'): "
                            f"{model.model_name}'s weights ({getattr(model, 'load_note', 'trained weights')}) come "
                            "with no record of their data")
    return ["digits" if importlib.util.find_spec("sklearn") and importlib.util.find_spec("PIL") else "random"]


def load_images(sources: list[str], model: nn.Module, num_images: int = 8,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(normalised input (B, C, S, S), displayable uint8 (B, 3, S, S), names) at the model's input size.

    sources: image files and/or folders (searched recursively), 'digits' (the embedded digits, the
    default when empty and scikit-learn is installed) or 'random' (Gaussian noise, the fallback).
    """

    cfg = model.pretrained_cfg
    size = int(cfg["input_size"][-1])
    if not sources:
        sources = default_images(model)
    if sources == ["random"]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(num_images, model.in_chans, size, size, generator=g)
        shown = ((x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)) * 40 + 128).clamp(0, 255)
        return x, shown.to(torch.uint8), [f"random-{i}" for i in range(num_images)]
    from ..data.transforms import Preprocess

    pre = Preprocess.from_cfg(cfg)
    tf = pre.geometry
    pil, names = [], []
    for src in sources:
        if src == "digits":
            from ..data.digits import DigitsDataset
            ds = DigitsDataset("val")
            pil += [ds.load(i) for i in range(num_images)]
            names += [f"digits-val-{i}" for i in range(num_images)]
            continue
        path = Path(src)
        if path.is_dir():
            from ..data.folder import IMAGE_EXTENSIONS
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise FileNotFoundError(f"image folder {src!r} holds no images (expected .jpg, .png, ...)")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"image {src!r} does not exist: pass image files, a folder, 'digits' or "
                                    "'random'")
        for f in files[:max(0, num_images - len(pil))]:
            from ..data.decode import decode_image
            try:
                pil.append(decode_image(f))
            except (OSError, SyntaxError, ValueError) as e:
                raise AnalysisError(f"cannot read image {f}: {e}") from e
            names.append(str(f))
    pil, names = pil[:num_images], names[:num_images]
    shown = torch.stack([tf(im) for im in pil])
    x = pre.normalize(shown)
    if model.in_chans != 3:
        raise AnalysisError(f"{model.model_name} takes {model.in_chans}-channel input: use 'random' images")
    return x, shown, names
