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
    assert r.returncode == 2 and r.stderr == "error: PIL is not installed: pip install pillow\n"
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
                       ("crossformer-t", "crossformer_t"), ("cabvit_h_Ll", "cabvit_h_l1")):
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
    run("models", "fastervit_0", "--no-macs", "--json", str(table))
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

