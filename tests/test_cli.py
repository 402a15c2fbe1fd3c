"""`hybridvit models` and the command-line entry point: shared options, help texts, imports per command, and
user errors that are one line saying what to do."""
import json
import sys

import pytest
from _helpers import user_error

import hybridvit
from hybridvit.cli import main
from hybridvit.registry import count_params, meta_model


def test_models_table_lists_every_family(tmp_path, capsys):
    out = tmp_path / "models.json"
    assert main(["models", "--no-macs", "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == set(hybridvit.list_models())
    assert {r["family"] for r in rows.values()} == {"fastervit", "crossformer", "cabvit"}
    assert len([n for n in rows if n.startswith("crossformer")]) == 8
    assert rows["fastervit_0"]["top1"] == 82.1 and rows["fastervit_0"]["weights"] == "download"
    assert rows["crossformer_s"]["weights"] == "by hand" and rows["cabvit_h_l2"]["weights"] == "-"
    # the weights' terms: FasterViT's are NVIDIA's non-commercial licence, CrossFormer's MIT
    assert rows["fastervit_0"]["license"] == "nvidia-source-code-license-nc"
    assert rows["crossformerpp_s"]["license"] == "mit"
    assert rows["crossformerpp_s"]["params_m"] == round(count_params(meta_model("crossformerpp_s")) / 1e6, 2)
    assert "cabvit_h_l2" in capsys.readouterr().out


def test_models_counts_macs_at_the_default_size(tmp_path):
    out = tmp_path / "m.json"
    assert main(["models", "fastervit_0", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert 3.0 < row["gmacs"] < 4.0  # the paper reports 3.3 GFLOPs (MACs) for FasterViT-0 at 224


def test_unknown_pattern_and_model_errors():
    assert main(["models", "nothing_*"]) == 1
    with pytest.raises(ValueError, match="Did you mean: crossformerpp_s"):
        hybridvit.create_model("crossformer_pp_s")


@pytest.mark.slow  # a Python subprocess
def test_version_and_help_import_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"hybridvit {hybridvit.__version__}"
    assert main([]) == 0 and "predict" in capsys.readouterr().out
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "hybridvit", "--version"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"hybridvit {hybridvit.__version__}"


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from hybridvit.checkpoint import CheckpointError

    missing = str(tmp_path / "nope.pt")
    assert main(["eval", "--pretrained", missing]) == 2
    err = capsys.readouterr().err
    assert err == f"error: checkpoint file {missing!r} does not exist\n"
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["--debug", "eval", "--pretrained", missing])
    assert main(["export", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "pass --model NAME" in capsys.readouterr().err


_BLOCKER = """
import sys
BLOCK = set(sys.argv[1].split(","))
for name in BLOCK:  # a None entry makes `import name` fail as if not installed (find_spec gives None)
    sys.modules[name] = None
from hybridvit.cli import main
rc = main(sys.argv[2:])
leaked = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in BLOCK and mod is not None)
assert not leaked, leaked
sys.exit(rc)
"""
_TRAIN_EXTRA = "kornia,tqdm,sklearn,matplotlib,onnx,onnxruntime,onnxscript,safetensors,timm"


def _run_without(blocked: str, *args: str):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", _BLOCKER, blocked, *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def _blue_red_run(path):
    """A run checkpoint of fastervit_nano at 32 px for the classes blue and red (random weights)."""
    import torch

    from hybridvit.checkpoint import make_run_checkpoint

    model = hybridvit.create_model("fastervit_nano", num_classes=2, img_size=32)
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 32}, num_classes=2,
                                   class_names=["blue", "red"], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), path)
    return path


@pytest.mark.slow  # a Python subprocess per command
def test_commands_import_only_what_they_need(tmp_path):
    """`models` works with every extra missing; eval and predict need torch and pillow only; a missing
    package is one error line that says what to install."""
    from _imagedata import make_folder

    root = make_folder(tmp_path / "data", n_train=1, n_val=2)
    ckpt = _blue_red_run(tmp_path / "run.pt")
    r = _run_without(_TRAIN_EXTRA + ",PIL", "models", "--no-macs", "fastervit_*")
    assert r.returncode == 0 and "fastervit_nano" in r.stdout, r.stderr
    r = _run_without(_TRAIN_EXTRA, "eval", "--pretrained", str(ckpt), "--data", str(root), "--no-progress")
    assert r.returncode == 0 and "(4 images)" in r.stdout, r.stderr
    img = str(root / "val" / "red" / "000.png")
    r = _run_without(_TRAIN_EXTRA, "predict", "--pretrained", str(ckpt), img)
    assert r.returncode == 0 and r.stdout.startswith(img) and "blue" in r.stdout, r.stderr
    r = _run_without(_TRAIN_EXTRA + ",PIL", "predict", "--pretrained", str(ckpt), img)
    assert r.returncode == 2 and r.stderr == "error: PIL is not installed: pip install 'hybridvit[predict]'\n"
    r = _run_without(_TRAIN_EXTRA, "train", "--epochs", "1")
    assert r.returncode == 2 and "pip install 'hybridvit[train]'" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- one command line (issue 19)
_COMMANDS = ["train", "eval", "predict", "bench", "export", "analyze"]


def _subparser(command: str):
    from hybridvit.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


def _option(parser, flag: str):
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _all_parsers(command: str):
    """The parser of `command` and those of its own subcommands (analyze attention, ...)."""
    p = _subparser(command)
    out = [p]
    for a in p._actions:
        if a.dest == "analysis":
            out += list(a.choices.values())
    return out


def test_shared_options_are_the_same_on_every_command():
    from hybridvit.precision import AMP_CHOICES

    amp = {c: _option(_subparser(c), "--amp") for c in _COMMANDS if c != "analyze"}
    assert all(a is not None for a in amp.values())
    assert {a.metavar for a in amp.values()} == {"{" + ",".join(AMP_CHOICES) + "}"}
    for c in _COMMANDS:
        assert _option(_subparser(c), "--threads") is not None, c
    for c in ("train", "eval", "predict", "bench"):
        for flag in ("--device", "--batch-size", "--img-size"):
            assert _option(_subparser(c), flag) is not None, (c, flag)
    for c in ("train", "eval", "predict"):
        assert _option(_subparser(c), "--no-progress") is not None, c
    for c in ("eval", "predict", "bench", "analyze"):
        assert _option(_subparser(c), "--json") is not None, c
    # the same help text wherever an option means the same
    assert len({_option(_subparser(c), "--device").help for c in ("eval", "predict", "bench")}) == 1
    assert len({_option(_subparser(c), "--amp").help for c in ("eval", "predict", "bench")}) == 1


@pytest.mark.parametrize("command", ["eval", "predict", "bench", "export"])
def test_an_unknown_amp_is_one_error_line_everywhere(command, capsys, tmp_path):
    argv = {"eval": ["eval", "--pretrained", "x.pt"], "predict": ["predict", "--pretrained", "x.pt", "a.png"],
            "bench": ["bench", "-m", "fastervit_nano"], "export": ["export", "-m", "fastervit_nano", "-o",
                                                                   str(tmp_path / "m.onnx")]}[command]
    assert main([*argv, "--amp", "fp8"]) == 2
    assert capsys.readouterr().err == ("error: unknown precision --amp 'fp8': choose one of auto, none, bf16, "
                                       "fp16\n")


def test_analyze_has_one_img_size():
    sizes = [_option(p, "--img-size") for p in _all_parsers("analyze")]
    sizes = [a for a in sizes if a is not None]
    assert len(sizes) >= 4 and {(a.nargs, a.type, a.help) for a in sizes} == {(None, int, sizes[0].help)}


def test_help_texts_speak_to_users():
    for c in _COMMANDS:
        for p in _all_parsers(c):
            text = p.format_help()
            assert "runtime." not in text and "plan_threads" not in text, c
            assert "default none" not in text and "(default none)" not in text, (c, p.prog)
    export = _subparser("export").format_help()
    assert "torch.export program" in export and "TorchScript" not in export
    from hybridvit.cli import _COMMANDS as commands
    assert "TorchScript" not in commands["export"][1]
    train = _subparser("train").format_help()
    assert "the model's input size" in " ".join(train.split())


def test_top5_is_left_out_for_five_classes_or_fewer():
    import torch

    from hybridvit.inference.evaluate import evaluate

    class Fixed(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.num_classes, self.n = n, n

        def forward(self, x):
            return torch.arange(self.n, dtype=torch.float32).expand(x.shape[0], -1)

    batch = {"images": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "targets": torch.tensor([0, 1, 2, 2]),
             "bad": ["broken.png"]}
    small = evaluate(Fixed(3), [batch], torch.device("cpu"))
    assert small["top5"] is None and small["top1"] == 50.0 and small["skipped"] == ["broken.png"]
    big = evaluate(Fixed(10), [batch], torch.device("cpu"))
    assert big["top5"] == 0.0  # the fixed model ranks classes 9..5 first: none of the targets
    empty = evaluate(Fixed(3), [{**batch, "images": torch.empty(0), "targets": torch.empty(0, dtype=torch.long)}],
                     torch.device("cpu"))
    assert empty["images"] == 0


def test_name_suggestions_handle_case_and_look_alike_characters():
    for typo, want in (("fastervit_O", "fastervit_0"), ("FasterViT_0", "fastervit_0"),
                       ("crossformerpp-s", "crossformerpp_s"), ("cabvit_h_Ll", "cabvit_h_l1")):
        # (crossformer-t is an official name now, an alias of crossformer_t: no longer a typo)
        with pytest.raises(ValueError) as e:
            hybridvit.create_model(typo)
        assert str(e.value).split("Did you mean: ")[1].startswith(want), str(e.value)


def test_eval_of_a_folder_without_a_readable_image_is_an_error(tmp_path, capsys):
    from _imagedata import make_folder

    pytest.importorskip("PIL", reason="needs pillow")
    root = make_folder(tmp_path / "data", n_train=1, n_val=2)
    ckpt = _blue_red_run(tmp_path / "run.pt")
    broken = sorted((root / "val").rglob("*.png"))
    broken[0].write_bytes(b"not an image")
    res = tmp_path / "eval.json"
    argv = ["eval", "--pretrained", str(ckpt), "--data", str(root), "--no-progress", "--workers", "0"]
    assert main([*argv, "--json", str(res)]) == 0
    out, err = capsys.readouterr()
    assert "(3 images, 1 unreadable skipped)" in out and "top-5" not in out
    assert f"warning: skipped unreadable image {broken[0]}" in err
    assert json.loads(res.read_text())["skipped_images"] == [str(broken[0])]
    for f in broken:
        f.write_bytes(b"not an image")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: no image of {root / 'val'} could be read (4 unreadable")


def test_troubleshooting_page_lines_are_what_the_commands_print(tmp_path, capsys, monkeypatch):
    """Each message docs/troubleshooting.md quotes (`…` standing for paths and names) is
    printed by the command it describes, run here."""
    import os
    import re
    import shutil
    from pathlib import Path

    from _imagedata import make_folder

    from hybridvit import _io
    from hybridvit.cli import Terminated
    from hybridvit.inference import evaluate as evaluate_mod

    pytest.importorskip("PIL", reason="needs pillow")
    pytest.importorskip("kornia", reason="the training checks need the train extra")
    printed = []

    def run(*argv: str) -> None:
        main(list(argv))
        out, err = capsys.readouterr()
        printed.append(out + err)

    one = make_folder(tmp_path / "one", n_train=2, n_val=1)
    shutil.rmtree(one / "train" / "red")
    shutil.rmtree(one / "val" / "red")
    run("train", "--data", str(one), "--no-progress", "--output", str(tmp_path / "r1"))
    bad = make_folder(tmp_path / "bad", n_train=2, n_val=1)
    for f in (bad / "val").rglob("*.png"):
        f.write_bytes(b"x")
    run("train", "--data", str(bad), "--no-progress", "--output", str(tmp_path / "r2"))
    unk = make_folder(tmp_path / "unk", n_train=2, n_val=1)
    (unk / "val" / "green").mkdir()
    (unk / "val" / "red" / "000.png").rename(unk / "val" / "green" / "000.png")
    run("train", "--data", str(unk), "--no-progress", "--output", str(tmp_path / "r3"))
    ckpt = _blue_red_run(tmp_path / "run.pt")
    ev = make_folder(tmp_path / "ev", n_train=1, n_val=2)
    (ev / "val" / "red" / "000.png").write_bytes(b"x")
    run("eval", "--pretrained", str(ckpt), "--data", str(ev), "--no-progress", "--workers", "0")
    for f in (ev / "val").rglob("*.png"):
        f.write_bytes(b"x")
    run("eval", "--pretrained", str(ckpt), "--data", str(ev), "--no-progress", "--workers", "0")
    (tmp_path / "afile").write_text("x")
    run("export", "-m", "fastervit_nano", "-o", str(tmp_path / "afile" / "m.onnx"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: emulate a user's permission check
        monkeypatch.setattr(_io.os, "access", lambda p, m, *a, **k: Path(p) != ro)
    run("models", "fastervit_0", "--no-macs", "--json", str(ro / "m.json"))
    monkeypatch.undo()
    ro.chmod(0o755)
    table = tmp_path / "m.json"
    run("models", "fastervit_0", "--no-macs", "--json", str(table))

    def full(path):
        raise OSError(28, os.strerror(28))
    monkeypatch.setattr(_io, "_open", full)
    run("models", "fastervit_0", "--no-macs", "--json", str(table), "--overwrite")
    monkeypatch.undo()
    from hybridvit.train.engine import TrainingInterrupted
    printed.append(str(TrainingInterrupted(15, tmp_path / "run", 0, 3, 8)))
    for exc in (KeyboardInterrupt(), Terminated(15)):
        def stop(args, exc=exc):
            raise exc
        monkeypatch.setattr(evaluate_mod, "run", stop)
        run("eval", "--pretrained", str(ckpt))
    monkeypatch.undo()
    run("eval", "--pretrained", str(ckpt), "--amp", "fp8")
    run("models", "fastervit_O")
    text = "\n".join(printed)

    section = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    spans = [a or b for a, b in re.findall(r"``(.+?)``|`([^`]+)`", section, flags=re.S)]
    quoted = [" ".join(s.split()) for s in spans
              if s.startswith(("error:", "warning:", "interrupted", "stopped by", "SIGTERM:"))]
    assert len(quoted) >= 12
    for q in quoted:
        pattern = "[^\n]*?".join(re.escape(piece) for piece in q.split("…"))
        assert re.search(pattern, text), f"docs/troubleshooting.md quotes {q!r}, but no command printed it:\n{text}"


# ------------------------------------------------------------- one-line errors
def test_bench_unknown_model_lists_close_names(capsys):
    msg = user_error(["bench", "-m", "fastervit_nano", "--compare", "fastervit_9", "--warmup", "0"], capsys)
    assert "fastervit_9" in msg and "Did you mean" in msg


def test_compare_with_timm_without_timm_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    msg = user_error(["bench", "-m", "fastervit_nano", "--compare", "timm:resnet18"], capsys)
    assert "pip install 'hybridvit[timm]'" in msg


@pytest.mark.parametrize("size", ["0", "-3"])
def test_bad_image_size_is_refused_up_front(size, capsys, tmp_path):
    assert "--img-size" in user_error(["bench", "-m", "fastervit_nano", "--img-size", size], capsys)
    assert "--img-size" in user_error(["export", "-m", "fastervit_nano", "--img-size", size, "-o",
                                       str(tmp_path / "m.onnx")], capsys)


# ------------------------------------------------- one grammar for every command (issue 31, item 2)
# the options several commands share: the same flags (short and long) wherever they exist
_SHARED = {"model": {"-m", "--model"}, "output": {"-o", "--output"}, "pretrained": {"--pretrained"},
           "img_size": {"--img-size"}, "threads": {"--threads"}, "workers": {"--workers"}, "amp": {"--amp"},
           "json": {"--json"}, "overwrite": {"--overwrite"}, "batch_size": {"-b", "--batch-size"},
           "device": {"--device"}, "num_classes": {"--num-classes"}}


def _every_parser():
    """(name, parser) of the top-level parser and of every command and nested subcommand (analyze distance)."""
    import argparse

    from hybridvit.cli import build_parser

    todo, out = [("hybridvit", build_parser())], []
    while todo:
        name, p = todo.pop()
        out.append((name, p))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", sp) for sub, sp in a.choices.items()]
    return out


def _options(p):
    import argparse
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_the_parser_walk_reaches_every_command_and_analysis():
    names = {n for n, _ in _every_parser()}
    assert {"hybridvit models", "hybridvit train", "hybridvit eval", "hybridvit predict", "hybridvit bench",
            "hybridvit export", "hybridvit analyze", "hybridvit analyze attention", "hybridvit analyze distance",
            "hybridvit analyze amplitude", "hybridvit analyze pareto"} <= names


def test_every_option_has_help_and_states_its_default_once():
    import re

    for name, p in _every_parser():
        for a in _options(p) + [a for a in p._actions if not a.option_strings and a.dest != "command"
                                and a.dest != "analysis"]:
            assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest}: no help text"
            shown = a.help % {"default": a.default, "prog": p.prog} if "%(" in a.help else a.help
            assert len(re.findall(r"\(default\b", shown)) <= 1, f"{name} {a.option_strings}: {shown!r}"
        text = " ".join(p.format_help().split())
        assert "(default) (default" not in text and "(default digits) (default" not in text, name


def test_shared_options_have_the_same_flags_on_every_command():
    seen: dict[str, set] = {}
    for name, p in _every_parser():
        for a in _options(p):
            if a.dest in _SHARED:
                assert set(a.option_strings) == _SHARED[a.dest], (name, a.option_strings)
                seen.setdefault(a.dest, set()).add(name)
    assert set(seen) == set(_SHARED)
    for c in ("train", "eval", "predict", "bench", "export", "analyze", "analyze distance"):
        assert f"hybridvit {c}" in seen["model"], c
    assert "hybridvit predict" in seen["workers"] and "hybridvit eval" in seen["workers"]


def test_every_command_that_writes_a_file_has_overwrite():
    for name, p in _every_parser():
        dests = {a.dest for a in _options(p)}
        if dests & {"json", "output"}:
            assert "overwrite" in dests, f"{name} writes a file but has no --overwrite"


def test_eval_and_predict_take_m_and_say_they_run_exported_files():
    from hybridvit.cli import _COMMANDS, build_parser

    args = build_parser("eval").parse_args(["eval", "-m", "fastervit_nano", "--pretrained", "x.pth"])
    assert args.model == "fastervit_nano"
    args = build_parser("predict").parse_args(["predict", "-m", "fastervit_nano", "--pretrained", "x.pth",
                                               "--workers", "2", "a.png"])
    assert args.model == "fastervit_nano" and args.workers == 2
    for c in ("eval", "predict"):
        assert ".onnx" in _option(_subparser(c), "--pretrained").help
        assert ".xml" in _option(_subparser(c), "--pretrained").help
    assert "OpenVINO" in _COMMANDS["export"][1] and "ONNX" in _COMMANDS["export"][1]
    assert "torch.export program" in _COMMANDS["export"][1]


def test_an_existing_output_file_is_refused_without_overwrite(tmp_path, capsys):
    from _helpers import error_line

    table = tmp_path / "t.json"
    table.write_text("keep")
    line = error_line(["models", "fastervit_0", "--no-macs", "--json", str(table)], capsys)
    assert line == f"error: --json {table} exists: pass --overwrite to replace it, or choose another name"
    assert table.read_text() == "keep"
    assert main(["models", "fastervit_0", "--no-macs", "--json", str(table), "--overwrite"]) == 0
    assert json.loads(table.read_text())[0]["name"] == "fastervit_0"
    onnx = tmp_path / "m.onnx"
    onnx.write_text("keep")
    for argv in (["export", "-m", "fastervit_nano", "-o", str(onnx)],
                 ["bench", "-m", "fastervit_nano", "--json", str(onnx)],
                 ["eval", "--pretrained", "x.pt", "--json", str(onnx)],
                 ["predict", "--pretrained", "x.pt", "a.png", "--json", str(onnx)],
                 ["analyze", "-m", "fastervit_nano", "--json", str(onnx)]):
        assert "pass --overwrite" in error_line(argv, capsys), argv
    assert onnx.read_text() == "keep"
    out = tmp_path / "an"
    out.mkdir()
    (out / "distance.json").write_text("keep")
    assert "pass --overwrite" in error_line(["analyze", "distance", "-m", "fastervit_nano", "-o", str(out)], capsys)


def test_analyze_distance_pairs_each_m_with_the_pretrained_after_it(monkeypatch):
    import types

    from hybridvit.analysis import _models_and_inputs, _pairs
    from hybridvit.analysis import load as load_mod
    from hybridvit.cli import build_parser

    assert _pairs([("pretrained", "A"), ("model", "B"), ("pretrained", "C")]) == [(None, "A"), ("B", "C")]
    assert _pairs([("model", "B"), ("model", "D"), ("pretrained", "C")]) == [("B", None), ("D", "C")]
    loaded = []
    monkeypatch.setattr(load_mod, "load_model", lambda name, pre, size: loaded.append((name, pre)) or
                        types.SimpleNamespace(model_name=name or "fastervit_nano"))
    monkeypatch.setattr(load_mod, "load_images", lambda images, model, n: (None, None, None))
    parser = build_parser("analyze")
    for argv, want in ((["--pretrained", "A", "--pretrained", "C"], [(None, "A"), (None, "C")]),
                       (["--pretrained", "A", "-m", "fastervit_nano", "--pretrained", "C"],
                        [(None, "A"), ("fastervit_nano", "C")]),
                       (["-m", "fastervit_nano", "-m", "cabvit_h_l1", "--pretrained", "A", "--pretrained", "C"],
                        [("fastervit_nano", "A"), ("cabvit_h_l1", "C")])):
        loaded.clear()
        _models_and_inputs(parser.parse_args(["analyze", "distance", *argv]), several=True)
        assert loaded == want, argv


def test_a_deeply_nested_hub_config_is_one_error_line(tmp_path, capsys):
    from _helpers import error_line

    folder = tmp_path / "hub"
    hybridvit.save_pretrained(hybridvit.create_model("fastervit_nano", num_classes=2), folder)
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    line = error_line(["eval", "--pretrained", str(folder), "--data", "digits"], capsys)
    assert "config.json nests its values 100000 levels deep" in line
    with pytest.raises(hybridvit.errors.CheckpointError, match="levels deep"):
        hybridvit.load_model(folder)


_ESC = "bad\x1b[31mname\nline"


def test_paths_with_control_characters_are_printed_escaped(tmp_path, capsys):
    from _helpers import run_checkpoint
    from _imagedata import make_folder

    ckpt = run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
    root = make_folder(tmp_path / _ESC, n_train=1, n_val=2)
    assert main(["predict", "--pretrained", str(ckpt), str(root / "val"), "--workers", "1", "--batch-size", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and len(out.splitlines()) == 4 and "bad\\x1b[31mname\\nline" in out
    other = tmp_path / "other" / _ESC
    (other / "green").mkdir(parents=True)
    (root / "val" / "blue" / "000.png").rename(other / "green" / "000.png")
    assert main(["eval", "--pretrained", str(ckpt), "--data", str(other), "--no-progress", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "none of its class folders" in err and "\x1b" not in err and err.count("\n") == 1, err
    from hybridvit.train.stop import TrainingInterrupted
    said = str(TrainingInterrupted(15, tmp_path / _ESC, 0, 3, 8))
    assert "\x1b" not in said and "\n" not in said and "bad\\x1b[31mname\\nline" in said


def test_export_static_batch_says_its_real_input_shape_and_prints_no_exporter_noise(tmp_path, capfd):
    pytest.importorskip("onnxscript", reason="needs the onnx extra")
    out = tmp_path / "m.onnx"
    assert main(["export", "-m", "fastervit_nano", "--img-size", "32", "--static-batch", "-o", str(out)]) == 0
    stdout, stderr = capfd.readouterr()
    assert "input (1, 3, 32, 32)" in stdout and "(B," not in stdout
    assert stdout.count("\n") == 1 and "[torch.onnx]" not in stdout, stdout
    assert "torchvision" not in stderr and "Warning" not in stderr, stderr
    import onnx
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]


def test_training_names_the_epoch_of_its_best_val_top1(tmp_path, capsys):
    pytest.importorskip("kornia", reason="needs the train extra")
    from _helpers import TINY_TRAIN

    from hybridvit.train.cli import best_line

    assert best_line({"val_top1": 99.444, "best_epoch": 21, "epochs": 30}) == "best val top-1 99.44% at epoch 21 of 30"
    out = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--epochs", "3", "--max-steps-per-epoch", "1", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    tops = [r["val_top1"] for r in rows]
    assert summary["best_epoch"] == tops.index(max(tops)) + 1
    assert f"best val top-1 {max(tops):.2f}% at epoch {summary['best_epoch']} of 3" in capsys.readouterr().out


def test_a_sigterm_stop_of_training_prints_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("kornia", reason="needs the train extra")
    import signal

    from _helpers import TINY_TRAIN

    from hybridvit.train import stop

    monkeypatch.setattr(stop.StopRequest, "requested", lambda self, info: int(signal.SIGTERM))
    out = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--epochs", "2", "--output", str(out)]) == 143
    o, e = capsys.readouterr()
    said = [line for line in (o + e).splitlines() if "SIGTERM" in line]
    assert len(said) == 1 and said[0].startswith("SIGTERM: training stopped at epoch 1"), o + e
    assert "stopped by SIGTERM" in (out / "train.log").read_text()  # the log keeps its record


def test_fine_tuning_says_start_fresh_once(tmp_path, capsys, caplog):
    pytest.importorskip("kornia", reason="needs the train extra")
    from _helpers import TINY_TRAIN, run_checkpoint

    ckpt = run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
    argv = ["train", *TINY_TRAIN, "--pretrained", str(ckpt), "--epochs", "1", "--max-steps-per-epoch", "1",
            "--output", str(tmp_path / "tuned")]
    assert main(argv) == 0
    o, e = capsys.readouterr()
    assert (o + e + caplog.text).count("start fresh") == 1, o + e + caplog.text


def test_one_table_of_extras_agrees_with_pyproject_and_every_missing_package_is_one_line():
    """hybridvit.extras is the one owner of "which extra installs this": each named extra exists in
    pyproject.toml and lists the package; the CLI's one-line error, deploy's `require` and the Hub message read
    it (a missing OpenVINO or NNCF was a traceback before)."""
    import tomllib
    from pathlib import Path

    from hybridvit import cli, extras

    extras_of = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    dist = {"PIL": "pillow", "sklearn": "scikit-learn"}
    for module, extra in extras.EXTRAS.items():
        assert extra in extras_of, (module, extra)
        assert any(req.lower().startswith(dist.get(module, module).lower()) for req in extras_of[extra]), module
    for module in ("openvino", "nncf", "kornia", "huggingface_hub"):
        msg = cli._user_error(ModuleNotFoundError(f"No module named {module!r}", name=module))
        assert msg == f"{module} is not installed: pip install 'hybridvit[{extras.EXTRAS[module]}]'"
    assert cli._user_error(ModuleNotFoundError("x", name="not_an_extra")) is None
    with pytest.raises(ModuleNotFoundError, match=r"no_such_pkg is needed here"):
        extras.require("no_such_pkg")
