"""The GPU check: correctness, throughput, training and the attention path on one GPU, in one command.

Run it through `benchmarks/gpu/run.sh` (which sets the paths); `run.sh --dry-run` takes the same code
paths on the CPU with tiny sizes and one repeat (CI runs it: tests/test_gpu_script.py).

Sections, each with its own time budget (seconds of the whole `--budget-s`, see BUDGET_SHARES); OUT/gpu_check.json
holds all of them (rewritten after each section), OUT/gpu_check.md their tables (render.py):

  env          GPU, versions, measured bf16/fp16/fp32 matmul peaks, revisions of the official code
  tests        the CUDA-marked tests (tests/test_cuda.py: official fixtures fp32 <= 1e-4, bf16/fp16 autocast
               forward+backward per family at two sizes, torch.compile at two sizes, SDPA kernels with the
               bias, no host syncs); on a GPU every one must pass, none may skip
  digits       `hybridvit train` on the embedded digits for 2 epochs, val top-1 against the CPU's
  inference    bf16 autocast, batch 128, 224 px, eager and torch.compile: fastervit_0, crossformerpp_s,
               cabvit_h_l2 against the official implementations (same weights) and timm's convnext_tiny and
               swin_tiny_patch4_window7_224; TFLOP/s against the bf16 matmul peak, batch-1 latency, peak memory
  train_step   one training step (bf16, AdamW, batch 128), official vs hybridvit
  train_loop   the whole `hybridvit train` loop on a folder of JPEGs at 224 (workers, pinned memory, GPU
               augmentation): its img/s against the step's
  attention    for each family's real attention calls: the SDPA backend chosen with its additive bias, the
               backends that accept it, and FlexAttention (score_mod for the bias, BlockMask for padding)
               against SDPA

A section that breaks is recorded with its traceback and the run goes on to the next one; the exit status
is then 1 (a break is never a skip). Work a section's budget does not leave time for is listed under
`not_run` and printed; then the exit status is 3. Official code or timm absent: a recorded `absent` note,
which fails the sections that compare against them on a GPU (after they measured what they could).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "gpu")]

FAMILIES = ["fastervit_0", "crossformerpp_s", "cabvit_h_l2"]
TIMM = ["convnext_tiny", "swin_tiny_patch4_window7_224"]
# `hybridvit train --epochs 2` on the digits on CPU (2 threads of an AMD EPYC, torch 2.13, commit 7b5195e):
# best val top-1 97.22% (epoch 1: 83.33%). The GPU run (bf16, other kernels) must come within DIGITS_TOL.
CPU_DIGITS_TOP1 = 97.22
DIGITS_TOL = 2.0
# seconds per section on the GPU (450 s in all, scaled by --budget-s) and in a dry run (115 s); time a
# section leaves unused is not carried over
BUDGET_SHARES = {"env": 10, "tests": 140, "digits": 30, "inference": 140, "train_step": 30, "train_loop": 55,
                 "attention": 45}
DRY_SHARES = {"env": 3, "tests": 12, "digits": 15, "inference": 30, "train_step": 12, "train_loop": 20,
              "attention": 23}
# a torch.compile'd group (official + hybridvit) at batch 128 on a H100, before one was measured (estimate);
# later groups start only when the budget holds the slowest group measured so far
COMPILE_COST_S = 90.0


@dataclass
class Mode:
    """Sizes of one run: the GPU's, or the dry run's (CPU, tiny, one repeat)."""

    dry: bool
    device: torch.device
    batch: int
    img: int
    repeats: int
    warmup: int
    peak_n: int
    attention_batch: int
    attention_iters: int
    attention_signatures: int
    amp: str | None  # of the throughput sections
    train_batch: int
    compile_groups: list[list[str]]
    train_families: list[str]
    latency: bool

    @classmethod
    def make(cls, dry: bool) -> Mode:
        # compiled groups in order of importance: the paper's headline model, the timm references, the others
        groups = [["fastervit_0"], [f"timm/{t}" for t in TIMM], ["crossformerpp_s"], ["cabvit_h_l2"]]
        if dry:
            # the official fixtures' tiny configurations (DRY_FIXTURES), fp32 throughput (bf16 is emulated on
            # CPUs without bf16 instructions), one compiled group (dynamo's tracing takes 10-40 s per model on
            # 2 shared CPUs) and the training step of one family
            return cls(True, torch.device("cpu"), 2, 224, 1, 1, 512, 1, 1, 2, None, 2, [["cabvit_h_l2"]],
                       ["fastervit_0"], True)
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --dry-run to rehearse on the CPU)")
        return cls(False, torch.device("cuda"), 128, 224, 10, 3, 8192, 128, 20, 2, "bf16", 128, groups, FAMILIES,
                   True)


class Budget:
    """A deadline in seconds from now."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Report:
    """Sections' results, OUT/gpu_check.json rewritten after each section."""

    def __init__(self, out: Path, mode: Mode, total_s: float, argv: list[str], enforce: bool = True):
        self.out, self.mode, self.total, self.enforce = out, mode, Budget(total_s), enforce
        self.data: dict[str, Any] = {"dry_run": mode.dry, "device": str(mode.device), "command": argv,
                                     "budget_s": total_s, "sections": {}}
        self.failed: list[str] = []
        self.incomplete: list[str] = []
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def section(self, name: str):
        shares = DRY_SHARES if self.mode.dry else BUDGET_SHARES
        share = shares[name] * self.data["budget_s"] / sum(shares.values())
        # a dry run exercises every code path whatever the machine's speed: budgets are enforced on the GPU
        # (or with --enforce-budget)
        budget = Budget(max(0.0, min(share, self.total.left())) if self.enforce else 1e9)
        rec: dict[str, Any] = {"status": "ok", "budget_s": round(share, 1), "not_run": []}
        t0 = time.monotonic()
        print(f"== {name} (budget {share:.0f} s)", flush=True)
        try:
            yield rec, budget
        except Exception as e:  # recorded and the run goes on: the exit status says it failed
            rec["status"] = "failed"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()
            self.failed.append(name)
            print(f"!! {name} FAILED: {rec['error']}\n{rec['traceback']}", flush=True)
        rec["wall_s"] = round(time.monotonic() - t0, 2)
        if rec["not_run"]:
            if rec["status"] == "ok":
                rec["status"] = "partial"
            self.incomplete.append(name)
            print(f"!! {name}: not run for lack of time: {rec['not_run']}", flush=True)
        self.data["sections"][name] = rec
        self.data["wall_s"] = round(time.monotonic() - self.t0, 2)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))


