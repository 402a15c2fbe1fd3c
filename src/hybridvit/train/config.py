"""Training configuration: defaults < recipe file (`--recipe NAME` or a .toml path) < command line.

Without `--recipe`, the recipe follows the data (`default_recipe`): `digits` for the embedded
default run, `small-data` for folders of fewer than SMALL_DATA_IMAGES training images (ImageNet
recipes' heavy augmentation keeps such runs at chance), none (the ImageNet-style defaults below)
for larger folders. An explicit `--lr` is used as given, as in timm: recipes' linear scaling with
the global batch (`lr_base_size`) applies only to their own lr, or with an explicit `--lr-base-size`.
"""
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
    overwrite: bool = False              # replace the run already in --output (else refused)
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
    # MESA (FasterViT's official training): self-distillation from the EMA teacher after a share of training
    mesa: float = 0.0                    # weight of the MESA loss (0: off); needs --model-ema
    mesa_start_ratio: float = 0.25       # MESA starts once epoch / epochs exceeds this
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
    if path.suffix == ".toml" or len(path.parts) > 1:  # a file, not a shipped name
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {name_or_path} not found (looked for {path.resolve()}); pass an "
                                    "existing .toml file, or a shipped recipe name (`hybridvit train "
                                    "--list-recipes`)")
    else:
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
    """defaults < recipe < overrides (None values in overrides are ignored).

    recipe None: `default_recipe` of the data (digits, small-data or none), except when resuming (the
    stored configuration is complete). An `lr` among the overrides without an `lr_base_size` is
    absolute: the recipe's batch scaling is dropped (timm's behaviour: --lr as given, scaling only
    for the recipe's own base lr)."""
    if recipe is None and not overrides.get("resume"):
        recipe = default_recipe(overrides.get("data") or FIELDS["data"].default,
                                overrides.get("train_split") or FIELDS["train_split"].default)
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
    given = {k: v for k, v in overrides.items() if v is not None}
    if "lr" in given and "lr_base_size" not in given:
        values.pop("lr_base_size", None)
    values.update(given)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(unknown)}")
    for k in ("scale", "ratio", "opt_betas"):
        if k in values:
            values[k] = tuple(values[k])
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg


