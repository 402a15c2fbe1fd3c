"""A model's forward computes from its parameters: nothing derived from a weight survives from one call to
the next of an ordinary model; speed that needs precomputed weights is the explicit inference form
(`model.fuse()`), and the frozen compiled form refuses edited weights."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import hybridvit
from hybridvit.layers import plain_paths
from hybridvit.layers.context import plain

# one model per family (and CabViT's plain form), small input sizes: each family's tables, gathered biases,
# BatchNorms and layer scales are on the path
MODELS = [("fastervit_nano", 64), ("crossformer_t", 64), ("cabvit_h_l1", 64), ("cabvit_p_tiny", 64)]


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = hybridvit.create_model(name, num_classes=10).eval()
    with torch.no_grad():  # layer scales of 1e-5 and unit BN statistics would hide a stale branch
        g = torch.Generator().manual_seed(seed)
        for n, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_floating_point():
                if n.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif t.dim() <= 1 or "gamma" in n:
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
                else:
                    t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return m


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float rounding relative to the logits' scale (a stale answer is off by far more)."""
    torch.testing.assert_close(out, ref, atol=5e-4 * max(1.0, ref.abs().max().item()), rtol=0)


def _reference(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    ref = hybridvit.create_model(name, num_classes=10).eval()
    ref.load_state_dict(state)
    return ref


def _fresh_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """New tensors with perturbed values, written once in place (version 1, as in-place initialised
    parameters are), allocated now: at the addresses the last load freed."""
    g = torch.Generator().manual_seed(seed)

    def new(k: str, v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v.clone()
        value = v + torch.randn(v.shape, generator=g) * 0.1
        return torch.empty_like(v).copy_(value.abs() + 0.1 if k.endswith("running_var") else value)
    return {k: new(k, v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,size", MODELS)
def test_assign_true_loads_never_answer_with_the_old_weights(name, size):
    """Warm forward, then pairs of `load_state_dict(..., assign=True)` (how meta-device and big-model loading
    work): the second load's tensors land at the addresses the first freed, with the same version count, so
    a cache keyed on (pointer, version) answers with old weights (cabvit_h_l1: 2 of 6 trials before)."""
    torch.manual_seed(0)
    model = hybridvit.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        model(x)
        for trial in range(6):
            model.load_state_dict(_fresh_state(model, 2 * trial), assign=True)
            state = _fresh_state(model, 2 * trial + 1)
            expected = _reference(name, {k: v.clone() for k, v in state.items()})(x)
            model.load_state_dict(state, assign=True)
            del state
            _close(model(x), expected)


@pytest.mark.parametrize("name,size", MODELS)
def test_ema_through_p_data_takes_effect_at_the_next_call(name, size):
    """`p.data.mul_(m).add_(q.data, alpha=1 - m)`, as MoCo, DINO, BYOL and MESA teachers update: writes through
    `.data` bypass version counters, so only a forward that reads its parameters follows them."""
    teacher, student = _model(name, 0), _model(name, 1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        teacher(x)
        for _ in range(2):
            for p, q in zip(teacher.parameters(), student.parameters()):
                p.data.mul_(0.5).add_(q.data, alpha=0.5)
            for b, c in zip(teacher.buffers(), student.buffers()):
                if b.is_floating_point():
                    b.data.mul_(0.5).add_(c.data, alpha=0.5)
            _close(teacher(x), _reference(name, teacher.state_dict())(x))


@pytest.mark.parametrize("name,size", MODELS[:3])
def test_averaged_model_in_eval_follows_its_updates(name, size):
    """torch.optim.swa_utils.AveragedModel (EMA), evaluated between updates."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _model(name, 1)
    ema = AveragedModel(_model(name, 0), multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ema(x)
        for _ in range(2):
            ema.update_parameters(model)
            _close(ema(x), _reference(name, ema.module.state_dict())(x))


@pytest.mark.integration
def test_timm_model_ema_v3_follows_its_updates():
    """timm's ModelEmaV3, evaluated between updates, on a hybridvit model."""
    timm_utils = pytest.importorskip("timm.utils", reason="ModelEmaV3 is timm's (the ecosystem lane)")
    model = _model("fastervit_nano", 1)
    ema = timm_utils.ModelEmaV3(_model("fastervit_nano", 0), decay=0.5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ema(x)
        for _ in range(2):
            ema.update(model)
            _close(ema(x), _reference("fastervit_nano", ema.module.state_dict())(x))


def test_plain_paths_is_per_thread_and_restored_out_of_order():
    """Two threads with overlapping `plain_paths()` blocks, exited in the other order: neither sees the
    other's setting, and both end as they started (the old process-global switch stayed off for good)."""
    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]
    seen: dict[str, bool] = {}

    def worker(i: int) -> None:
        seen[f"before{i}"] = plain()
        with plain_paths():
            seen[f"inside{i}"] = plain()
            entered[i].set()
            leave[i].wait(10)
        seen[f"after{i}"] = plain()

    def observer() -> None:
        entered[0].wait(10)
        entered[1].wait(10)
        seen["other_thread"] = plain()

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)] + [threading.Thread(target=observer)]
    for t in threads:
        t.start()
    entered[0].wait(10)
    entered[1].wait(10)
    seen["main_during"] = plain()
    leave[0].set()  # the first to enter leaves first...
    threads[0].join(10)
    leave[1].set()  # ...the second after it
    for t in threads[1:]:
        t.join(10)
    assert seen == {"before0": False, "inside0": True, "after0": False, "before1": False, "inside1": True,
                    "after1": False, "other_thread": False, "main_during": False}
    assert not plain()
    with plain_paths():  # nests, and is restored after an exception
        with plain_paths(False):
            assert not plain()
        assert plain()
    with pytest.raises(KeyError), plain_paths():
        raise KeyError
    assert not plain()


def _tensor_bytes_outside(model: torch.nn.Module, keep: list[torch.Tensor]) -> int:
    """Bytes of live CPU tensors (found by the garbage collector) sharing no storage with the model's parameters
    and buffers nor with `keep`."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *keep]}
    total = 0
    for obj in gc.get_objects():
        try:
            if (isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided
                    and obj.untyped_storage().data_ptr() not in owned):
                total += obj.untyped_storage().nbytes()
        except Exception:  # tensors without storage (meta, wrappers)
            continue
    return total


@pytest.mark.parametrize("name,size", MODELS)
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_an_eval_forward_keeps_no_tensor_beyond_the_model(name, size, amp):
    """Nothing derived from the weights (cast or packed copies, folded BatchNorms, tables) stays alive after
    an eval forward: the only tensors left are the model's parameters and buffers."""
    model = _model(name)
    x = torch.randn(2, 3, size, size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    before = _tensor_bytes_outside(model, [x])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
        out = model(x)
    gc.collect()
    after = _tensor_bytes_outside(model, [x, out])
    assert after - before <= 0.01 * weights, f"{(after - before) / 2 ** 20:.1f} MB of tensors outlived the forward"


_RSS_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, resource, sys, torch, hybridvit
    torch.set_num_threads(1)
    def rss():
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    x, x96 = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 96)
    def forwards(m):
        m.eval()
        with torch.no_grad():
            m(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m(x); m(x96)
    # another instance first: the libraries' code pages, kernel caches and thread pools are the process's,
    # not the model's (about 25-40 MB here whatever the model)
    warm = hybridvit.create_model(sys.argv[1], num_classes=10)
    forwards(warm)
    del warm
    model = hybridvit.create_model(sys.argv[1], num_classes=10)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"weights": weights}
    if sys.argv[2] == "eval-first":
        base = rss()
        forwards(model)
        out["eval_growth"] = rss() - base
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = rss()
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long)).backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    out["train_rss"] = rss()
    out["train_growth"] = out["train_rss"] - start
    print(json.dumps(out))
""")


def _rss(name: str, mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, name, mode], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")
def test_rss_after_eval_forwards_and_a_later_training_step():
    """Eval forwards (fp32, bf16 autocast, two sizes) add at most 15 % of the weight bytes to the process
    (before: packed linear weights, about 95 % of them); a training step after them costs no more than one
    without them."""
    name = "fastervit_0"  # 124 MB of weights: a second copy would be unmistakable
    eval_first, train_only = _rss(name, "eval-first"), _rss(name, "train-only")
    w = eval_first["weights"]
    assert eval_first["eval_growth"] <= 0.15 * w, eval_first
    assert eval_first["train_rss"] <= train_only["train_rss"] + 0.15 * w, (eval_first, train_only)


@pytest.mark.slow
def test_frozen_compile_refuses_edited_weights():
    """The frozen compiled form (`compile_model`, `bench --compile`) answers for the weights it froze: after
    an in-place edit or a load with assign=True it raises instead of answering with the old weights."""
    from hybridvit.bench import compile_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    frozen = compile_model(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x))
        model[0].weight.mul_(2)
        with pytest.raises(RuntimeError, match="compile"):
            frozen(x)
        frozen = compile_model(model)
        torch.testing.assert_close(frozen(x), model(x))
        model.load_state_dict({k: v * 3 for k, v in model.state_dict().items()}, assign=True)
        with pytest.raises(RuntimeError, match="compile"):
            frozen(x)
