"""`hybridvit` command line: models, train, eval, predict, bench, export, analyze."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# subcommand -> module providing add_arguments(parser) and run(args) -> int
_COMMANDS = {
    "models": ("hybridvit.cli", "List registered models with parameters, GMACs and published top-1."),
    "train": ("hybridvit.train.cli", "Train or fine-tune a model (no arguments: the embedded default)."),
    "eval": ("hybridvit.train.cli_eval", "Top-1/top-5 of a checkpoint on an image folder."),
    "predict": ("hybridvit.train.cli_predict", "Top-k classes for image files."),
    "bench": ("hybridvit.bench", "Throughput, latency, memory and FLOP/s of models."),
    "export": ("hybridvit.export", "Export a model to ONNX or TorchScript."),
    "analyze": ("hybridvit.analysis", "Analyse a model (activations, attention, complexity)."),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'fastervit_*'")
    p.add_argument("--no-macs", action="store_true", help="skip the GMACs count (faster)")
    p.add_argument("--json", metavar="OUT", help="also write the table to this JSON file")


def model_row(name: str, with_macs: bool = True) -> dict:
    from .flops import count_macs
    from .registry import count_params, get_entry, meta_model

    entry = get_entry(name)
    model = meta_model(name)
    row = {"name": name, "family": entry.family, "params_m": round(count_params(model) / 1e6, 2),
           "gmacs": None, "img_size": model.pretrained_cfg["input_size"][-1], "top1": entry.top1,
           "weights": "download" if entry.url else ("by hand" if entry.published else "-")}
    if with_macs:  # one image at the model's input size, on the meta device (instant)
        row["gmacs"] = round(count_macs(model) / 1e9, 2)
    return row


def run(args: argparse.Namespace) -> int:
    from .registry import list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = [model_row(n, not args.no_macs) for n in names]
    header = f"{'model':<24}{'family':<13}{'params (M)':>11}{'GMACs':>9}{'size':>6}{'top-1':>7}  weights"
    print(header)
    print("-" * len(header))
    for r in rows:
        macs = "-" if r["gmacs"] is None else f"{r['gmacs']:.2f}"
        top1 = "-" if r["top1"] is None else f"{r['top1']:.1f}"
        print(f"{r['name']:<24}{r['family']:<13}{r['params_m']:>11.2f}{macs:>9}{r['img_size']:>6}{top1:>7}"
              f"  {r['weights']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not module.startswith(e.name or "\0"):
                raise
            p.set_defaults(_unavailable=True)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for result files
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", False):
        print(f"`hybridvit {args.command}` is not available in this version", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