# option -> (smallest allowed value, whether the bound itself is allowed)
_BOUNDS = {"img_size": (1, True), "epochs": (1, True), "batch_size": (1, True), "accum_steps": (1, True),
           "lr": (0.0, False), "min_lr": (0.0, True), "warmup_lr": (0.0, True), "warmup_epochs": (0.0, True),
           "cooldown_epochs": (0.0, True), "weight_decay": (0.0, True), "smoothing": (0.0, True),
           "threads": (1, True), "workers": (0, True), "checkpoint_every": (0, True),
           "max_steps_per_epoch": (1, True), "lr_base_size": (1, True), "num_classes": (1, True),
           "drop_path_rate": (0.0, True), "reprob": (0.0, True), "mixup": (0.0, True), "cutmix": (0.0, True)}


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the option (as spelled on the command line) when a value is out of range."""
    for name, (low, inclusive) in _BOUNDS.items():
        v = getattr(cfg, name)
        if v is None:
            continue
        if v < low or (v == low and not inclusive):
            bound = f"at least {low}" if inclusive else f"above {low}"
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {v}")
    for name in ("smoothing", "reprob", "drop_path_rate", "mixup_prob", "hflip", "mesa_start_ratio"):
        if getattr(cfg, name) is not None and not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(cfg, name)}")
    if cfg.mesa < 0:
        raise ValueError(f"--mesa must be at least 0, got {cfg.mesa}")
    if cfg.mesa > 0 and not cfg.model_ema:
        raise ValueError(f"--mesa {cfg.mesa} distils from the EMA model, which this run does not keep: add "
                         "--model-ema (the FasterViT recipes have it), or pass --mesa 0 to train without MESA")


# folders with fewer training images than this train with the `small-data` recipe by default
SMALL_DATA_IMAGES = 5000


def count_images(data: str, split: str = "train", limit: int | None = None) -> int:
    """Image files under DATA/SPLIT/<class>/ (stops counting at `limit`); 0 when the folder is missing."""
    from ..data.folder import IMAGE_EXTENSIONS

    root = Path(data) / split
    if not root.is_dir():
        return 0
    n = 0
    for p in root.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            n += 1
            if limit is not None and n >= limit:
                break
    return n


def default_recipe(data: str | None, train_split: str = "train") -> str | None:
    """The recipe a run without `--recipe` uses: 'digits' for the embedded default data, 'small-data'
    for a folder of fewer than SMALL_DATA_IMAGES training images, else None (the built-in defaults)."""
    from ..data.loader import is_digits

    if is_digits(data):
        return "digits"
    if data and count_images(data, train_split, limit=SMALL_DATA_IMAGES) < SMALL_DATA_IMAGES:
        return "small-data"
    return None


def scaled_lr(cfg: TrainConfig, global_batch: int) -> tuple[float, float, float, str]:
    """(lr, min_lr, warmup_lr, note): the rates used at `global_batch` (linear scaling from
    `lr_base_size` when set) and a note for the training header saying how lr was obtained."""
    if not cfg.lr_base_size:
        return cfg.lr, cfg.min_lr, cfg.warmup_lr, f"lr {cfg.lr:.3g}"
    f = global_batch / cfg.lr_base_size
    note = (f"lr {cfg.lr:.3g} at batch {cfg.lr_base_size} -> {cfg.lr * f:.3g} at batch {global_batch} "
            "(linear scaling; an explicit --lr is used as given)")
    return cfg.lr * f, cfg.min_lr * f, cfg.warmup_lr * f, note


def run_header(cfg: TrainConfig, threads: str, global_batch: int, n_train: int | None = None) -> str:
    """The part of the training header that says which settings apply and why: the recipe (and why it
    was chosen), the augmentation in force, the learning rate and the CPU thread plan."""
    if cfg.recipe == "small-data" and n_train is not None:
        recipe = f"recipe small-data ({n_train} training images < {SMALL_DATA_IMAGES})"
    else:
        recipe = f"recipe {cfg.recipe}" if cfg.recipe else "built-in defaults"
    aug = [f"{k} {getattr(cfg, k):g}" for k in ("mixup", "cutmix", "reprob") if getattr(cfg, k)]
    aug += [f"randaugment {cfg.randaugment}"] if cfg.randaugment else []
    plain = "random crops" + (" and flips" if cfg.hflip else "") + " only"
    return (f"{recipe}, augmentation: {', '.join(aug) if aug else plain}, "
            f"{scaled_lr(cfg, global_batch)[3]}, {threads}")


# what an unset option means, as `train --help` says it
NONE_MEANS = {"num_classes": "the number of class folders", "pretrained": "random initial weights",
              "img_size": "the model's input size", "drop_path_rate": "the model's own",
              "output": "runs/<model>-<timestamp>", "resume": "a new run", "lr_base_size": "no scaling",
              "clip_grad": "no clipping", "randaugment": "off", "train_interpolation": "the model's interpolation",
              "channels_last": "on for CUDA", "threads": "planned from the CPUs",
              "workers": "planned from the CPUs", "max_steps_per_epoch": "whole epochs"}


def help_default(name: str) -> str:
    """The default of option `name` as `train --help` should state it: the value the default run
    (embedded digits) uses, and the small-folder and large-folder values where those differ."""
    base = FIELDS[name].default
    base = None if base is dataclasses.MISSING else base
    digits = load_recipe("digits").get(name, base)
    small = load_recipe("small-data").get(name, base)

    def fmt(v: Any) -> str:
        if v in (None, ""):
            return NONE_MEANS.get(name, "off")
        if isinstance(v, bool):
            return "on" if v else "off"
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    if fmt(digits) == fmt(small) == fmt(base):
        return f"default {fmt(base)}"
    if fmt(digits) == fmt(small):
        return (f"default {fmt(digits)} for the embedded digits and folders under {SMALL_DATA_IMAGES} images, "
                f"{fmt(base)} for larger folders")
    return (f"default {fmt(digits)} for the embedded digits, {fmt(small)} for folders under "
            f"{SMALL_DATA_IMAGES} images (recipe small-data), {fmt(base)} for larger ones")
