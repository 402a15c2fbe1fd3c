"""CUDA checks of the three families (marked `cuda`; they skip with their reason where there is no GPU).

benchmarks/gpu/run.sh runs exactly these first on the GPU machine and fails when any of them fails or
skips there. Models are the official fixtures' (tests/fixtures/official) with their official weights.
"""
from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (none on this machine): benchmarks/gpu/run.sh runs these")]

FIXTURES = ["fastervit_tiny", "fastervit_tiny_ls_prop", "crossformer_tiny", "crossformerpp_tiny", "cabvit_h_tiny"]
FAMILY_FIXTURES = ["fastervit_tiny_ls_prop", "crossformerpp_tiny", "cabvit_h_tiny"]
SIZES = [(224, 224), (160, 208)]  # the fixtures' size, and one that pads windows and groups


def fixture_model(name: str) -> torch.nn.Module:
    """The fixture's model with its official weights, eval, on CPU (the families' own test helpers)."""
    if name.startswith("fastervit"):
        import test_fastervit
        return test_fastervit.fixture_model(load_fixture(name))
    if name.startswith("crossformer"):
        import test_crossformer
        return test_crossformer.fixture_model(name)
    import test_cabvit
    return test_cabvit.fixture_model(load_fixture(name))


@pytest.fixture
def no_tf32():
    """fp32 products in fp32 (TF32 would miss the 1e-4 oracle by design)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.parametrize("name", FIXTURES)
def test_official_fixture_fp32(name, no_tf32):
    fx = load_fixture(name)
    model = fixture_model(name).cuda()
    with torch.no_grad():
        logits = model(fx["input"].cuda()).cpu()
    assert (logits - fx["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_autocast_forward_backward(name, dtype, size, no_tf32):
    model = fixture_model(name).cuda()
    x = torch.randn(2, 3, *size, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=dtype):
            low = model(x)
    assert low.dtype == dtype
    # bf16 keeps 8 bits of mantissa: a few per cent of the logit range; fp16 a quarter of that
    tol = (0.04 if dtype == torch.bfloat16 else 0.01) * ref.abs().max().item() + 1e-3
    assert (low.float() - ref).abs().max().item() <= tol
    model.train()
    with torch.autocast("cuda", dtype=dtype):
        loss = model(x).float().logsumexp(-1).mean()
    # fp16 as training runs it: a scaled loss (GradScaler's role), else small gradients flush to zero
    (loss * (2.0 ** 12 if dtype == torch.float16 else 1.0)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_memory_efficient_kernel_takes_the_bias(name):
    """Every biased attention call of the family reaches SDPA with the bias in the query's dtype and rows
    aligned to 8, and the memory-efficient kernel alone runs it (where the head dimension suits that kernel:
    a multiple of 8 in bf16) with the math kernel's result."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hybridvit.analysis.capture import trace_attention
    from hybridvit.layers.attention import bias_is_aligned

    model = fixture_model(name).cuda()
    x = torch.randn(2, 3, *SIZES[1], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with trace_attention(keep_tensors=True) as tr:
            model(x)
    biased = [r for r in tr.records if r["bias"] is not None]
    assert biased
    assert all(r["bias_dtype"] == r["dtype"] == "torch.bfloat16" for r in biased)
    assert all(bias_is_aligned(r["tensors"][3]) for r in biased)
    checked = 0
    for r in biased:
        q, k, v, bias = r["tensors"]
        if q.shape[-1] % 8:
            continue
        with torch.no_grad():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=r["scale"])
            with sdpa_kernel([SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=r["scale"])
        assert (out.float() - ref.float()).abs().max().item() <= 2e-2
        checked += 1
    assert checked


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_no_host_sync_in_forward_and_backward(name):
    """`torch.cuda.set_sync_debug_mode('error')` raises on any host synchronisation (.item(), .cpu(),
    data-dependent shapes) inside the model."""
    model = fixture_model(name).cuda()
    x = torch.randn(2, 3, *SIZES[1], device="cuda")
    with torch.no_grad():
        model(x)  # a first forward (kernel selection, allocator) before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_compile_two_sizes(name, no_tf32):
    # last in the file: the slowest tests (an inductor build per size), cut first by run.sh's time budget
    model = fixture_model(name).cuda()
    compiled = torch.compile(model, dynamic=False)
    for size in SIZES:
        x = torch.randn(2, 3, *size, device="cuda")
        with torch.no_grad():
            ref, out = model(x), compiled(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item())