# ----------------------------------------------------------------------------------------------- helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_loop(fn, dev: torch.device, iters: int, rounds: int = 3) -> float:
    """Median seconds per call of `fn`, `iters` calls between synchronisations (small kernels)."""
    fn()
    out = []
    for _ in range(rounds):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        out.append((time.perf_counter() - t0) / iters)
    return statistics.median(out)


def run_cmd(cmd: list[str], timeout: float, log: Path, dry: bool) -> int:
    """Runs `cmd` with its output in `log` (and its tail printed); returns the exit status; a timeout raises
    (a hang is a failure; a dry run on a shared CPU gets at least 2 minutes)."""
    if dry:
        timeout = min(max(timeout, 120.0), 600.0)
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1.0), cwd=ROOT,
                                env=os.environ).returncode
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{cmd[2:4]} ran past its budget ({timeout:.0f} s); output in {log}") from e
    tail = log.read_text().splitlines()[-8:]
    print("\n".join("   " + line for line in tail), flush=True)
    return rc


def _timm_modules() -> dict[str, Any]:
    return {k: sys.modules.pop(k) for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]}


def _import_official(found: dict, build: bool, shim_first: bool = False) -> str | None:
    """Imports official.py (and, on a GPU, builds the official FAMILIES, which calls into timm) into `found`;
    returns None, or the error after removing every module the attempt imported."""
    before = set(sys.modules)
    try:
        if shim_first:  # official.py puts the shim first on sys.path; a failed attempt left it there
            shim = [p for p in sys.path if p.endswith("officialshim")]
            sys.path[:0] = shim[:1]
        import official
        built = {name: official.OFFICIAL[name]() for name in FAMILIES} if build else {}
    except BaseException as e:  # official.py exits when its folder is wrong
        for k in set(sys.modules) - before:
            del sys.modules[k]
        return f"{type(e).__name__}: {e}"
    found["official"], found["official_module"], found["official_built"] = official.OFFICIAL, official, built
    return None


