"""The GPU traps that the CPU can check (layers/attention.py, the loader plan) and the rehearsal of the GPU
check (`benchmarks/gpu/run.sh --dry-run`, marked slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_cuda import FAMILY_FIXTURES, SIZES, fixture_model
from torch.utils._python_dispatch import TorchDispatchMode

import hybridvit
from hybridvit.analysis.capture import trace_attention
from hybridvit.layers import attention as A
from hybridvit.layers.attention import align_bias, attend, bias_is_aligned

RUN = ROOT / "benchmarks" / "gpu" / "run.sh"


# ------------------------------------------------------------------------------------ bias alignment
def test_align_bias_keeps_shape_values_and_broadcast():
    b = torch.randn(1, 8, 53, 53)
    assert not bias_is_aligned(b)
    a = align_bias(b, torch.bfloat16)
    assert a.shape == b.shape and a.dtype == torch.bfloat16 and bias_is_aligned(a)
    assert torch.equal(a, b.to(torch.bfloat16))
    assert a.untyped_storage().nbytes() == 8 * 53 * 56 * 2  # one padded copy, rows of 56

    # broadcast dimensions stay broadcast: the copy holds each distinct value once
    e = torch.randn(1, 8, 1, 53).expand(4, 8, 53, 53)
    ae = align_bias(e)
    assert ae.shape == e.shape and bias_is_aligned(ae) and torch.equal(ae, e)
    assert ae.stride(0) == 0 and ae.stride(2) == 0
    assert ae.untyped_storage().nbytes() == 8 * 56 * 4

    # size-1 dimensions count too (SDPA tests every stride): CrossFormer's per-group bias
    o = torch.randn(1, 1, 16, 16).as_strided((1, 1, 16, 16), (1, 1, 16, 1))
    ao = align_bias(o)
    assert not bias_is_aligned(o) and bias_is_aligned(ao) and torch.equal(ao, o)

    c = torch.randn(2, 4, 16, 16)
    assert bias_is_aligned(c) and align_bias(c) is c
    assert not bias_is_aligned(c.transpose(-2, -1))


def test_align_bias_passes_the_gradient():
    b = torch.randn(1, 4, 49, 49, requires_grad=True)
    w = torch.randn(1, 4, 49, 49)
    (align_bias(b) * w).sum().backward()
    assert torch.equal(b.grad, w)


@pytest.fixture
def aligned_everywhere(monkeypatch):
    """The CUDA path of `attend` (bias aligned for the memory-efficient kernel) taken on the CPU."""
    monkeypatch.setattr(A, "_aligns_bias", lambda q: True)


class SdpaSpy:
    """Records what F.scaled_dot_product_attention receives: (query dtype, mask dtype, mask aligned)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        real = F.scaled_dot_product_attention
        monkeypatch.setattr(A, "_sdpa_applies", lambda q: True)  # CUDA's choice (the CPU's is explicit)

        def spy(q, k, v, attn_mask=None, **kw):
            if attn_mask is not None:
                self.calls.append((q.dtype, attn_mask.dtype, bias_is_aligned(attn_mask)))
            return real(q, k, v, attn_mask=attn_mask, **kw)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def test_attend_aligned_path_gives_the_same_result(monkeypatch):
    q, k, v = (torch.randn(3, 8, 53, 32) for _ in range(3))
    bias = torch.randn(1, 8, 53, 53)
    monkeypatch.setattr(A, "_sdpa_applies", lambda q: True)
    ref = attend(q, k, v, bias)
    monkeypatch.setattr(A, "_aligns_bias", lambda q: True)
    spy = SdpaSpy(monkeypatch)
    out = attend(q, k, v, bias)
    assert spy.calls == [(torch.float32, torch.float32, True)]
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_family_logits_unchanged_with_aligned_bias(name, monkeypatch):
    """Each family's logits with the CUDA-path (aligned) bias equal the CPU path's, at the fixture size
    and at one that pads windows and groups; SDPA then only sees aligned biases."""
    model = fixture_model(name)
    xs = [torch.randn(1, 3, *s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SIZES)]
    with torch.no_grad():
        ref = [model(x) for x in xs]
        monkeypatch.setattr(A, "_aligns_bias", lambda q: True)
        spy = SdpaSpy(monkeypatch)
        out = [model(x) for x in xs]
    assert spy.calls and all(aligned for _, _, aligned in spy.calls)
    for r, o in zip(ref, out):
        assert torch.allclose(o, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_bias_reaches_sdpa_in_the_query_dtype(name, monkeypatch):
    """Under bf16 autocast (and in a bf16 model) every bias SDPA receives is bf16, as the query: the fp32
    mask with a bf16 query is the cuDNN/memory-efficient trap on SM90."""
    model = fixture_model(name)
    x = torch.randn(1, 3, *SIZES[1])
    spy = SdpaSpy(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    with torch.no_grad():
        model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert spy.calls
    assert all(qd == md == torch.bfloat16 for qd, md, _ in spy.calls)


def test_trace_attention_records_without_changing_the_result():
    model = fixture_model("fastervit_tiny_ls_prop")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        with trace_attention(keep_tensors=True) as tr:
            out = model(x)
    assert torch.equal(out, ref)
    assert tr.records and all(r["q"] == tuple(r["tensors"][0].shape) for r in tr.records)
    assert any(r["q"][2] == 49 + 4 for r in tr.records)  # a window of 7x7 tokens with its 2x2 carriers


# ------------------------------------------------------------------------------------ host syncs
FULL = ["fastervit_0", "crossformerpp_s", "cabvit_h_l2"]


def test_meta_device_catches_host_syncs():
    """The check below can fail: reading a meta tensor on the host raises."""
    t = torch.ones(3, device="meta")
    for read in (lambda: t.sum().item(), lambda: t.cpu(), lambda: t.tolist(), lambda: bool(t.sum() > 0)):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


class HostTensorsOnDevice(TorchDispatchMode):
    """Records ops that bring a host tensor (beyond a 0-dim scalar) to the device: a synchronous copy on
    CUDA (`torch.tensor(...)` or a CPU-made table moved in the forward)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        devices = {a.device.type for a in flat if a.dim() > 0}
        out = func(*args, **(kwargs or {}))
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if ("cpu" in devices and "meta" in devices) or (
                "cpu" in devices and any(o.device.type == "meta" for o in outs)):
            self.seen.append(str(func))
        return out


def test_host_tensor_detector_can_fail():
    mode = HostTensorsOnDevice()
    with mode:
        torch.arange(4).to("meta") + torch.ones(4, device="meta")
    assert mode.seen


@pytest.mark.slow  # published-size models, forward and backward
@pytest.mark.parametrize("name", FULL)
def test_no_host_sync_in_forward_and_backward(name):
    """On the meta device any `.item()`, `.cpu()`, `.tolist()` or data-dependent branch raises, and the
    models take their non-CPU code paths (the CUDA ones): training forward+backward and inference, fp32
    and bf16, at a size that pads windows and groups; and no host tensor is copied to the device."""
    with torch.device("meta"):
        model = hybridvit.create_model(name)
    x = torch.randn(2, 3, 200, 232, device="meta")
    with HostTensorsOnDevice() as mode:
        model(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval().to(torch.bfloat16)
    with torch.no_grad(), mode:
        assert model(x.to(torch.bfloat16)).shape == (2, 1000)
    assert mode.seen == []


# ------------------------------------------------------------------------------------ data loading
def test_loader_plan_keeps_workers_and_pinned_memory_on_cuda():
    from hybridvit.data.loader import EpochSampler, make_loader
    from hybridvit.runtime import plan_threads

    plan = plan_threads("train", device="cuda", cpus=16)
    assert plan.workers == 8 and plan.threads == 1  # the CPUs decode, the GPU computes
    assert plan_threads("train", device="cpu", cpus=16).workers == 4
    data = [{"image": torch.zeros(3, 4, 4), "target": 0}] * 4
    loader = make_loader(data, EpochSampler(4, shuffle=False), 2, workers=2, drop_last=True, pin_memory=True)
    assert loader.pin_memory and loader.num_workers == 2


# ------------------------------------------------------------------------------------ the GPU check
def test_flex_inputs_reproduce_sdpa_with_bias_and_padding():
    """The GPU check's FlexAttention (score_mod = the finite bias, BlockMask = the padded keys) computes what
    SDPA computes with the additive bias, for a per-window padding mask and a broadcast bias."""
    from torch.nn.attention.flex_attention import flex_attention

    from hybridvit.layers import MASK_VALUE

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    from gpu_check import _flex_inputs

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 8, generator=g) for _ in range(3))
    pos = torch.randn(1, 2, 16, 16, generator=g)
    pad = torch.zeros(4, 1, 1, 16)
    pad[1, ..., 12:] = MASK_VALUE  # window 1 has 4 padded keys, window 3 has 9
    pad[3, ..., 7:] = MASK_VALUE
    for bias in (pos, pos + pad):
        score_mod, block_mask = _flex_inputs(q, bias)
        assert (block_mask is not None) == (bias is not pos)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def _run(args: list[str], tmp: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN), "--dry-run", "--out", str(tmp / "out"), "--work", str(tmp / "work"),
                           *args], capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "PYTHON": sys.executable})


@pytest.mark.slow  # runs benchmarks/gpu/run.sh
def test_gpu_check_budget_stops_work_and_says_so(tmp_path):
    """A section its time budget leaves no room for is recorded as not run, and the exit status is 3."""
    p = _run(["--sections", "tests", "--enforce-budget", "--budget-s", "0.01"], tmp_path, 300)
    assert p.returncode == 3, p.stdout + p.stderr
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["sections"]["env"]["status"] == "ok"
    assert data["sections"]["tests"]["status"] == "partial"
    assert data["sections"]["tests"]["not_run"]
    assert "INCOMPLETE" in p.stdout


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """`run.sh --dry-run` runs every section on the CPU and writes their JSON; what is absent here (the
    official code, timm) is recorded as absent, not passed over."""
    p = _run([], tmp_path, 900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    out = tmp_path / "out"
    data = json.loads((out / "gpu_check.json").read_text())
    s = data["sections"]
    assert data["dry_run"] is True
    assert list(s) == ["env", "tests", "digits", "inference", "train_step", "train_loop", "attention"]
    assert all(rec["status"] == "ok" for rec in s.values()), {k: v.get("error") for k, v in s.items()}
    assert sorted(p.name for p in out.iterdir()) == ["cuda_tests.log", "digits_train.log", "gpu_check.json",
                                                           "gpu_check.md", "train_loop.log"]  # few files: OUT
    assert s["env"]["matmul_peak_tflops"]["bf16"] > 0
    assert s["tests"]["tests"] > 0 and s["tests"]["skipped"] == s["tests"]["tests"]
    assert s["digits"]["epochs"] == 1 and 0 <= s["digits"]["val_top1"] <= 100

    inf = s["inference"]
    have_official = (ROOT / "official" / "refs").is_dir()
    ours = [r for r in inf["eager"] if r["model"].endswith("/hybridvit")]
    assert [r["model"].split("/")[0] for r in ours] == FULL
    assert all(r["img_per_s"] > 0 and r["peak_mem_per_img_mb"] > 0 for r in inf["eager"])
    if have_official:
        assert all("ratio_vs_official" in r for r in ours)
        assert all(d < 1e-3 for d in inf["fp32_max_abs_diff_vs_official"].values())
    else:
        assert inf["absent"]["official"].startswith("absent:")
    try:
        import timm  # noqa: F401
        assert any(r["model"].startswith("timm/") for r in inf["eager"])
    except ImportError:
        assert inf["absent"]["timm"].startswith("absent:")
    assert inf["compiled"] and all(r["compiled"] for r in inf["compiled"])

    assert any(r["model"] == "fastervit_0/hybridvit" and r["train"] for r in s["train_step"]["results"])
    loop = s["train_loop"]
    assert loop["loop_img_per_s"] > 0 and isinstance(loop["loop_vs_step"], float)

    fams = s["attention"]["families"]
    assert list(fams) == FULL
    for fam in fams.values():
        assert fam["calls"] > 0 and fam["signatures"]
        for g in fam["signatures"]:
            assert g["dtype"] == g["bias_dtype"] == "torch.bfloat16"
            assert g["accepts"]["MATH"] == "ok"
            assert g["flex_max_abs_diff_vs_sdpa"] < 0.05  # bf16 rounding, not another computation
    assert any(g["flex_block_mask"] for g in fams["crossformerpp_s"]["signatures"]) or \
        fams["crossformerpp_s"]["not_measured"]

    md = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "render.py"), str(out)],
                        capture_output=True, text=True, check=True).stdout
    assert "| model |" in md and "fastervit_0" in md and "DRY RUN" in md
    assert md == (out / "gpu_check.md").read_text()
