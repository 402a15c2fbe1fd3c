"""`hybridvit analyze`: the papers' analyses as commands, for any model and any image.

- `hybridvit analyze --model M`: per-stage parameters/GMACs and per-block output RMS (a text table);
- `analyze attention`: attention maps of a query location per stage (FasterViT: carrier attention and
  each window's share to its carriers; CabViT: share of attention to digest tokens);
- `analyze distance`: average attended distance per block in input pixels, one line per model;
- `analyze amplitude`: max and mean |x| of every block output (`--no-acl`: CrossFormer++ without its
  amplitude cooling layers);
- `analyze pareto --results FILE...`: throughput vs published top-1 from `hybridvit bench --json` files.

Each subcommand writes PNG, SVG and JSON into --output DIR (figures need matplotlib, in the train extra).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .complexity import analyze
from .plotting import AnalysisError

__all__ = ["analyze", "AnalysisError", "add_arguments", "run"]

_SUBCOMMANDS = {
    "attention": "Attention maps of a query location per stage, carrier/digest attention shares.",
    "distance": "Average attended distance per block (input pixels), one line per --model.",
    "amplitude": "Max and mean |x| of every block output; --no-acl for CrossFormer++.",
    "pareto": "Throughput vs published top-1 from `hybridvit bench --json` files.",
}


_SIZE_DEFAULT = "the run's, else the model's; analyses run at SIZE x SIZE"
# the file stems each analysis writes into --output (STEM.png, STEM.svg, STEM.json)
_STEMS = {"attention": ("attention", "carriers", "digest"), "distance": ("distance",),
          "amplitude": ("amplitude",), "pareto": ("pareto",)}


class _InOrder(argparse._AppendAction):
    """Appends like action='append' and also records the order of -m and --pretrained in `_given`, so that
    `--pretrained A -m B --pretrained C` pairs B with C and lets A name its own model."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        given = list(getattr(namespace, "_given", None) or [])
        namespace._given = given + [(self.dest, values)]


def _pairs(given: list[tuple[str, str]]) -> list[tuple[str | None, str | None]]:
    """(model, pretrained) per --pretrained, in command-line order: each -m belongs to the --pretrained after
    it; a --pretrained without one names its model (a run checkpoint does); a -m left over gets random weights."""
    pairs, name = [], None
    for dest, value in given:
        if dest == "pretrained":
            pairs.append((name, value))
            name = None
        else:
            if name is not None:
                pairs.append((name, None))
            name = value
    if name is not None:
        pairs.append((name, None))
    return pairs