def optional_imports(mode: Mode) -> dict[str, Any]:
    """timm and the official implementations: modules, or the reason they are missing (an error on a GPU).

    The official code imports a few names of an old timm. With timm installed it is imported with that
    timm first; should that fail (a newer timm without those names), with the shim of official.py (which
    then binds its names at import time), after which the real timm is put back for timm's own models.
    einops, which the official CabViT imports, comes from official/wheels where it is not installed."""
    found: dict[str, Any] = {}
    try:
        import timm
        found["timm"] = timm
    except ImportError as e:
        found["timm"] = f"absent: timm is not installed ({e})"
    refs = os.environ.get("HV_OFFICIAL_REFS")
    if not refs:
        found["official"] = ("absent: HV_OFFICIAL_REFS is not set (prepare official/ with "
                             "benchmarks/gpu/prepare_official.sh)")
    else:
        try:
            import einops  # noqa: F401
        except ImportError:
            sys.path += [str(p) for p in sorted((Path(refs).parent / "wheels").glob("einops-*.whl"))]
        err = _import_official(found, build=not mode.dry)
        if err is None:
            found["official_timm"] = "the installed timm" if not isinstance(found["timm"], str) else "the shim"
        elif isinstance(found["timm"], str):
            found["official"] = f"absent: importing the official code failed ({err})"
        else:
            # a newer timm without the old names: the official code with the shim, then the real timm back
            real = _timm_modules()
            try:
                err2 = _import_official(found, build=not mode.dry, shim_first=True)
            finally:
                _timm_modules()
                sys.modules.update(real)
            if err2 is None:
                found["official_timm"] = f"the shim (with the installed timm: {err})"
            else:
                found["official"] = (f"absent: importing the official code failed (with timm: {err}; with the "
                                     f"shim: {err2})")
    return found


def require_references(rec: dict, mode: Mode) -> None:
    """On a GPU the comparisons need timm and the official code: a section that measured without them
    fails at its end (after measuring what it could)."""
    if not mode.dry and rec.get("absent"):
        raise RuntimeError("the GPU check compares against timm and the official code: "
                           + "; ".join(f"{k}: {v}" for k, v in rec["absent"].items()))


_MODELS: dict[str, tuple[torch.nn.Module | None, torch.nn.Module, float | None]] = {}
# dry run: each family's official fixture (tests/fixtures/official), a tiny configuration of the same
# architecture, stands in for the published size: the official class built with the fixture's arguments and
# hybridvit (the tests' helper) with the fixture's weights; the full sizes take minutes per section on 2 CPUs
DRY_FIXTURES = {"fastervit_0": "fastervit_tiny_ls_prop", "crossformerpp_s": "crossformerpp_tiny",
                "cabvit_h_l2": "cabvit_h_tiny"}


def _dry_models(name: str, official) -> tuple[torch.nn.Module | None, torch.nn.Module]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import load_fixture
    from test_cuda import fixture_model

    fixture = DRY_FIXTURES[name]
    ours = fixture_model(fixture)
    if official is None:
        return None, ours
    fx = load_fixture(fixture)
    cls = {"fastervit_0": lambda: official.fv.FasterViT, "crossformerpp_s": lambda: official.CrossFormer,
           "cabvit_h_l2": lambda: official.cb.CaBViT_H}[name]()
    off = cls(**fx["official_config"]).eval()
    off.load_state_dict(fx["state_dict"])
    return off, ours


def family_models(name: str, found: dict, dry: bool) -> tuple[torch.nn.Module | None, torch.nn.Module, float | None]:
    """(official or None, hybridvit with the official's weights, fp32 max abs diff of their logits), eval, on
    CPU; the same objects for every section."""
    if name not in _MODELS:
        from compare_official import perturb

        import hybridvit

        torch.manual_seed(0)
        have = not isinstance(found["official"], str)
        official, diff = None, None
        if dry:
            official, ours = _dry_models(name, found["official_module"] if have else None)
        else:
            ours = hybridvit.create_model(name).eval()
            if have:
                prebuilt = found.get("official_built", {}).pop(name, None)
                official = perturb((prebuilt or found["official"][name]()).eval())
                hybridvit.load_checkpoint(ours, {"state_dict": official.state_dict()})
        if official is not None:
            x = torch.randn(1, 3, 224, 224)
            with torch.no_grad():
                diff = (official(x) - ours(x)).abs().max().item()
            if diff > 1e-3:
                raise AssertionError(f"{name}: official and hybridvit logits differ by {diff:.2e} (fp32, CPU)")
        _MODELS[name] = (official, ours, diff)
    return _MODELS[name]


