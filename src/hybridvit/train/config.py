"""Training configuration: defaults < recipe file (`--recipe NAME` or a .toml path) < command line."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "fastervit_nano"


@dataclass
class TrainConfig:
    """Every option of `hybridvit train` (the command line spells them --like-this)."""

    # model and data
    model: str = DEFAULT_MODEL
    data: str = "digits"                 # ImageNet-layout folder ROOT (ROOT/train, ROOT/val) or 'digits'
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None       # default: number of class folders
    pretrained: str | None = None        # 'true' (published weights) or a checkpoint path
    img_size: int | None = None          # model input size (default: the model's pretrained_cfg)
    drop_path_rate: float | None = None  # default: the model's own
    output: str | None = None            # default: runs/<model>-<timestamp>
    resume: str | None = None            # run folder (or its last.pt) to continue exactly
    seed: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 64                 # per process, per micro-batch
    accum_steps: int = 1                 # gradient accumulation: optimizer step every N micro-batches
    opt: str = "adamw"                   # adamw | lamb | sgd
    lr: float = 2e-3                     # peak learning rate at global batch lr_base_size
    lr_base_size: int | None = None      # lr scales linearly with global batch / lr_base_size (None: no scaling)
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    cooldown_epochs: float = 0.0         # final epochs at min_lr
    weight_decay: float = 0.05
    opt_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    momentum: float = 0.9
    clip_grad: float | None = 5.0
    smoothing: float = 0.1
    # augmentation
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    train_interpolation: str | None = None  # default: the model's interpolation; 'random' as timm
    # model EMA
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # hardware
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    amp: str = "auto"                    # auto (bf16 on GPUs that have it, else off) | bf16 | fp16 | none
    channels_last: bool | None = None    # default: on for CUDA
    compile: bool = False
    threads: int | None = None           # torch CPU threads per process (default: torch's choice)
    workers: int | None = None           # DataLoader workers per process (default: 0 for digits, else 4)
    # bookkeeping
    checkpoint_every: int = 0            # also write last.pt every N optimizer steps (0: once per epoch)
    strict_data: bool = False            # corrupt images are an error instead of skipped
    progress: bool = True
    plot: bool = True
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    # recipe provenance (informational)
    recipe: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def recipes_dir() -> Path:
    return Path(str(resources.files("hybridvit") / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The values of a recipe: a name shipped with the package (`fastervit_0`) or a .toml file."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = recipes_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            import difflib
            close = difflib.get_close_matches(name_or_path, list_recipes(), n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown recipe {name_or_path!r}.{hint} Recipes: {', '.join(list_recipes())}")
    with open(path, "rb") as f:
        values = tomllib.load(f)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"recipe {path} has unknown keys: {', '.join(unknown)}")
    values.setdefault("recipe", path.stem)
    return values


def make_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """defaults < recipe < overrides (None values in overrides are ignored)."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(unknown)}")
    for k in ("scale", "ratio", "opt_betas"):
        if k in values:
            values[k] = tuple(values[k])
    return TrainConfig(**values)
