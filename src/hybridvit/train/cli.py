"""`hybridvit train`: train or fine-tune a model; no arguments trains on the embedded digits dataset."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
import typing

from ..errors import printable
from ..options import AMP_MEANING
from ..precision import AMP_CHOICES
from .config import FIELDS, TrainConfig, help_default

_SKIP = {"recipe", "source"}
_HELP = {
    "model": "model name (`hybridvit models` lists them)",
    "data": "ImageNet-layout folder ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*) or 'digits' (the "
            "embedded digits)",
    "train_split": "sub-folder of --data with the training images",
    "val_split": "sub-folder of --data with the validation images",
    "num_classes": "classes the model predicts",
    "pretrained": "'true' for the published weights, a checkpoint file (.pth, .pt, .safetensors), a hybridvit "
                  "run or Hub folder (then the head is reset to --num-classes where it differs)",
    "img_size": "input side in pixels",
    "drop_path_rate": "stochastic depth (drop path) rate",
    "resume": "run folder (or its last.pt) of an interrupted run (Ctrl-C and SIGTERM write one): continues "
              "exactly where it stopped. Only --epochs (the cosine schedule spreads over the new total), --lr and "
              "--checkpoint-every (and --device/--threads/--workers/--progress/--plot) may change; other options "
              "that differ from the run are refused",
    "output": "output folder; a folder holding a run is refused unless --overwrite or --resume",
    "overwrite": "replace the run already in --output (its files are deleted first)",
    "seed": "random seed (weights, data order, augmentation)",
    "epochs": "training epochs",
    "batch_size": "images per batch and process",
    "accum_steps": "micro-batches accumulated per optimizer step",
    "opt": "optimizer: adamw, lamb or sgd",
    "lr": "peak learning rate (at global batch --lr-base-size when given)",
    "lr_base_size": "global batch at which --lr holds; the rate scales linearly with the global batch",
    "min_lr": "learning rate at the end of the cosine schedule",
    "warmup_lr": "learning rate at the start of the warm-up",
    "warmup_epochs": "epochs of linear warm-up to --lr",
    "cooldown_epochs": "final epochs at --min-lr",
    "weight_decay": "weight decay",
    "opt_betas": "Adam betas",
    "opt_eps": "optimizer epsilon",
    "momentum": "SGD momentum",
    "clip_grad": "clip the gradient norm to this value",
    "smoothing": "label smoothing",
    "scale": "random-resized-crop area range (fraction of the image)",
    "ratio": "random-resized-crop aspect-ratio range",
    "hflip": "probability of a horizontal flip",
    "randaugment": "timm-style RandAugment spec, e.g. rand-m9-mstd0.5-inc1; 'none' to switch off",
    "reprob": "random-erasing probability",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "mixup_prob": "probability of mixup or cutmix per batch",
    "mixup_switch_prob": "probability of cutmix instead of mixup when both are on",
    "train_interpolation": "resize interpolation of the training crops (bilinear, bicubic, ...; 'random' as in "
                           "timm)",
    "model_ema": "keep an exponential moving average of the weights (validated and saved beside them)",
    "model_ema_decay": "decay of the weight average",
    "mesa": "weight of MESA, FasterViT's self-distillation from the EMA teacher: the loss adds mesa x 50 x "
            "KL(log_softmax(student / 3), softmax(teacher / 3)); 0 is off; needs --model-ema",
    "mesa_start_ratio": "MESA starts once epoch / epochs exceeds this share of training",
    "device": "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N",
    "amp": "precision. " + AMP_MEANING,
    "channels_last": "channels_last memory format",
    "compile": "torch.compile the model",
    "threads": "CPU threads for the model, per process (the embedded run uses 1: its small operations gain "
               "nothing from more, and lose much when the cores are shared)",
    "workers": "processes per training process that decode images in parallel",
    "checkpoint_every": "also write last.pt every N optimizer steps (0: at the end of each epoch)",
    "strict_data": "fail on a corrupt image instead of skipping it",
    "progress": "progress bars",
    "plot": "write the loss and accuracy curves (metrics.png; needs matplotlib)",
    "max_steps_per_epoch": "cut each epoch to at most N steps (smoke tests)",
}
# the short forms every command shares (`-m/--model`, `-o/--output`, `-b/--batch-size`)
_SHORT = {"model": "-m", "output": "-o", "batch_size": "-b"}
# plain switches: --overwrite is asked for, never switched off
_SWITCHES = {"overwrite"}


def _base_type(tp):
    """int for `int | None`, bool for `bool | None`..."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="published recipe name (see --list-recipes) or a .toml file; "
                   "command-line options override its values")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    hints = typing.get_type_hints(TrainConfig)
    for name in FIELDS:
        if name in _SKIP:
            continue
        flags = ("--" + name.replace("_", "-"), *([_SHORT[name]] if name in _SHORT else []))
        flag = flags[0]
        tp = _base_type(hints[name])
        help_text = f"{_HELP[name]} ({help_default(name)})"
        if name in _SWITCHES:
            p.add_argument(*flags, action="store_true", default=None, help=help_text)
        elif tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is tuple:
            p.add_argument(flag, type=float, nargs=2, default=None, metavar=("A", "B"), help=help_text)
        elif name == "amp":  # as every command defines it (options.add_amp), default from the recipe
            p.add_argument(flag, default=None, metavar="{" + ",".join(AMP_CHOICES) + "}", help=help_text)
        else:
            p.add_argument(*flags, type=tp if tp in (int, float) else str, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .config import default_recipe, make_config

    values = {name: getattr(args, name) for name in FIELDS if name not in _SKIP and hasattr(args, name)}
    if values.get("randaugment") in ("none", "None", ""):
        values["randaugment"] = ""
    recipe = args.recipe
    if recipe is None and not args.resume:  # digits, small-data for small folders, else the defaults
        recipe = default_recipe(values.get("data"), values.get("train_split") or "train")
    cfg = make_config(recipe, **values)
    if cfg.randaugment == "":
        cfg.randaugment = None
    return cfg


def best_line(summary: dict) -> str:
    """'best val top-1 99.44% at epoch 21 of 30': the epoch of the best checkpoint, not the last one."""
    best = f"best val top-1 {summary['val_top1']:.2f}%"
    if summary.get("best_epoch"):
        return f"{best} at epoch {summary['best_epoch']} of {summary['epochs']}"
    return f"{best} in {summary['epochs']} epochs"


def run(args: argparse.Namespace) -> int:
    from .config import list_recipes, load_recipe

    if args.list_recipes:
        for name in list_recipes():
            r = load_recipe(name)
            print(f"{name:<24} model {r.get('model', '-'):<22} {r.get('source', '')}")
        return 0
    missing = [m for m in ("kornia", "tqdm", "PIL", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"`hybridvit train` needs the train extra ({', '.join(missing)} missing): "
                         "pip install 'hybridvit[train]'")
    from .engine import TrainingInterrupted, train

    given = {name for name in FIELDS if name not in _SKIP and getattr(args, name, None) is not None}
    if args.recipe:
        given.add("recipe")
    try:
        summary = train(config_from_args(args), given)
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: no traceback
        print("\ninterrupted: nothing saved since the last checkpoint (if any, continue with "
              "`hybridvit train --resume RUN_FOLDER`)", file=sys.stderr)
        return 130
    if summary.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(f"{best_line(summary)} ({summary['wall_time_s']:.0f} s)")
        print(f"checkpoint: {printable(summary['checkpoint'], None)}")
        print(f"summary:    {printable(summary['output'], None)}/summary.json")
    return 0
