"""`hybridvit` command line: models, train, eval, predict, bench, export, analyze."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ._stop import hard_stop, stop_line

# subcommand -> module providing add_arguments(parser) and run(args) -> int
_COMMANDS = {
    "models": ("hybridvit.cli", "List registered models with parameters, GMACs and published top-1."),
    "train": ("hybridvit.train.cli", "Train or fine-tune a model (no arguments: the embedded default)."),
    "eval": ("hybridvit.inference.evaluate", "Top-1/top-5 of a checkpoint or an exported .onnx/.xml file on an "
             "image folder."),
    "predict": ("hybridvit.inference.predict", "Top-k classes for image files, from a checkpoint or an exported "
                ".onnx/.xml file."),
    "bench": ("hybridvit.bench", "Throughput, latency, memory and FLOP/s of models."),
    "export": ("hybridvit.export", "Export a model for deployment: ONNX, OpenVINO IR (.xml + .bin), or a "
               "torch.export program (.pt2)."),
    "analyze": ("hybridvit.analysis", "Analyse a model (activations, attention, complexity)."),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'fastervit_*'")
    p.add_argument("--no-macs", action="store_true", help="skip the GMACs count (faster)")
    from .options import add_json, add_overwrite
    add_json(p, "the table")
    add_overwrite(p, "the --json file")


def model_row(name: str, with_macs: bool = True) -> dict:
    from .flops import count_macs
    from .registry import count_params, get_entry, meta_model

    entry = get_entry(name)
    model = meta_model(name)
    row = {"name": name, "family": entry.family, "params_m": round(count_params(model) / 1e6, 2),
           "gmacs": None, "img_size": model.pretrained_cfg["input_size"][-1], "top1": entry.top1,
           "weights": "download" if entry.url else ("by hand" if entry.published else "-"),
           "license": entry.license}
    if with_macs:  # one image at the model's input size, on the meta device (instant)
        row["gmacs"] = round(count_macs(model) / 1e9, 2)
    return row


def run(args: argparse.Namespace) -> int:
    from ._io import check_output_file, write_json
    from .registry import list_models

    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    names = list_models(args.pattern)
    if not names and not any(ch in args.pattern for ch in "*?["):
        from .registry import get_entry
        names = [get_entry(args.pattern).name]  # an official name's model; else the error lists close names
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = [model_row(n, not args.no_macs) for n in names]
    header = f"{'model':<24}{'family':<13}{'params (M)':>11}{'GMACs':>9}{'size':>6}{'top-1':>7}  {'weights':<10}license"
    print(header)
    print("-" * len(header))
    for r in rows:
        macs = "-" if r["gmacs"] is None else f"{r['gmacs']:.2f}"
        top1 = "-" if r["top1"] is None else f"{r['top1']:.1f}"
        print(f"{r['name']:<24}{r['family']:<13}{r['params_m']:>11.2f}{macs:>9}{r['img_size']:>6}{top1:>7}"
              f"  {r['weights']:<10}{r['license']}")
    if args.json:
        write_json(args.json, rows)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; only `command`'s module is imported (all of them when
    `command` is None), so that a missing extra breaks only the commands that need it."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="hybridvit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hybridvit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def _command_in(argv: list[str]) -> str:
    """The subcommand named in `argv` ('' for none): the first word that is one."""
    return next((a for a in argv if a in _COMMANDS), "")


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can act on; None for a bug (traceback)."""
    import errno

    if isinstance(e, ModuleNotFoundError) and e.name:
        from .extras import install_hint

        hint = install_hint(e.name)
        return f"{e.name} is not installed: {hint}" if hint else None
    if isinstance(e, (ValueError, FileNotFoundError, FloatingPointError)):
        return str(e)
    # a file system refusing a write that no check foresaw (a quota, a file system turned read-only)
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                                              errno.EISDIR, errno.ENOSPC, errno.EDQUOT):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{os.strerror(e.errno)}"
    return None


# commands that trace models (torch.export, the ONNX exporter, torch.compile): a signal there ends the process
# at once (`_stop.hard_stop`), as an exception raised inside PyTorch's C++ callbacks would abort it
_HARD_STOP = {"export", "bench"}


class Terminated(BaseException):
    """SIGTERM outside training's own handling (which writes last.pt first): stop with exit 143."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """`hybridvit ...`: runs one subcommand; user errors print one `error: ...` line and return 2
    (`hybridvit --debug ...` shows the traceback instead). Ctrl-C stops with one line and exit 130, SIGTERM
    with exit 143 (training first writes a resumable last.pt)."""
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index(_command_in(argv))] if _command_in(argv) else "--debug" in argv
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _terminate)
    try:
        parser = build_parser(_command_in(argv))
        args = parser.parse_args(argv)
        args._argv = argv  # the command as given, for result files
        if args.command is None:
            parser.print_help()
            return 0
        if args.command in _HARD_STOP and not debug:
            with hard_stop(args.command):
                return int(args._run(args) or 0)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{stop_line(signal.SIGINT, _command_in(argv) or '')}", file=sys.stderr)
        return 130
    except Terminated as e:
        if debug:
            raise
        print(f"\n{stop_line(e.signum, _command_in(argv) or '')}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        msg = _user_error(e)
        if debug or msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
