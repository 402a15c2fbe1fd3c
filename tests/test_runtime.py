"""The runtime plan (hybridvit.runtime): threads and loader workers that never oversubscribe the CPUs, --threads
on every command, --device resolved the same way everywhere, and each family's minimum input size checked
before anything is built."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from _helpers import child_env, error_line, run_checkpoint, user_error

import hybridvit
from hybridvit.cli import main
from hybridvit.runtime import check_img_size, min_img_size, plan_threads, resolve_device


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("command", ["train", "eval", "predict", "bench", "export", "analyze"])
def test_threads_and_workers_never_oversubscribe(cpus, command):
    p = plan_threads(command, cpus=cpus)
    assert p.threads >= 1 and p.threads + p.workers <= max(cpus, 2)
    assert (p.workers > 0) == (command in ("train", "eval", "predict") and cpus >= 2)
    if cpus >= 2:
        assert p.threads + p.workers <= cpus


def test_thread_plan_keeps_what_the_user_asked():
    assert plan_threads("train", cpus=2) == plan_threads("train", cpus=2, threads=1, workers=1)
    p = plan_threads("train", cpus=16, threads=2)
    assert (p.threads, p.workers) == (2, 4)
    assert plan_threads("train", cpus=16, in_memory=True).workers == 0
    assert plan_threads("train", cpus=16, processes=4).cpus == 4
    cuda = plan_threads("train", cpus=16, device="cuda")
    assert (cuda.threads, cuda.workers) == (1, 8)
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        plan_threads("eval", threads=0)


def test_export_takes_threads():
    from hybridvit.cli import build_parser
    args = build_parser().parse_args(["export", "-m", "fastervit_nano", "-o", "x.onnx", "--threads", "1"])
    assert args.threads == 1


def test_eval_predict_and_analyze_take_threads(tmp_path, colours, capsys):
    ckpt = run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["eval", "--pretrained", str(ckpt), "--data", str(colours), "--threads", "1", "--workers", "0",
                     "--no-progress"]) == 0
        assert "(1 thread + 0 loader workers on " in capsys.readouterr().out
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["predict", "--pretrained", str(ckpt), "--threads", "1",
                     str(colours / "val" / "red" / "000.png")]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["analyze", "-m", "fastervit_nano", "--img-size", "32", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert "--threads must be at least 1" in error_line(["eval", "--pretrained", str(ckpt), "--data", str(colours),
                                                         "--threads", "0"], capsys)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_what_to_do(capsys, tmp_path):
    msg = user_error(["bench", "-m", "fastervit_nano", "--device", "cuda", "--warmup", "0"], capsys)
    assert "no CUDA device" in msg and "--device cpu" in msg
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda:1")
    if importlib.util.find_spec("kornia"):  # train, eval and predict resolve --device the same way
        msg = user_error(["train", "--device", "cuda", "--epochs", "1", "--output", str(tmp_path / "r")], capsys)
        assert "no CUDA device" in msg
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")


def test_minimum_input_sizes_per_family(monkeypatch):
    from hybridvit.registry import get_entry

    assert min_img_size("crossformer_t") == min_img_size("crossformerpp_s") == 32
    assert min_img_size(hybridvit.list_models("cabvit_p*")[0]) == 16
    assert min_img_size("fastervit_nano") == min_img_size("cabvit_h_l1") == 1  # padded everywhere
    check_img_size("crossformer_t", 32)
    check_img_size("crossformer_t", None)
    # one owner: each model class's `min_input_size`, which every registry entry's pretrained_cfg carries
    for name in hybridvit.list_models():
        entry = get_entry(name)
        assert entry.pretrained_cfg["min_input_size"][-2:] == (entry.builder.min_input_size,) * 2, name
    # what the commands check reads that field
    monkeypatch.setitem(get_entry("fastervit_nano").pretrained_cfg, "min_input_size", (3, 48, 48))
    assert min_img_size("fastervit_nano") == 48


def test_too_small_images_are_refused_before_anything_is_built(tmp_path, colours, capsys):
    want = "too small for crossformer_t: it needs images of at least 32x32 pixels; pass --img-size 32"
    out = tmp_path / "run"
    for argv in (["train", "--model", "crossformer_t", "--img-size", "16", "--data", str(colours), "--output",
                  str(out)],
                 ["eval", "--model", "crossformer_t", "--pretrained", "true", "--img-size", "16"],
                 ["bench", "-m", "crossformer_t", "--img-size", "16", "--warmup", "0", "--threads", "1"],
                 ["export", "-m", "crossformer_t", "--img-size", "16", "-o", str(tmp_path / "m.onnx")],
                 ["analyze", "-m", "crossformer_t", "--img-size", "16", "--threads", "1"],
                 ["analyze", "distance", "-m", "crossformer_t", "--img-size", "16", "random", "-o",
                  str(tmp_path / "a")]):
        assert want in error_line(argv, capsys), argv
    assert not out.exists() and not (tmp_path / "m.onnx").exists() and not (tmp_path / "a").exists()
    cabvit_p = hybridvit.list_models("cabvit_p*")[0]
    assert "at least 16x16 pixels" in error_line(["train", "--model", cabvit_p, "--img-size", "8", "--data",
                                              str(colours), "--output", str(out)], capsys)


_FAULTS = """
import resource, sys
import torch
from hybridvit.runtime import plan_threads
if sys.argv[1] == "plan":
    plan_threads("bench", threads=1).apply()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(6):  # a forward pass's pattern: the same large buffers allocated and freed on every call
    if i == 2:
        f0 = faults()
    # 4 x 24 MB: below glibc's largest mmap threshold (32 MiB), above its largest automatic trim threshold
    # (64 MiB) in all: the defaults trim the heap after every call, whatever threshold they had reached
    bufs = [torch.ones(6 << 20) for _ in range(4)]
    del bufs
print((faults() - f0) / 4)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc settings")
def test_the_commands_keep_freed_memory_for_the_next_call():
    """With glibc's defaults the heap is trimmed after the buffers are freed, and every call pays the page
    faults of touching them again (about 24 000 per call here); `plan.apply()` keeps the memory
    (runtime.keep_freed_memory). HYBRIDVIT_KEEP_MEMORY=0 leaves glibc as it was."""
    import subprocess
    import sys

    from hybridvit.runtime import keep_freed_memory

    def faults(arg: str, keep: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FAULTS, arg], env=child_env(HYBRIDVIT_KEEP_MEMORY=keep),
                             capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    if not keep_freed_memory():
        pytest.skip("not glibc (keep_freed_memory applies to glibc's malloc only)")
    def most(arg: str, keep: str, tries: int) -> float:
        # glibc does not trim a main heap that could not grow in one piece (about one process in three
        # here, with address-space randomisation): the defaults then fault little too, so a few tries
        best = 0.0
        for _ in range(tries):
            best = max(best, faults(arg, keep))
            if best > 8000:
                break
        return best

    default, off = most("none", "1", 10), most("plan", "0", 10)
    assert default > 8000 and off > 8000, (default, off)  # 4 x 24 MB: about 24 000 pages per call
    kept = most("plan", "1", 3)
    assert kept < 3000, (kept, default)