# ----------------------------------------------------------------------------------------------- sections
def section_env(rec: dict, mode: Mode, found: dict) -> None:
    from hybridvit.bench import environment, matmul_peak_gflops

    dev = mode.device
    rec["environment"] = environment(str(dev))
    rec["cpus"] = os.cpu_count()
    try:
        rec["project_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True).stdout.strip() or "unknown"
    except OSError:
        rec["project_commit"] = "unknown"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        rec["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                      "memory_gib": round(p.total_memory / 2 ** 30, 1), "sms": p.multi_processor_count,
                      "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    for mod in ("torchvision", "triton", "onnxruntime"):
        try:
            rec.setdefault("versions", {})[mod] = __import__(mod).__version__
        except ImportError:
            rec.setdefault("versions", {})[mod] = "absent"
    rec["official_imported_with"] = found.get("official_timm")
    rec["versions"]["timm"] = found["timm"] if isinstance(found["timm"], str) else found["timm"].__version__
    refs = Path(os.environ.get("HV_OFFICIAL_REFS", "/nonexistent")) / "REVISIONS"
    rec["official"] = refs.read_text().split("\n") if refs.is_file() else found["official"] if isinstance(
        found["official"], str) else "present (no REVISIONS file)"
    peaks = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        peaks[label] = matmul_peak_gflops(dev, dtype, n=mode.peak_n)
    if dev.type == "cuda":  # TF32 tensor cores: what fp32 products run on when a user allows them
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = matmul_peak_gflops(dev, torch.float32, n=mode.peak_n)
        torch.backends.cuda.matmul.allow_tf32 = prev
    rec["matmul_peak_tflops"] = {k: round(v / 1e3, 3) for k, v in peaks.items()}
    rec["matmul_n"] = mode.peak_n


def section_tests(rec: dict, budget: Budget, mode: Mode, out: Path, work: Path) -> None:
    import xml.etree.ElementTree as ET

    junit = work / "cuda_tests.xml"
    if budget.left() < 5:
        rec["not_run"].append("the CUDA tests (no time left)")
        return
    rc = run_cmd([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
                  "tests/test_cuda.py", f"--junitxml={junit}"], budget.left(), out / "cuda_tests.log", mode.dry)
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    rec.update(pytest_exit=rc, **counts)
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {(node.get('message') or '')[:300]}"
        cases.append({"test": case.get("name"), "time_s": float(case.get("time", 0)), "outcome": outcome})
    rec["cases"] = cases
    if counts["tests"] == 0:
        raise AssertionError("no CUDA-marked test was collected")
    if mode.dry:
        # on the CPU every CUDA test skips, with its reason: recorded, never counted as a pass
        if counts["skipped"] != counts["tests"] or rc != 0:
            raise AssertionError(f"dry run: expected every CUDA test to skip on the CPU, got {counts}")
        rec["note"] = f"dry run on CPU: {counts['skipped']} CUDA tests skipped (reason: {cases[0]['outcome']})"
    elif rc != 0 or counts["skipped"] or counts["passed"] != counts["tests"]:
        bad = [c for c in cases if c["outcome"] != "passed"]
        raise AssertionError(f"CUDA tests: {counts}; first problems: {bad[:5]}")


def section_digits(rec: dict, budget: Budget, mode: Mode, out: Path, work: Path) -> None:
    run = work / "digits_run"
    if budget.left() < 5:
        rec["not_run"].append("hybridvit train on the digits (no time left)")
        return
    cmd = [sys.executable, "-m", "hybridvit", "train", "--output", str(run), "--overwrite", "--no-progress",
           "--no-plot", "--device", str(mode.device)]
    cmd += ["--epochs", "1", "--max-steps-per-epoch", "2"] if mode.dry else ["--epochs", "2"]
    rc = run_cmd(cmd, budget.left(), out / "digits_train.log", mode.dry)
    if rc != 0:
        raise RuntimeError(f"hybridvit train on the digits exited with {rc} (log: {out / 'digits_train.log'})")
    summary = json.loads((run / "summary.json").read_text())
    rec.update(val_top1=summary["val_top1"], epochs=summary["epochs"], wall_time_s=summary.get("wall_time_s"),
               cpu_reference_top1=CPU_DIGITS_TOP1, tolerance=DIGITS_TOL)
    if mode.dry:
        rec["note"] = "dry run: 1 epoch of 2 steps on the CPU, accuracy not checked"
    elif summary["val_top1"] < CPU_DIGITS_TOP1 - DIGITS_TOL:
        raise AssertionError(f"digits val top-1 {summary['val_top1']:.2f}% on the GPU, CPU reaches "
                             f"{CPU_DIGITS_TOP1:.2f}% (tolerance {DIGITS_TOL})")


def _annotate(results: list[dict], peak_tflops: float, diffs: dict) -> None:
    """Adds TFLOP/s, % of the bf16 matmul peak and the ratios to the official code and timm."""
    by_model = {r["model"]: r for r in results}
    for r in results:
        fam, _, side = r["model"].partition("/")
        r["tflops"] = r["achieved_gflops"] / 1e3
        r["pct_of_bf16_peak"] = 100 * r["tflops"] / peak_tflops
        off = by_model.get(f"{fam}/official")
        if off is not None and side != "official":
            r["ratio_vs_official"] = r["img_per_s"] / off["img_per_s"]
        for t in TIMM:
            ref = by_model.get(f"timm/{t}")
            if ref is not None and fam != "timm":
                r[f"ratio_vs_{t}"] = r["img_per_s"] / ref["img_per_s"]
        if fam in diffs:
            r["fp32_max_abs_diff_vs_official"] = diffs[fam]


def _compiled(model: torch.nn.Module, mode: Mode) -> torch.nn.Module:
    """torch.compile with inductor; in a dry run dynamo traces and runs its graphs eagerly (an inductor C++
    build of every model would take minutes on 2 CPUs)."""
    return torch.compile(model, backend="eager") if mode.dry else torch.compile(model)


def _pairs(mode: Mode, found: dict, compiled: bool, train: bool, names: list[str]) -> list[tuple[str, Any]]:
    from hybridvit.bench import prepare as _prepare

    def prepare(m, dev, channels_last=True, compile=False, train=False):
        m = _prepare(m, dev, channels_last=channels_last, train=train)[0]
        return (_compiled(m, mode) if compile else m), None

    pairs = []
    for name in names:
        name, _, only = name.partition("/") if not name.startswith("timm/") else (name, "", "")
        if name.startswith("timm/"):
            if not isinstance(found["timm"], str):
                m = found["timm"].create_model(name[5:])
                pairs.append((name, prepare(m, mode.device, compile=compiled, train=train)[0]))
            continue
        official, ours, _ = family_models(name, found, mode.dry)
        # the official code as it runs by default (NCHW), as in compare_official.py
        if official is not None and only != "hybridvit":
            pairs.append((f"{name}/official", prepare(copy.deepcopy(official), mode.device, channels_last=False,
                                                      compile=compiled, train=train)[0]))
        pairs.append((f"{name}/hybridvit", prepare(copy.deepcopy(ours), mode.device, compile=compiled,
                                                   train=train)[0]))
    return pairs


def section_inference(rec: dict, budget: Budget, mode: Mode, found: dict, peaks: dict) -> None:
    from hybridvit.bench import bench_models

    rec["absent"] = {k: found[k] for k in ("official", "timm") if isinstance(found[k], str)}
    diffs = {}
    for name in FAMILIES:
        diffs[name] = family_models(name, found, mode.dry)[2]
    rec["fp32_max_abs_diff_vs_official"] = diffs
    if mode.dry:
        rec["stand_ins"] = {k: f"official fixture {v} (dry run)" for k, v in DRY_FIXTURES.items()}
    names = FAMILIES + [f"timm/{t}" for t in TIMM]
    # eager: every model in the same interleaved rounds
    pairs = _pairs(mode, found, False, False, names)
    res = bench_models(pairs, batch_size=mode.batch, img_size=mode.img, device=str(mode.device), amp=mode.amp,
                       repeats=mode.repeats, warmup=mode.warmup, latency=mode.latency, memory=True)
    for r in res:
        r["compiled"] = False
    _annotate(res, peaks["bf16"], diffs)
    rec["eager"] = res
    del pairs
    # compiled: one group at a time (official + hybridvit of a family, then timm), while the budget allows;
    # no batch-1 latency (it would recompile for a second shape)
    rec["compiled"] = []
    rec["compile_backend"] = "eager (dynamo only, dry run)" if mode.dry else "inductor"
    rec["amp"] = mode.amp or "fp32 (dry run)"
    slowest = COMPILE_COST_S if not mode.dry else 5.0
    for group in mode.compile_groups:
        if budget.left() < slowest:
            rec["not_run"].append(f"compiled {group}")
            continue
        t0 = time.monotonic()
        from torch._dynamo.utils import counters
        counters.clear()
        try:
            res = _bench_compiled(group, mode, found)
        except Exception as e:  # the other groups still run; the section fails at its end
            rec.setdefault("compile_errors", {})[" ".join(group)] = f"{type(e).__name__}: {e}"
            print(f"!! compiled {group} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
            torch._dynamo.reset()
            continue
        if not res:
            continue
        wall = time.monotonic() - t0
        slowest = max(wall, slowest if rec["compiled"] else 0.0)
        # graphs and breaks of the whole group (both models; the memory run under a dispatch mode adds graphs)
        graphs = {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                  "graph_breaks": sum(counters["graph_break"].values()),
                  "break_reasons": sorted(counters["graph_break"])[:5]}
        for r in res:
            r["compiled"] = True
            r["group_wall_s"] = round(wall, 1)
            r["group_dynamo"] = graphs
        _annotate(res, peaks["bf16"], diffs)
        eager = {r["model"]: r for r in rec["eager"]}
        for r in res:
            if r["model"] in eager:
                r["ratio_vs_eager"] = r["img_per_s"] / eager[r["model"]]["img_per_s"]
        rec["compiled"] += res
        torch._dynamo.reset()
    if rec.get("compile_errors"):
        raise RuntimeError(f"torch.compile failed for {', '.join(rec['compile_errors'])}: {rec['compile_errors']}")
    require_references(rec, mode)


def _bench_compiled(group: list[str], mode: Mode, found: dict) -> list[dict]:
    from hybridvit.bench import bench_models

    pairs = _pairs(mode, found, True, False, group)
    if not pairs:
        return []
    return bench_models(pairs, batch_size=mode.batch, img_size=mode.img, device=str(mode.device), amp=mode.amp,
                        repeats=mode.repeats, warmup=mode.warmup, latency=False, memory=True)


def section_train_step(rec: dict, budget: Budget, mode: Mode, found: dict, peaks: dict) -> None:
    from hybridvit.bench import bench_models

    rec["absent"] = {k: found[k] for k in ("official",) if isinstance(found[k], str)}
    rec["results"] = []
    rec["amp"] = mode.amp or "fp32 (dry run)"
    for name in mode.train_families:
        if budget.left() < (20 if not mode.dry else 2):
            rec["not_run"].append(name)
            continue
        pairs = _pairs(mode, found, False, True, [name])
        res = bench_models(pairs, batch_size=mode.train_batch, img_size=mode.img, device=str(mode.device),
                           amp=mode.amp, train=True, optimizer="adamw", repeats=max(1, mode.repeats // 2),
                           warmup=mode.warmup,
                           latency=False, memory=True)
        _annotate(res, peaks["bf16"], {})
        rec["results"] += res
        del pairs
    require_references(rec, mode)


def _write_jpegs(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    folder, start, count, size = args
    g = torch.Generator().manual_seed(start)
    for i in range(start, start + count):
        # smooth random texture (upsampled noise), so that JPEG decoding costs what photographs cost
        small = (torch.rand(3, size // 8, size // 8, generator=g) * 255).to(torch.uint8)
        img = Image.fromarray(small.permute(1, 2, 0).numpy()).resize((size, size * 3 // 4), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def make_jpeg_folder(root: Path, classes: int, per_class_train: int, per_class_val: int, size: int) -> int:
    """ROOT/{train,val}/c<k>/*.jpg; returns the number of training images."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            chunk = max(1, n // 4)
            for s in range(0, n, chunk):
                jobs.append((d, (0 if split == "train" else 10 ** 6) + c * 10 ** 4 + s, min(chunk, n - s), size))
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as ex:
        list(ex.map(_write_jpegs, jobs))
    return classes * per_class_train


def section_train_loop(rec: dict, budget: Budget, mode: Mode, out: Path, work: Path, step: dict) -> None:
    data = work / "jpegs"
    if budget.left() < 5:
        rec["not_run"].append("hybridvit train on the JPEG folder (no time left)")
        return
    if mode.dry:
        n_train = make_jpeg_folder(data, 2, 8, 2, 64)
        batch, img, extra = 4, 32, ["--workers", "1"]
    else:
        n_train = make_jpeg_folder(data, 10, 512, 13, 320)  # 40 steps of 128 per epoch
        batch, img, extra = mode.batch, mode.img, []
    run = work / "train_loop_run"
    cmd = [sys.executable, "-m", "hybridvit", "train", "--data", str(data), "--recipe", "fastervit_0",
           "--model", "fastervit_0", "--epochs", "2", "--batch-size", str(batch), "--img-size", str(img),
           "--amp", mode.amp or "none", "--device", str(mode.device), "--output", str(run), "--overwrite",
           "--no-progress", "--no-plot", *extra]
    rc = run_cmd(cmd, budget.left(), out / "train_loop.log", mode.dry)
    if rc != 0:
        raise RuntimeError(f"hybridvit train on the JPEG folder exited with {rc} (log: {out / 'train_loop.log'})")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = n_train // batch
    last = rows[-1]  # the second epoch: start-up (cuDNN autotuning, first allocations) is behind it
    rec.update(train_images=n_train, batch_size=batch, img_size=img, steps_per_epoch=steps,
               epoch_times_s=[r["epoch_time_s"] for r in rows],
               loop_img_per_s=steps * batch / last["epoch_time_s"],
               note="epoch time of the 2nd epoch, including its validation of a small val split")
    ref = next((r for r in step.get("results", []) if r["model"] == "fastervit_0/hybridvit"), None)
    if ref is not None:
        rec["step_img_per_s"] = ref["img_per_s"]
        rec["loop_vs_step"] = rec["loop_img_per_s"] / ref["img_per_s"]
    else:
        rec["loop_vs_step"] = "train_step section has no fastervit_0/hybridvit result"


def _flex_inputs(q: torch.Tensor, bias: torch.Tensor | None):
    """(score_mod, block_mask) reproducing SDPA's additive `bias`: its finite part through score_mod, its
    padding entries (<= MASK_VALUE / 2, key positions masked for every query) as a BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    from hybridvit.layers import MASK_VALUE

    if bias is None:
        return None, None
    B, H, N, _ = q.shape
    masked = bias <= MASK_VALUE / 2
    pos = bias.masked_fill(masked, 0).contiguous()
    bb, bh, bn = (pos.shape[0] > 1), (pos.shape[1] > 1), (pos.shape[2] > 1)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + pos[b if bb else 0, h if bh else 0, q_idx if bn else 0, kv_idx]

    block_mask = None
    if bool(masked.any()):
        key_invalid = masked.any(-2).any(1)  # (Bb, M): padding keys of each batch entry (window / group)
        M = bias.shape[-1]
        kb = key_invalid.shape[0] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            return ~key_invalid[b if kb else 0, kv_idx]

        block_mask = create_block_mask(mask_mod, B if kb else None, None, N, M, device=q.device)
    return score_mod, block_mask


def measure_signature(g: dict, tensors: tuple, mode: Mode, flex) -> None:
    """Adds to `g` (one attention signature of a family) the SDPA backend chosen for it, the backends that
    accept it, and the times of SDPA (aligned bias as `attend` hands it; unaligned) and FlexAttention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hybridvit.layers.attention import bias_is_aligned

    q, k, v, bias = tensors
    dev = mode.device
    backends = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
                if hasattr(SDPBackend, b)]
    scale = g["scale"]
    g["bias_aligned"] = None if bias is None else bias_is_aligned(bias)
    if dev.type == "cuda" and hasattr(torch, "_fused_sdp_choice"):
        choice = torch._fused_sdp_choice(q, k, v, bias, 0.0, False, scale=scale)
        try:
            g["sdpa_choice"] = SDPBackend(choice).name
        except (TypeError, ValueError):
            g["sdpa_choice"] = f"SDPBackend {choice}"
    else:
        g["sdpa_choice"] = "cpu dispatch (flash for CPU or math)"
    g["accepts"] = {}
    for b in backends:
        try:
            with sdpa_kernel([getattr(SDPBackend, b)]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            g["accepts"][b] = "ok"
        except RuntimeError as e:
            g["accepts"][b] = str(e).splitlines()[0][:160]
    it = mode.attention_iters
    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        g["sdpa_ms"] = 1e3 * time_loop(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), dev, it)
        if bias is not None and not bias_is_aligned(bias.contiguous()):
            unaligned = bias.contiguous()
            g["sdpa_unaligned_bias_ms"] = 1e3 * time_loop(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=unaligned, scale=scale), dev, it)
        score_mod, block_mask = _flex_inputs(q, bias)
        g["flex_block_mask"] = block_mask is not None
        fo = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
        g["flex_max_abs_diff_vs_sdpa"] = (fo.float() - ref.float()).abs().max().item()
        g["flex_ms"] = 1e3 * time_loop(
            lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale), dev, it)
        g["flex_vs_sdpa"] = g["sdpa_ms"] / g["flex_ms"]



def section_attention(rec: dict, budget: Budget, mode: Mode, found: dict) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from hybridvit.analysis.capture import trace_attention

    dev = mode.device
    flex = flex_attention if mode.dry else torch.compile(flex_attention, dynamic=False)
    rec["flex"] = "eager flex_attention (dry run)" if mode.dry else "torch.compile(flex_attention)"
    rec["families"] = {}
    slowest = 3.0 if mode.dry else 15.0  # a signature's measurement (a flex compile) before one was timed
    for name in FAMILIES:
        ours = copy.deepcopy(family_models(name, found, mode.dry)[1])
        ours = ours.to(dev).eval()
        x = torch.randn(mode.attention_batch, 3, mode.img, mode.img, device=dev)
        fam: dict[str, Any] = {}
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            if not mode.dry:
                ours(x)  # eval caches filled, kernels autotuned before the profile
            # plain=True on the CPU: its bf16 attention is the explicit form there, no SDPA call to record
            with trace_attention(keep_tensors=True, plain=dev.type == "cpu") as tr, \
                    torch.profiler.profile(activities=acts) as prof:
                ours(x)
                sync(dev)
        ops: dict[str, int] = {}
        for e in prof.events():
            if "attention" in e.name.lower() or "sdp" in e.name.lower() or "fmha" in e.name.lower():
                ops[e.name] = ops.get(e.name, 0) + 1
        fam["profiled_attention_ops"] = ops
        groups: dict[tuple, dict] = {}
        for r in tr.records:
            key = (r["q"], r["k"], r["bias"], r["bias_stride"], r["dtype"], r["bias_dtype"])
            g = groups.setdefault(key, {**{k: v for k, v in r.items() if k != "tensors"}, "calls": 0,
                                        "tensors": r["tensors"]})
            g["calls"] += 1
        fam["calls"] = len(tr.records)
        sigs = sorted(groups.values(), key=lambda g: -g["calls"] * g["q"][0] * g["q"][1] * g["q"][2] * g["k"][2])
        fam["signatures"], fam["not_measured"] = [], []
        for g in sigs:
            q, k, v, bias = g.pop("tensors")
            if len(fam["signatures"]) >= mode.attention_signatures:  # the costliest shapes only, by design
                fam["not_measured"].append({key: g[key] for key in ("q", "k", "bias", "calls")})
                continue
            if budget.left() < slowest:
                rec["not_run"].append(f"{name} {g['q']}x{g['k']}")
                continue
            t0 = time.monotonic()
            measure_signature(g, (q, k, v, bias), mode, flex)
            g["wall_s"] = round(time.monotonic() - t0, 2)
            slowest = max(slowest, g["wall_s"])
            fam["signatures"].append(g)
        rec["families"][name] = fam
        del ours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU, tiny, one repeat")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks/gpu/out"),
                    help="folder for gpu_check.json, gpu_check.md and logs (default: $OUT, else benchmarks/gpu/out)")
    ap.add_argument("--work", default=None, help="folder for run folders and generated images (default: a new "
                    "temporary folder)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget of the whole check (default 450 on a GPU, 115 in a dry run)")
    ap.add_argument("--enforce-budget", action="store_true",
                    help="dry run: stop work at the time budgets as on a GPU (default: every code path runs)")
    ap.add_argument("--sections", nargs="*", default=list(BUDGET_SHARES), choices=list(BUDGET_SHARES))
    args = ap.parse_args(argv)
    mode = Mode.make(args.dry_run)
    out = Path(args.out)
    # bulky work files (run folders with checkpoints, generated JPEGs) stay out of OUT, whose files the
    # device machine sends back (a few files only): OUT holds gpu_check.json, gpu_check.md and three logs
    work = Path(args.work or tempfile.mkdtemp(prefix="hybridvit_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if mode.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        torch.backends.cudnn.benchmark = True
    total = args.budget_s or float(sum((DRY_SHARES if mode.dry else BUDGET_SHARES).values()))
    report = Report(out, mode, total, sys.argv[:1] + (argv or sys.argv[1:]),
                    enforce=not mode.dry or args.enforce_budget)
    found = optional_imports(mode)
    peaks = {"bf16": float("nan")}
    with report.section("env") as (rec, _):
        section_env(rec, mode, found)
        peaks = {k: v for k, v in rec["matmul_peak_tflops"].items()}
    steps: dict[str, Any] = {}
    for name in [n for n in args.sections if n != "env"]:
        with report.section(name) as (rec, budget):
            if name == "tests":
                section_tests(rec, budget, mode, out, work)
            elif name == "digits":
                section_digits(rec, budget, mode, out, work)
            elif name == "inference":
                section_inference(rec, budget, mode, found, peaks)
            elif name == "train_step":
                section_train_step(rec, budget, mode, found, peaks)
                steps = rec
            elif name == "train_loop":
                section_train_loop(rec, budget, mode, out, work, steps)
            elif name == "attention":
                section_attention(rec, budget, mode, found)
    from render import render, summary_lines
    print("\n".join(summary_lines(report.data)), flush=True)
    (out / "gpu_check.md").write_text(render(report.data))
    print(f"JSON: {out / 'gpu_check.json'}; tables: {out / 'gpu_check.md'}; work files: {work}")
    if report.failed:
        print(f"FAILED sections: {', '.join(report.failed)}", flush=True)
        return 1
    if report.incomplete:
        print(f"INCOMPLETE (time budget) sections: {', '.join(report.incomplete)}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
