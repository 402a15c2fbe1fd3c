"""`hybridvit models` and the command-line entry point."""
import json

import pytest

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


def test_commands_import_only_what_they_need(tmp_path):
    """`models` works with every extra missing; eval and predict need torch and pillow only; a missing
    package is one error line that says what to install."""
    import torch
    from _imagedata import make_folder

    from hybridvit.checkpoint import make_run_checkpoint

    root = make_folder(tmp_path / "data", n_train=1, n_val=2)
    model = hybridvit.create_model("fastervit_nano", num_classes=2, img_size=32)
    ckpt = tmp_path / "run.pt"
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 32}, num_classes=2,
                                   class_names=["blue", "red"], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), ckpt)
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
