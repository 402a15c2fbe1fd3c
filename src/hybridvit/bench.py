"""`hybridvit bench`: throughput, batch-1 latency, peak memory, GMACs and achieved FLOP/s.

Timing: warm-up iterations, then `repeats` timed runs (device synchronised); each figure is the median,
with its spread (min, median, max over the runs) beside it. Throughput and latency of several models
are measured in one process, in interleaved rounds, so that their ratios are comparable even on a noisy
machine; a figure whose runs spread wider than `SPREAD_WARNING` (max/min) is flagged as too noisy to
compare.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .flops import count_macs
from .precision import Precision


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# max/min of a figure's timed runs beyond which two figures are not comparable (a noisy machine, a run
# that paged or was preempted): the table says so in a warning line
SPREAD_WARNING = 1.25


def spread(times_s: list[float]) -> dict[str, float]:
    """min, median and max of timed runs (seconds), in milliseconds."""
    return {"min": round(min(times_s) * 1e3, 3), "median": round(statistics.median(times_s) * 1e3, 3),
            "max": round(max(times_s) * 1e3, 3)}


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode (CPU has no allocator statistics)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0:
            return
        if key not in self.live:
            self.live[key] = st.nbytes()
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key] = self.refs.get(key, 0) + 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory in bytes allocated while running `fn` (beyond what was allocated before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    mode = _LiveTensorBytes()
    with mode:
        fn()
    return mode.peak


def time_runs(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense matrix-multiply rate, the reference for achieved FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    t = min(time_runs(lambda: a @ b, device, repeats))
    return 2 * n ** 3 / t / 1e9


def make_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: str | None,
              train: bool, optimizer: str = "sgd") -> Callable[[], Any]:
    precision = Precision.from_amp(amp, device)
    if not train:
        def step():
            with torch.inference_mode(), precision.autocast():
                return model(x)
        return step
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', not {optimizer!r}")
    opt = (torch.optim.SGD(model.parameters(), lr=1e-6) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-6))
    target = torch.zeros(x.shape[0], dtype=torch.long, device=device)

    def step():
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def check_model_name(name: str) -> None:
    """ValueError saying what to do for an unknown hybridvit name (close names) or a timm:<name> without
    timm installed or unknown to timm; nothing is built."""
    if not name.startswith("timm:"):
        from .registry import get_entry
        get_entry(name)
        return
    try:
        import timm
    except ImportError as e:
        raise ValueError(f"--compare {name} needs timm: pip install 'hybridvit[timm]'") from e
    if not timm.is_model(name[5:]):
        raise ValueError(f"timm has no model {name[5:]!r}; timm.list_models('PATTERN*') lists its names")


COMPILE_MODES = ("freezing", "default")


class FrozenCompiled(torch.nn.Module):
    """`torch.compile(model)` run with inductor's `freezing` switched on: a frozen copy of the model.

    Freezing makes the parameters and buffers constants of the compiled graph (prepacked weights, folded
    tables), so the compiled model answers for the weights it was frozen with. It keeps the identity and
    version counter of every parameter and buffer it froze, and each call refuses to run once any of them
    changed (an in-place edit, `load_state_dict`, a replaced tensor): compile again after an edit. Writes
    through `p.data` bypass version counters, as they bypass autograd's checks; do not edit a model through
    `.data` while a frozen copy of it serves.

    Inductor compiles at the first call (and at each new input shape), so the setting must hold while the
    model runs: `torch.compile(..., options={"freezing": True})` does not reach the freezing step (measured
    with torch 2.13: the parameters stay graph inputs and nothing is folded), a patch of inductor's config
    around each call does. `_orig_mod` is the model, as on torch.compile's own wrapper."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        # static shapes: a new batch size or image size compiles its own graph (as a deployment runs one
        # shape), where automatic dynamic shapes would recompile every graph symbolically
        self.compiled = torch.compile(model, dynamic=False)
        self._frozen = self._fingerprint()

    def _fingerprint(self) -> list[tuple[str, int, int]]:
        tensors = list(self._orig_mod.named_parameters()) + list(self._orig_mod.named_buffers())
        return [(name, id(t), t._version) for name, t in tensors]

    @property
    def _orig_mod(self) -> torch.nn.Module:
        return self.compiled._orig_mod

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        if self._fingerprint() != self._frozen:
            changed = next((a[0] for a, b in zip(self._fingerprint(), self._frozen) if a != b), "a tensor")
            raise RuntimeError(f"the weights of this frozen compiled model changed since it was compiled ({changed}); "
                               "it would answer with the old ones. Compile the edited model again "
                               "(hybridvit.bench.compile_model)")
        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def compile_model(model: torch.nn.Module, train: bool = False, mode: str = "freezing") -> torch.nn.Module:
    """torch.compile as `hybridvit bench --compile` applies it.

    For inference, inductor's `freezing` (mode "freezing", the default; `FrozenCompiled`): the parameters
    and buffers become constants of the graph, so inductor prepacks the weights of oneDNN linears and
    convolutions and fuses their bias and activation epilogues, and folds whatever depends on them only
    (the position-bias tables and their gathers: the softmax then reads one constant bias); static shapes.
    Freezing applies only where autograd is off, and the compiled model is a frozen copy: it answers for
    the weights it was frozen with and refuses to run after an edit (compile again).
    For training (or mode "default"): torch.compile's defaults. The attention runs in the explicit form
    under compile on the CPU (layers/attention.py), which inductor fuses."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    # dynamo's cache of this module's graphs does not know inductor's freezing: without a reset, compiling
    # an edited model again would reuse the graph frozen with its old weights (and a default compile after
    # a frozen one the frozen graph). Other compiled models recompile at their next call.
    torch.compiler.reset()
    if train or mode == "default":
        return torch.compile(model)
    return FrozenCompiled(model)


def prepare(name_or_model: str | torch.nn.Module, device: torch.device, channels_last: bool = True,
            compile: bool | str = False, train: bool = False, fuse: bool = False) -> tuple[torch.nn.Module, str]:
    """The model to time: built (a hybridvit name, timm:<name>, or a module), on `device`, in train or
    eval mode, optionally fused and channels_last, and compiled (`compile`: True or a mode of
    `compile_model`)."""
    if isinstance(name_or_model, str):
        label = name_or_model
        check_model_name(name_or_model)
        if name_or_model.startswith("timm:"):
            import timm
            model = timm.create_model(name_or_model[5:])
        else:
            from .loading import create_model
            model = create_model(name_or_model)
    else:
        model, label = name_or_model, type(name_or_model).__name__
    model = model.to(device).train(train)
    if fuse and not train and hasattr(model, "fuse"):
        model.fuse()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = compile_model(model, train, "freezing" if compile is True else compile)
    return model, label


def bench_models(models: list[tuple[str, torch.nn.Module]], *, batch_size: int = 16, img_size: int = 224,
                 device: str = "cpu", amp: str | None = None, train: bool = False, warmup: int = 3,
                 repeats: int = 5, latency: bool = True, memory: bool = True,
                 optimizer: str = "sgd") -> list[dict[str, Any]]:
    """Benchmarks already-built models side by side (interleaved repeats)."""
    dev = torch.device(device)
    # plain NCHW input, as users pass it: a model that prefers channels_last converts internally
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    x1 = x[:1].clone()
    steps = [make_step(m, x, dev, amp, train, optimizer) for _, m in models]
    steps1 = [make_step(m, x1, dev, amp, train, optimizer) for _, m in models] if latency else []
    for s in steps + steps1:
        for _ in range(warmup):
            s()
    times: list[list[float]] = [[] for _ in models]
    times1: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):  # interleaved: drifts of a noisy machine hit every model alike
        for i, s in enumerate(steps):
            times[i] += time_runs(s, dev, 1)
        for i, s in enumerate(steps1):
            times1[i] += time_runs(s, dev, 3)
    results = []
    for i, (label, model) in enumerate(models):
        base = getattr(model, "macs_source", None) or getattr(model, "_orig_mod", model)
        macs = count_macs(base, (3, img_size, img_size))  # the counter of `models` and the README
        t = statistics.median(times[i])
        batch_spread = spread(times[i])
        r = {"model": label, "batch_size": batch_size, "img_size": img_size, "device": device,
             "amp": Precision.from_amp(amp, dev).name,
             "train": train, **({"optimizer": optimizer} if train else {}),
             "img_per_s": batch_size / t, "batch_time_ms": t * 1e3,
             "gmacs_per_img": macs / 1e9, "achieved_gflops": 2 * macs * batch_size / t / 1e9 * (3 if train else 1),
             "times_ms": [round(v * 1e3, 2) for v in times[i]],
             # min/median/max over the runs; img/s from the slowest and fastest batch
             "spread": {"batch_time_ms": batch_spread,
                        "img_per_s": {"min": batch_size / max(times[i]), "median": batch_size / t,
                                      "max": batch_size / min(times[i])}}}
        if getattr(model, "runtime", None):  # an exported file (deploy.ExportedModel): its runtime, int8 or not
            r["runtime"], r["int8"] = model.runtime, bool(model.int8)

        if latency:
            r["latency_b1_ms"] = statistics.median(times1[i]) * 1e3
            r["times_b1_ms"] = [round(v * 1e3, 2) for v in times1[i]]
            r["spread"]["latency_b1_ms"] = spread(times1[i])
        if memory and not hasattr(model, "macs_source"):  # a runtime's own memory is not PyTorch's to count
            r["peak_mem_per_img_mb"] = peak_memory(steps[i], dev) / batch_size / 2 ** 20
        results.append(r)
    return results


RUNTIMES = ("torch", "compile", "onnxruntime", "openvino", "openvino-int8")
_EXPORTED = {"onnxruntime", "openvino", "openvino-int8"}


def runtime_models(model: torch.nn.Module, args: argparse.Namespace, dev: torch.device,
                   img_size: int, folder: str) -> list[tuple[str, torch.nn.Module]]:
    """`model` in each runtime of `args.runtime`, labelled 'NAME [runtime]' (the exported files are written
    in `folder`, which must live as long as the models)."""
    from .deploy import runtime_model

    if args.train and set(args.runtime) & _EXPORTED:
        raise ValueError("--runtime onnxruntime/openvino time inference only: leave --train out")
    if dev.type != "cpu" and set(args.runtime) & _EXPORTED:
        raise ValueError("--runtime onnxruntime/openvino run on the CPU here: pass --device cpu")
    out = []
    for rt in args.runtime:
        if rt in ("torch", "compile"):
            compiled = (args.compile or "freezing") if rt == "compile" else False
            m = prepare(model, dev, not args.no_channels_last, compiled, args.train, args.fuse)[0]
        else:
            m = runtime_model(model.eval(), rt, (img_size, img_size), folder,
                              precision="bf16" if args.amp == "bf16" else "fp32")
        out.append((f"{model.model_name} [{rt}]", m))
    return out


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform reports, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "argv": sys.argv}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def header_line(res: list[dict[str, Any]], env: dict[str, Any], repeats: int) -> str:
    """What the figures were measured with: batch, image size, threads, device and its name, precision."""
    r = res[0]
    where = f"{r['device']} ({env['gpu']})" if "gpu" in env else f"{r['device']} ({env['cpu']})"
    mode = f"training step ({r['optimizer']})" if r["train"] else "inference"
    threads = f"{env['threads']} thread{'' if env['threads'] == 1 else 's'}"
    return (f"{mode}: batch {r['batch_size']}, {r['img_size']}x{r['img_size']}, {threads}, {where}, amp {r['amp']}; "
            f"median of {repeats} runs (min-max)")


def _range(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['min']:.{digits}f}-{s['max']:.{digits}f}"


def table_lines(res: list[dict[str, Any]]) -> list[str]:
    """The printed table: each figure with its spread, then a warning line per figure too noisy to compare."""
    ref = res[0]["img_per_s"]
    w = max(24, *(len(r["model"]) + 2 for r in res))
    lines = [f"{'model':<{w}}{'img/s':>9} {'(min-max)':<15}{'ratio':>6}{'b1 ms':>8} {'(min-max)':<13}"
             f"{'MB/img':>7}{'GMACs':>7}{'GFLOP/s':>9}"]
    for r in res:
        sp = r["spread"]
        b1 = f"{r['latency_b1_ms']:>8.1f} {'(' + _range(sp['latency_b1_ms']) + ')':<13}" if "latency_b1_ms" in r \
            else f"{'-':>8} {'':<13}"
        lines.append(f"{r['model']:<{w}}{r['img_per_s']:>9.1f} {'(' + _range(sp['img_per_s']) + ')':<15}"
                     f"{r['img_per_s'] / ref:>6.2f}{b1}{r.get('peak_mem_per_img_mb', 0):>7.1f}"
                     f"{r['gmacs_per_img']:>7.2f}{r['achieved_gflops']:>9.1f}")
    for r in res:
        for key, what in (("batch_time_ms", f"batch-{r['batch_size']} time"), ("latency_b1_ms", "batch-1 latency")):
            s = r["spread"].get(key)
            if s and s["min"] > 0 and s["max"] / s["min"] > SPREAD_WARNING:
                lines.append(f"warning: {r['model']}: {what} spread {_range(s)} ms (max/min {s['max'] / s['min']:.2f} "
                             f"> {SPREAD_WARNING}): too wide to compare; rerun on an idle machine or with more "
                             "--repeats")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import options

    options.add_model(p, "registered model name (not needed with a run checkpoint)")
    options.add_pretrained(p, options.PRETRAINED_SOURCES + "; default random weights")
    p.add_argument("--compare", nargs="*", default=[], metavar="M",
                   help="other models measured in the same run (hybridvit names, or timm:<name> if timm is installed)")
    options.add_batch_size(p, 16)
    options.add_img_size(p, whose="the checkpoint's, else the model's")
    options.add_device(p)
    options.add_amp(p, "none")
    p.add_argument("--compile", nargs="?", const="freezing", default=None, choices=COMPILE_MODES,
                   help="torch.compile the models; for inference with inductor's freezing (the default: "
                        "weights prepacked as graph constants), or 'default' for torch.compile's defaults")
    p.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=None, metavar="RUNTIME",
                   help="time the (first) model in each of these side by side: torch (eager), compile "
                        "(torch.compile), onnxruntime and openvino (its ONNX / OpenVINO export; the onnx and "
                        "openvino extras), openvino-int8 (export --int8, calibrated on noise: for its speed only; "
                        "the int8 extra); with --peak, each row's share of the matmul peak")
    p.add_argument("--train", action="store_true", help="time a training step (forward, backward, SGD step)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="time the models in the NCHW memory format instead of channels_last")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="time hybridvit models as built instead of their inference form (model.fuse(): BatchNorms "
                        "and layer scales folded, position-bias tables computed once)")
    options.add_threads(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before measuring (default: 3)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported, with the min and "
                   "max (default: 7)")
    p.add_argument("--peak", action="store_true", help="also measure the dense matmul peak (GFLOP/s) for reference")
    options.add_json(p, "the results, the environment and the command")
    options.add_overwrite(p, "the --json file")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from ._stop import remove_on_stop

    # the exported files of --runtime live in a temporary folder, removed at the end (and at Ctrl-C)
    with tempfile.TemporaryDirectory(prefix="hybridvit-bench-") as folder, remove_on_stop(folder):
        return _run(args, folder)


def _run(args: argparse.Namespace, folder: str) -> int:
    from ._io import check_output_file, write_json
    from .inference import load_for_command
    from .runtime import check_img_size, plan_threads, resolve_device

    # every argument is checked before anything is built: a wrong name fails in a second, not after set-up
    for name in [*([args.model] if args.model else []), *args.compare]:
        check_model_name(name)
    for flag in ("batch_size", "img_size", "repeats"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    dev = resolve_device(args.device)
    Precision.from_amp(args.amp, dev)  # an unknown --amp fails before anything is built
    args.device = str(dev)
    plan_threads("bench", device=dev, threads=args.threads).apply()
    first = load_for_command(args.pretrained, args.model)  # random weights without --pretrained
    check_img_size(first.model_name, args.img_size)
    img_size = args.img_size or first.pretrained_cfg["input_size"][-1]
    if args.runtime:
        models = runtime_models(first, args, dev, img_size, folder)
    else:
        models = [(first.model_name, prepare(first, dev, not args.no_channels_last, args.compile, args.train,
                                             args.fuse)[0])]
    models += [prepare(n, dev, not args.no_channels_last, args.compile, args.train, args.fuse)[::-1]
               for n in args.compare]
    res = bench_models(models, batch_size=args.batch_size, img_size=img_size, device=args.device,
                       amp=args.amp, train=args.train, warmup=args.warmup, repeats=args.repeats)
    out: dict[str, Any] = {"results": res, "environment": environment(args.device),
                           "command": "hybridvit " + " ".join(getattr(args, "_argv", sys.argv[1:]))}
    if args.peak:
        precision = Precision.from_amp(args.amp, dev)
        dtype = precision.dtype or torch.float32
        out["matmul_peak_gflops"] = matmul_peak_gflops(dev, dtype)
    out["header"] = header_line(res, out["environment"], args.repeats)
    print(out["header"])
    for line in table_lines(res):
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    if args.peak:
        pk = out["matmul_peak_gflops"]
        for r in res:
            # int8 products (VNNI) have a peak of their own: an int8 row is not a share of the float peak
            r["pct_of_peak"] = None if r.get("int8") else 100 * r["achieved_gflops"] / pk
        print(f"matmul peak: {pk:.0f} GFLOP/s; " + ", ".join(
            f"{r['model']} reaches {r['pct_of_peak']:.0f}%" if r["pct_of_peak"] is not None
            else f"{r['model']} is int8 (not a share of this peak)" for r in res))
    if args.json:
        write_json(args.json, out)
    return 0