def _model_options(p: argparse.ArgumentParser, several: bool) -> None:
    from .. import options

    # SUPPRESS: values given before the subcommand (`analyze -m M attention`) are kept
    more = " (repeat for one line per model)" if several else ""
    options.add_model(p, "model name (default: the one a hybridvit run checkpoint names)" + more, action=_InOrder,
                      default=argparse.SUPPRESS)
    p.add_argument("--pretrained", action=_InOrder, default=argparse.SUPPRESS,
                   help="'true' (published weights), an official checkpoint file, a hybridvit run checkpoint or "
                        "run folder; default random weights" + (" (one per --model, in order; 'none' for random; "
                                                                "a run checkpoint needs no -m before it)"
                                                                if several else ""))
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or folders, 'digits' (default) or 'random'")
    options.add_img_size(p, default=argparse.SUPPRESS, whose=_SIZE_DEFAULT)
    p.add_argument("--num-images", type=int, default=8, help="images averaged over (default: 8)")
    options.add_threads(p, default=argparse.SUPPRESS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import options

    options.add_model(p, "model name (the complexity table without a subcommand)", default=None)
    options.add_pretrained(p, options.PRETRAINED_SOURCES + "; default random weights", default=None)
    options.add_img_size(p, whose=_SIZE_DEFAULT)
    options.add_json(p, "the complexity table")
    options.add_overwrite(p, "the --json file, or the files an analysis writes into --output")
    options.add_threads(p)
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    for name, help_text in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        options.add_output(sp, f"output folder: {', '.join(s + '.{png,svg,json}' for s in _STEMS[name])} are written "
                           f"there (default: analysis/{name})", default=f"analysis/{name}")
        options.add_overwrite(sp, "the files of this analysis in --output", default=argparse.SUPPRESS)
        if name == "pareto":
            sp.add_argument("--results", nargs="+", required=True, metavar="FILE",
                            help="result files of `hybridvit bench --json`")
            continue
        _model_options(sp, several=name != "attention")
        if name == "attention":
            sp.add_argument("--query", type=float, nargs=2, metavar=("Y", "X"), default=None,
                            help="query location in input pixels (default: the centre)")
        if name == "amplitude":
            sp.add_argument("--no-acl", action="store_true",
                            help="also measure CrossFormer++ with its amplitude cooling layers bypassed")


def _as_list(v: object) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _models_and_inputs(args: argparse.Namespace, several: bool):
    """[(model, normalised input), ...], displayable images and names (of the first model's input)."""
    from ..runtime import check_img_size
    from .load import load_images, load_model

    names, pretrained = _as_list(args.model), _as_list(args.pretrained)
    given = getattr(args, "_given", None) or []
    if len(pretrained) > len(names) >= 1 and len([d for d, _ in given if d == "model"]) == len(names):
        # some --pretrained name their model, others follow their -m: pair them in command-line order
        names, pretrained = [list(t) for t in zip(*_pairs(given))]
    if not names:
        names = [None] * max(1, len(pretrained))
    if not several and len(names) > 1:
        raise AnalysisError(f"`analyze {args.analysis}` takes one --model (got {', '.join(map(str, names))})")
    if len(pretrained) not in (0, 1, len(names)) or (len(pretrained) == 1 and len(names) > 1):
        raise AnalysisError(f"give --pretrained once per --model, in order ({len(names)} models, "
                            f"{len(pretrained)} --pretrained); 'none' means random weights")
    pretrained = pretrained or [None] * len(names)
    size = args.img_size
    runs, shown, labels = [], None, None
    for name, pre in zip(names, pretrained):
        if name:
            check_img_size(name, size)  # before a checkpoint is read
        model = load_model(name, pre, size)
        check_img_size(model.model_name, size)
        x, disp, names_ = load_images(args.images, model, args.num_images)
        runs.append((model, x))
        if shown is None:
            shown, labels = disp, names_
    return runs, shown, labels


def run(args: argparse.Namespace) -> int:
    from .._io import check_new_files, check_output_dir, check_output_file
    from ..options import check_positive
    from ..runtime import check_img_size, plan_threads
    from . import complexity

    check_positive(args, "img_size", "threads", "num_images")
    if getattr(args, "json", None):
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    if args.analysis is not None:
        check_output_dir(args.output, "--output", create=False)
        check_new_files([Path(args.output) / f"{stem}.{ext}" for stem in _STEMS[args.analysis]
                         for ext in ("png", "svg", "json")], "--output", args.overwrite)
    plan_threads("analyze", threads=args.threads).apply()
    if args.analysis is None:
        if not args.model and not args.pretrained:
            raise AnalysisError("`hybridvit analyze` needs --model M or --pretrained RUN (the complexity table) "
                                "or an analysis: "
                                + ", ".join(_SUBCOMMANDS))
        if isinstance(args.model, list):
            args.model = args.model[0]
        if args.model:
            check_img_size(args.model, args.img_size)
        if args.img_size:
            args.img_size = [args.img_size, args.img_size]
        return complexity.run_table(args)
    out = Path(args.output)
    if args.analysis == "pareto":
        from .pareto import run_pareto
        data = run_pareto(args.results, out)
        print(f"{len(data['points'])} measured variants; Pareto front: {', '.join(data['pareto_front'])}")
    elif args.analysis == "attention":
        from .attention import run_attention
        runs, shown, labels = _models_and_inputs(args, several=False)
        (model, x), = runs
        data = run_attention(model, x, shown, labels, out, tuple(args.query) if args.query else None)
        for b in data["blocks"]:
            extra = "".join(f", {k.replace('_', ' ')} {100 * b[k]:.1f}%" for k in ("carrier_share", "digest_share")
                            if k in b)
            print(f"{b['block']:<28} {b['kind']:<7} distance {b['distance_px']:6.2f} px{extra}")
    elif args.analysis == "distance":
        from .distance import run_distance
        runs, _, _ = _models_and_inputs(args, several=True)
        data = run_distance(runs, out)
        for m in data["models"]:
            print(f"{m['model']}:")
            for b in m["blocks"]:
                print(f"  {b['module']:<32} {b['kind']:<8} {b['distance_px']:7.2f} px")
    else:
        from .amplitude import run_amplitude
        runs, _, _ = _models_and_inputs(args, several=True)
        data = run_amplitude(runs, out, args.no_acl)
        for m in data["models"]:
            print(f"{m['model']}: block max |x| " + " ".join(f"{b['max_abs']:.3g}" for b in m["blocks"]))
            if "blocks_no_acl" in m:
                print("  without ACL:      " + " ".join(f"{b['max_abs']:.3g}" for b in m["blocks_no_acl"]))
    from ..errors import printable
    print("wrote " + ", ".join(printable(f, None) for f in data["files"]))
    return 0
