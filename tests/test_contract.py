"""The model contract every registered model keeps (after timm's tests/test_models.py).

Small models of every family run for real (at 224 and at an odd 250x330, plus smaller inputs where a
test needs several passes); every other model is checked on the `meta` device (shapes, feature_info,
pretrained_cfg), which costs no memory or compute.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import re
from collections.abc import Callable

import pytest
import torch
from conftest import load_fixture

import hybridvit
from hybridvit.layers import derived, plain_paths
from hybridvit.registry import get_entry, list_models, meta_model

# the smallest registered model of each kind (test_real_models_cover_every_kind keeps this in step with the
# registry); CrossFormer and CabViT-P narrowed and shortened (every code path, less compute), FasterViT with
# its optional parts on (carrier tokens in both HAT stages, layer scales, propagation)
REAL = {"fastervit_nano": dict(hat=(False, False, True, True), layer_scale=0.1, layer_scale_conv=0.1,
                               do_propagation=True),
        "crossformer_t": dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2)),
        "crossformerpp_s": dict(embed_dim=16, depths=(1, 1, 3, 1), num_heads=(1, 1, 2, 2)),
        "cabvit_h_l1": {}, "cabvit_p_tiny": dict(embed_dim=32, depths=(2, 2, 1), num_heads=2)}
ALL = list_models()


def _fast_tier(names: list[str]) -> list:
    """`names` as parameters, the models of the REAL table in the fast tier and every other registered
    variant marked slow (`pytest -m "not slow"` while editing; CI runs them all)."""
    return [n if n in REAL else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _kind(name: str) -> str:
    """A registered name without its size: fastervit_4_21k_224 -> fastervit, crossformerpp_s -> crossformerpp,
    cabvit_h_l1 -> cabvit_h."""
    return re.sub(r"_(nano|tiny|small|base|l\d|[a-z]|\d.*)$", "", name)


def _real(*kinds: str) -> list[str]:
    """The real-run models of these kinds."""
    return [n for n in REAL if _kind(n) in kinds]


ODD = (250, 330)
TIMM_FIELDS = {"input_size", "min_input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std",
               "first_conv", "classifier", "pool_size", "license", "origin_url", "paper_ids", "num_classes"}


def _model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return hybridvit.create_model(name, num_classes=kw.pop("num_classes", 7), drop_path_rate=0.0,
                                  **{**REAL.get(name, {}), **kw})


@pytest.fixture(scope="module", params=list(REAL))
def real(request):
    return request.param, _model(request.param).eval()


def _map_size(name: str, side: int, reduction: int) -> int:
    """Padded convolutions round up (FasterViT, CabViT-H); CrossFormer's CEL and patch embeddings floor."""
    return side // reduction if get_entry(name).family == "crossformer" or "_p_" in name else -(-side // reduction)


def _check_maps(name, model, maps, size, feature_info):
    infos = feature_info.get_dicts()  # timm's FeatureInfo: the dicts of the maps returned
    assert feature_info.channels() == [i["num_chs"] for i in infos]
    assert feature_info.reduction() == [i["reduction"] for i in infos]
    assert [m.shape[1] for m in maps] == [i["num_chs"] for i in infos]
    assert [tuple(m.shape[-2:]) for m in maps] == [
        (_map_size(name, size[0], i["reduction"]), _map_size(name, size[1], i["reduction"])) for i in infos]
    modules = dict(model.named_modules())
    assert all(set(i) == {"num_chs", "reduction", "module", "index"} and i["module"] in modules for i in infos)


# ------------------------------------------------------------------------------------------ every model
@pytest.mark.slow  # builds every registered model on meta
def test_real_models_cover_every_kind():
    """Every kind of registered model runs for real here, with its smallest registered model."""
    from hybridvit.registry import count_params

    kinds = {_kind(n) for n in ALL}
    assert sorted(_kind(n) for n in REAL) == sorted(kinds)
    for name in REAL:
        same = [n for n in ALL if _kind(n) == _kind(name)]
        assert count_params(meta_model(name)) == min(count_params(meta_model(n)) for n in same), name


@pytest.mark.parametrize("name", _fast_tier(ALL))
def test_every_model_on_meta(name):
    """Every registered model on the meta device: pretrained_cfg fields, forward / forward_features /
    forward_intermediates shapes at the configured size, feature_info, and features_only with the later
    stages, the final norm and the head removed."""
    entry = get_entry(name)
    cfg = entry.pretrained_cfg
    assert TIMM_FIELDS <= set(cfg), TIMM_FIELDS - set(cfg)
    assert cfg["crop_mode"] in ("center", "squash") and 0 < cfg["crop_pct"] <= 1
    assert cfg["input_size"][0] == cfg["min_input_size"][0] == 3 and cfg["num_classes"] == 1000
    assert entry.license == cfg["license"] and cfg["paper_ids"].startswith("arXiv:")
    model = meta_model(name).eval()
    modules = dict(model.named_modules())
    first = (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]
    assert all(f in modules for f in first) and cfg["classifier"] in modules
    assert model.pretrained_cfg == cfg and model.model_name == name
    side = cfg["input_size"][-1]
    with torch.device("meta"):
        x = torch.empty(2, 3, side, side)
    with torch.no_grad():
        logits = model(x)
        final, maps = model.forward_intermediates(x)
        pooled = model.forward_head(final, pre_logits=True)
    assert logits.shape == (2, 1000) and pooled.shape == (2, model.num_features)
    _check_maps(name, model, maps, (side, side), model.feature_info)
    n = len(model.stages)
    model.set_features_only((0, n - 2))
    assert len(model.stages) == n - 1 and not any(k.startswith(("head.", "norm.")) for k in model.state_dict())
    with torch.no_grad():
        _check_maps(name, model, model(x), (side, side), model.feature_info)


# ------------------------------------------------------------------------------------ small models, real
@pytest.mark.parametrize("size", [(224, 224), ODD])
def test_forward_head_features_agree(real, size):
    name, model = real
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        final, normed = model.forward_intermediates(x, norm=True)
        pooled = model.forward_head(feats, pre_logits=True)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    torch.testing.assert_close(model.forward_head(feats), logits, rtol=0, atol=0)
    torch.testing.assert_close(final, feats, rtol=0, atol=0)
    assert pooled.shape == (1, model.num_features)
    _check_maps(name, model, normed, size, model.feature_info)
    if feats.ndim == 4:  # NCHW models: the normalised last map is forward_features
        torch.testing.assert_close(normed[-1], feats, rtol=0, atol=0)


def test_forward_intermediates_indices_and_stop_early(real):
    name, model = real
    x = torch.randn(1, 3, 64, 96)
    n = len(model.stages)
    ran = []
    hooks = [s.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, s in enumerate(model.stages)]
    try:
        with torch.no_grad():
            _, every = model.forward_intermediates(x)
            assert ran == list(range(n))
            _, normed = model.forward_intermediates(x, norm=True)
            assert all(torch.equal(a, b) for a, b in zip(every[:-1], normed[:-1]))  # only the last changes
            last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
            neg = model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)
            nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
            ran.clear()
            final, early = model.forward_intermediates(x, indices=[0], stop_early=True)
            assert ran == [0]  # stages after the last requested one never ran
    finally:
        for h in hooks:
            h.remove()
    assert all(torch.equal(a, b) for a, b in zip(last2, every[-2:])) and len(last2) == 2
    assert torch.equal(neg[0], every[0]) and torch.equal(neg[1], every[-1])  # stage order, as timm
    assert torch.equal(nhwc[0], every[1].permute(0, 2, 3, 1))
    assert torch.equal(early[0], every[0]) and len(early) == 1
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[n])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_prune_intermediate_layers(real):
    name, model = real
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _, ref = model.forward_intermediates(x)
    pruned = copy.deepcopy(model)
    n = len(model.stages)
    assert pruned.prune_intermediate_layers(indices=[-n, 1], prune_norm=True) == [0, 1]
    assert len(pruned.stages) == 2 and isinstance(pruned.head, torch.nn.Identity)
    assert isinstance(pruned.norm, torch.nn.Identity)
    with torch.no_grad():
        maps = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, ref[:2]))


def test_features_only_removes_unused_parts(real):
    name, model = real
    n = len(model.stages)
    backbone = _model(name, features_only=True, out_indices=(-2, 0)).eval()
    assert backbone.out_indices == (0, n - 2) and len(backbone.stages) == n - 1
    assert backbone.feature_info == [model.stage_info[0], model.stage_info[n - 2]]
    x = torch.randn(2, 3, 72, 104)
    backbone.train()
    outs = backbone(x)
    _check_maps(name, backbone, outs, tuple(x.shape[-2:]), backbone.feature_info)
    sum(o.mean() for o in outs).backward()
    unused = [k for k, p in backbone.named_parameters() if p.grad is None]
    assert not unused, unused  # what DDP needs to run without find_unused_parameters


def test_reset_classifier_and_pre_logits(real):
    name, model = real
    m = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 96)
    m.reset_classifier(0)
    with torch.no_grad():
        pooled = m(x)
        m.reset_classifier(3)
        assert m(x).shape == (2, 3)
        torch.testing.assert_close(m.forward_head(m.forward_features(x), pre_logits=True), pooled)
    assert pooled.shape == (2, model.num_features)


def _grads(model, x):
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().square().mean().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


def test_backward_reaches_every_parameter_and_grad_checkpointing_agrees(real):
    name, _ = real
    model = _model(name).train()
    x = torch.randn(2, 3, 64, 96)
    out, grads = _grads(model, x)
    missing = [k for k, g in grads.items() if g is None]
    assert not missing, missing
    model.set_grad_checkpointing(True)
    out_ck, grads_ck = _grads(model, x)
    torch.testing.assert_close(out_ck, out, rtol=1e-5, atol=1e-6)
    for k, g in grads.items():
        torch.testing.assert_close(grads_ck[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_plain_paths_equal_the_default(real):
    name, model = real
    for size in [(224, 224), (72, 104)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            fast = model(x)
            with plain_paths():
                plain = model(x)
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5 * plain.abs().max().item())


def _fused_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("fused_table_")}


def test_fuse_is_each_blocks_own_and_keeps_the_output(real):
    """HybridModel.fuse() calls every block's own fuse(): no BatchNorm is left in those blocks, the output
    is unchanged, the position tables and gathered biases of the configured size are stored as
    non-persistent `fused_table_*` buffers (none before), and the fused model is frozen: it refuses to
    train and to load weights."""
    name, model = real
    model = copy.deepcopy(model)
    blocks = [n for n, m in model.named_modules() if m is not model and callable(getattr(m, "fuse", None))]
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    side = model.pretrained_cfg["input_size"][-1]
    at_size = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    assert not _fused_tables(model)
    state = model.state_dict()
    with torch.no_grad():
        ref, ref_at_size = model(x), model(at_size)
        out = model.fuse()(x)
        out_at_size = model(at_size)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(out_at_size, ref_at_size, rtol=1e-4, atol=1e-5 * ref_at_size.abs().max().item())
    assert model.is_fused and model.fuse() is model
    fused = dict(model.named_modules())
    assert not [n for n in blocks if any(isinstance(m, torch.nn.BatchNorm2d) for m in fused[n].modules())]
    tables = _fused_tables(model)
    assert tables, "fuse() stored no table"
    assert not set(tables) & set(model.state_dict())  # non-persistent: never saved
    stored = {f"{n}.{b}".lstrip(".") for n, m in model.named_modules()
              for b in m.__dict__.get("_fused_tables", {}).values()}
    assert stored == set(tables)
    for m in model.modules():  # `derived` answers the stored table for its geometry, without computing
        for key, buffer in m.__dict__.get("_fused_tables", {}).items():
            assert derived(m, key, lambda: pytest.fail("computed again")) is getattr(m, buffer)
    with pytest.raises(RuntimeError, match="fused for inference"):
        model.train()
    with pytest.raises(RuntimeError, match="fused for inference"):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match="fused for inference"):  # folded, not copied: no weights to save
        hybridvit.save_pretrained(model, "never-written")
    assert sum(p.numel() for p in model.parameters()) <= sum(v.numel() for v in state.values())


def test_check_input(real):
    name, model = real
    min_side = model.pretrained_cfg["min_input_size"][-1]
    with pytest.raises(ValueError, match="3-channel input but got 1 channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="batch of images"):
        model(torch.randn(3, 64, 64))
    if min_side > 1:
        with pytest.raises(ValueError, match=f"at least {min_side}x{min_side} pixels"):
            model(torch.randn(1, 3, min_side - 1, 64))
    with torch.no_grad():
        assert model(torch.randn(1, 3, min_side, min_side)).shape == (1, 7)


# ------------------------------------------------------------ no hidden state, tracing, compilation
def _stale_fastervit():
    """test_fastervit's small model (carrier tokens, layer scale, propagation; 16 position tables), a
    copy with other weights, and a training step on another batch."""
    from test_fastervit import _small_model

    def other():
        m = _small_model()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return m.eval()

    def step(model, x):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()(torch.randn(2, 3, 64, 64)).square().mean().backward()
        opt.step()

    return _small_model().eval(), other(), torch.randn(1, 3, 64, 64), step


def _stale_crossformerpp():
    """test_crossformer's small CrossFormer++ (DPB position tables), a second one, and a cross-entropy step."""
    import torch.nn.functional as F
    from test_crossformer import _small_pp

    def step(model, x):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()

    torch.manual_seed(0)
    model, other = _small_pp().eval(), _small_pp().eval()
    return model, other, torch.randn(2, 3, 64, 64), step


def _dpbs_are_float64(model):
    from hybridvit.models.crossformer import DynamicPositionBias

    dpbs = [m for m in model.modules() if isinstance(m, DynamicPositionBias)]
    assert dpbs and all(d(d.group_size).dtype == torch.float64 for d in dpbs)  # computed in float64


STALE_CASES = {  # build, fp32 tolerance, float64 tolerance, a check after the cast to float64
    "fastervit_tables": (_stale_fastervit, dict(atol=1e-6, rtol=1e-6), dict(atol=1e-7, rtol=1e-7), None),
    "crossformerpp_dpb": (_stale_crossformerpp, dict(atol=1e-5, rtol=0), dict(atol=1e-12, rtol=0),
                          _dpbs_are_float64),
}


@pytest.mark.parametrize("case", list(STALE_CASES))
def test_position_tables_follow_training_loading_in_place_and_data_edits_and_casting(case):
    """An ordinary (unfused) model computes its position tables (FasterViT's, CrossFormer's DPB) at every
    forward and keeps none: after a training step and eval(), after load_state_dict in eval mode, after
    in-place edits (an EMA update) and writes through `p.data` (which bypass version counters) without
    eval() again, and after a cast to float64, the no-grad forward changes at once and equals the autograd
    one (every table computed from its MLP)."""
    build, tol, tol64, check64 = STALE_CASES[case]
    model, other, x, step = build()
    with torch.no_grad():
        before = model(x)
    assert not _fused_tables(model)
    step(model, x)  # training changes the position MLPs
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, model(x).detach(), **tol)
    model.load_state_dict(other.state_dict())  # in eval mode
    with torch.no_grad():
        loaded = model(x)
        torch.testing.assert_close(loaded, other(x), **tol)
    torch.testing.assert_close(loaded, other(x).detach(), **tol)
    with torch.no_grad():  # in-place edits (an EMA update) in eval mode, without eval() again
        for p in model.parameters():
            p.mul_(0.9)
        edited = model(x)
    assert (edited - loaded).abs().max() > 1e-4
    torch.testing.assert_close(edited, model(x).detach(), **tol)
    for p in model.parameters():  # through .data: no version counter moves
        p.data.mul_(1.1)
    with torch.no_grad():
        written = model(x)
    assert (written - edited).abs().max() > 1e-4
    torch.testing.assert_close(written, model(x).detach(), **tol)
    assert not _fused_tables(model)
    model = model.to(torch.float64)  # the tables are computed in the new dtype
    with torch.no_grad():
        fast = model(x.double())
    if check64 is not None:
        check64(model)
    torch.testing.assert_close(fast, model(x.double()).detach(), **tol64)


@pytest.mark.parametrize("name", _real("fastervit", "crossformer"))  # the position tables
def test_in_place_weight_edit_in_eval_is_never_stale(name):
    """An external EMA (torch.optim.swa_utils.AveragedModel) edits the eval model's weights in place and
    never calls eval() again: its outputs follow at once, and so they do after a write through `p.data`
    (nothing is keyed on the parameters: the position tables are computed at every forward)."""
    from torch.optim.swa_utils import AveragedModel

    model = _model(name)
    ema = AveragedModel(model).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = ema(x)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ema.update_parameters(model)  # in place, eval mode untouched
        after = ema(x)
        with plain_paths():
            plain = ema(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, plain, rtol=1e-4, atol=1e-5)
    for p in ema.parameters():
        p.data.mul_(0.9)
    with torch.no_grad():
        written = ema(x)
        with plain_paths():
            plain = ema(x)
    assert (written - after).abs().max() > 1e-4
    torch.testing.assert_close(written, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # torch.jit.trace of every kind
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape-dependent geometry: a trace is per size
@pytest.mark.parametrize("name", _real("fastervit", "crossformer", "cabvit_h", "cabvit_p"))
def test_jit_trace_equals_eager(name):
    model = _model(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # cold torch.compile
@pytest.mark.parametrize("name", _real("fastervit", "crossformer"))
def test_default_compile_over_two_input_sizes(name):
    """torch.compile with default arguments (dynamic=None): the second input size recompiles with H and W
    kept static (`HybridModel._input_size`) instead of tracing the window geometry symbolically (which
    took over 15 minutes), and both sizes give eager's outputs. The eager backend keeps CI fast (dynamo's
    shape handling is what is tested); HV_COMPILE_BACKEND=inductor also generates the kernels (~40 s per
    size on 2 CPU cores)."""
    model = _model(name).eval()
    compiled = torch.compile(model, backend=os.environ.get("HV_COMPILE_BACKEND", "eager"))
    with torch.no_grad():
        for size in [(64, 64), (64, 96)]:
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-4)


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """A model compiled with fullgraph=True (any graph break raises) and dynamic=False, and how its outputs are
    checked: after a training step through the compiled model (train), with eager's output computed first
    (eager_first), against fixed official logits (build returns them), and again after load_state_dict of
    new weights (reload)."""
    build: Callable[[], tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]]
    atol: float
    rtol: float
    train: bool = False
    eager_first: bool = False
    reload: Callable[[], torch.nn.Module] | None = None


def _cabvit_h_fixture():
    from test_cabvit import fixture_model

    return fixture_model(load_fixture("cabvit_h_tiny"))


def _compile_fastervit_padded():
    from test_fastervit import _small_model

    return _small_model(num_classes=3), torch.randn(2, 3, 72, 40), None


def _compile_crossformerpp_fixture():
    from test_crossformer import fixture_model

    return fixture_model("crossformerpp_tiny"), torch.randn(1, 3, 64, 96), None


def _small_pp():
    from test_crossformer import _small_pp

    return _small_pp()


def _compile_crossformerpp_small():
    return _small_pp().eval(), torch.randn(1, 3, 64, 64), None


def _compile_cabvit_h():
    return _cabvit_h_fixture(), torch.randn(1, 3, 64, 96), None


def _compile_cabvit_p():
    from test_cabvit import TINY_P

    return hybridvit.create_model("cabvit_p_tiny", **TINY_P).eval(), torch.randn(1, 3, 64, 96), None


def _compile_cabvit_h_fused_at_training_size():
    # the training grid takes the index-buffer path of the bias (cabvit_h covers another grid)
    fx = load_fixture("cabvit_h_tiny")
    return copy.deepcopy(_cabvit_h_fixture()).fuse(), fx["input"], fx["logits"]


FP32 = dict(atol=1e-5, rtol=1.3e-6)  # torch.testing.assert_close's float32 default
COMPILE_CASES = {
    # training and inference at a padded size (masks, carrier grid from the actual size)
    "fastervit_train_and_eval_padded": CompileCase(_compile_fastervit_padded, atol=1e-5, rtol=1e-5, train=True),
    "crossformerpp_fixture": CompileCase(_compile_crossformerpp_fixture, **FP32, eager_first=True),
    # the DPB computed in the compiled graph; new weights: the compiled model computes the DPB from them
    "crossformerpp_then_new_weights": CompileCase(_compile_crossformerpp_small, **FP32, eager_first=True,
                                                  reload=_small_pp),
    "cabvit_h": CompileCase(_compile_cabvit_h, atol=1e-6, rtol=1e-5),  # torch.allclose(atol=1e-6)
    "cabvit_p": CompileCase(_compile_cabvit_p, atol=1e-6, rtol=1e-5),
    "cabvit_h_fused_at_training_size": CompileCase(_compile_cabvit_h_fused_at_training_size, atol=1e-4, rtol=0),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_fullgraph_equals_eager(case):
    """torch.compile(fullgraph=True, dynamic=False) of every family, at padded sizes, fused (the stored
    tables read) and not, after training and after new weights: no graph break, and eager's (or the
    official) outputs. The eager backend still traces the whole model with dynamo and skips code generation (slow on
    CPU); HV_COMPILE_BACKEND=inductor also checks the generated kernels."""
    spec = COMPILE_CASES[case]
    torch._dynamo.reset()
    model, x, official = spec.build()
    backend = os.environ.get("HV_COMPILE_BACKEND", "eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    if spec.train:
        torch.manual_seed(1)
        model.train()
        compiled(x).sum().backward()
        model.eval()
    with torch.no_grad():
        eager = model(x) if spec.eager_first else None
        out = compiled(x)
        if official is not None:
            ref = official
        elif eager is not None:
            ref = eager
        else:
            ref = model(x)
        torch.testing.assert_close(out, ref, atol=spec.atol, rtol=spec.rtol)
    if spec.reload is not None:
        model.load_state_dict(spec.reload().state_dict())
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=spec.atol, rtol=spec.rtol)


# ------------------------------------------------------------------ timm's model interface (without timm)
def test_timm_interface_without_timm(real):
    """default_cfg, FeatureInfo, head_hidden_size, get_classifier, reset_classifier(n, global_pool) and
    what it does to forward, as timm's tests/test_models.py checks them."""
    name, model = real
    m = copy.deepcopy(model)
    assert m.default_cfg is m.pretrained_cfg
    info = m.feature_info
    n = len(m.stages)
    assert len(info) == n and info.out_indices == tuple(range(n))
    assert info.channels() == [s["num_chs"] for s in m.stage_info] and info.channels(1) == m.stage_info[1]["num_chs"]
    assert info.reduction([0, -1]) == [m.stage_info[0]["reduction"], m.stage_info[-1]["reduction"]]
    assert info.module_name() == [f"stages.{i}" for i in range(n)] and info.info[2]["index"] == 2
    assert m.head_hidden_size == m.num_features and m.get_classifier() is m.head
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m.forward_head(feats, pre_logits=True)
        m.reset_classifier(0, "")
        assert m.global_pool == "" and isinstance(m.get_classifier(), torch.nn.Identity)
        unpooled = m(x)
        if feats.ndim == 4 and not m.head_norm:
            assert torch.equal(unpooled, feats)  # no pooling, no classifier: the features themselves
        assert unpooled.shape == feats.shape
        m.reset_classifier(4)  # a classifier brings the model's pooling back
        assert m.global_pool == type(m).global_pool and m(x).shape == (2, 4)
        m.reset_classifier(0)
        torch.testing.assert_close(m(x), pooled)
    with pytest.raises(ValueError, match="pools by"):
        m.reset_classifier(0, "max")
    with pytest.raises(ValueError, match=r"only without a classifier \(num_classes=0\)"):
        m.reset_classifier(3, "")
    m.eval()
    m.reset_classifier(3)
    assert not m.head.training  # the new head follows the model's mode


def test_no_weight_decay_and_group_matcher(real):
    """no_weight_decay(): exact names (timm's optimizer factory matches them with fnmatch) of the position-bias
    tables and embeddings and of every 1-D parameter, the set hybridvit's own optimizer leaves undecayed;
    group_matcher(): the stem first, the final norm last, every stage (coarse) or block in a group of its own."""
    import re

    from hybridvit.train.optim import param_groups

    name, model = real
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd <= set(names)
    undecayed = {id(p) for p in param_groups(model, 0.05)[1]["params"]}
    assert {n for n, p in names.items() if id(p) in undecayed} == nwd
    if name.startswith("fastervit"):  # the continuous position-bias MLPs and position embeddings
        assert any(n.endswith("attn.pos_bias.mlp.fc1.weight") for n in nwd)
    if name.startswith("crossformer"):  # the DPB's linear weights decay, as in the official training
        assert not any(n.endswith("attn.dpb.proj.weight") for n in nwd)
        assert any(n.endswith("attn.dpb.proj.bias") for n in nwd)
    if name.startswith("cabvit_h"):
        assert any(n.endswith("attn.attention_biases") for n in nwd)
    assert all(n in nwd for n, p in names.items() if p.ndim <= 1)
    assert not any(n.endswith("qkv.weight") for n in nwd)

    for coarse in (True, False):
        spec = model.group_matcher(coarse)
        stem = re.compile(spec["stem"])

        def group(n: str, stem=stem, spec=spec):
            if stem.match(n):
                return (-1,)
            for pattern, suffix in spec["blocks"]:
                if (r := re.compile(pattern).match(n)):
                    return tuple(int(g) for g in r.groups()) + tuple(suffix or ())
            return (float("inf"),)  # the classifier, after everything

        groups = {n: group(n) for n in names}
        assert all(groups[n] == (-1,) for n in names if n.startswith(("stem.", "patch_embed.")))
        assert all(groups[n] == (99999,) for n in names if n.startswith("norm."))
        assert all(groups[n] == (float("inf"),) for n in names if n.startswith("head."))
        stages = {n for n in names if n.startswith("stages.")}
        assert all(groups[n][0] == int(n.split(".")[1]) for n in stages)
        per_stage = len({groups[n] for n in stages})
        if coarse:
            assert per_stage == len(model.stages)
        else:  # one group per block
            depth = sum(len(getattr(s.blocks, "blocks", s.blocks)) for s in model.stages)
            assert per_stage == depth


def test_prune_drops_what_the_taps_leave_unused(real):
    """timm 1.0.31's rule: pruning before the last stage also removes the final norm (sized for the last
    stage) and the head with its pooling; forward_features then ends at the tap and every kept parameter
    trains. Pruned at the last stage with prune_head=False, the model is unchanged."""
    name, model = real
    x = torch.randn(2, 3, 64, 96)
    n = len(model.stages)
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        same = copy.deepcopy(model)
        same.prune_intermediate_layers([n - 1], prune_head=False)
        torch.testing.assert_close(same(x), expected)
        same.prune_intermediate_layers([n - 1], prune_norm=True, prune_head=False)
        if model.head_norm:  # CabViT-H: its norm is part of the head, which stays
            torch.testing.assert_close(same(x), expected)
        else:  # the features end at the raw last stage
            torch.testing.assert_close(same.forward_intermediates(x, indices=[n - 1], norm=True)[1][0], taps[-1])
    for i in range(n - 1):
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([i]) == [i]
        assert isinstance(pruned.norm, torch.nn.Identity) and isinstance(pruned.head, torch.nn.Identity)
        assert pruned.num_features == pruned.head_hidden_size == model.stage_info[i]["num_chs"]
        with torch.no_grad():
            feats = pruned.forward_features(x)
            if feats.ndim == 4:
                torch.testing.assert_close(feats, taps[i], rtol=0, atol=0)
            torch.testing.assert_close(pruned(x), feats)  # no head, no pooling
        pruned.train()
        pruned.forward_features(x).sum().backward()
        unused = [k for k, p in pruned.named_parameters() if p.grad is None]
        assert not unused, (i, unused)


def test_fx_symbolic_trace_at_any_input_size(real):
    """torch.fx traces every family once; the graph runs at other input sizes (the shape-dependent parts are
    leaf functions) with eager's outputs, and trains (gradients reach every parameter)."""
    name, model = real
    m = copy.deepcopy(model).eval()
    gm = torch.fx.symbolic_trace(m)
    leaves = {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}
    assert leaves & {"hat_windows", "grouped_attention", "cab_stage"}
    with torch.no_grad():
        for size in [(64, 64), ODD, (90, 122)]:
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(gm(x), m(x), rtol=1e-4, atol=1e-5)
    gm.train()
    gm(torch.randn(2, 3, 70, 70)).mean().backward()
    assert not [k for k, p in gm.named_parameters() if p.grad is None]


@pytest.mark.parametrize("in_chans", [1, 4, 6])
def test_in_chans_adapts_published_first_layers(in_chans, tmp_path):
    """A 3-channel checkpoint loads into an in_chans model as timm adapts it: summed filters for 1 channel
    (a gray image gives the RGB model's logits of that gray image); for n channels the filters repeated
    over the channels and scaled by 3/n (6 channels holding the image twice give the RGB model's logits)."""
    from hybridvit.models import adapt_input_channels

    for name in _real("fastervit", "crossformer", "cabvit_p"):
        rgb = _model(name).eval()
        path = tmp_path / f"{name}.pt"
        torch.save(rgb.state_dict(), path)
        other = hybridvit.create_model(name, num_classes=7, in_chans=in_chans, pretrained=str(path),
                                       **REAL.get(name, {})).eval()
        first = other.pretrained_cfg["first_conv"]
        for f in [first] if isinstance(first, str) else first:
            w3, wn = rgb.get_parameter(f"{f}.weight"), other.get_parameter(f"{f}.weight")
            assert wn.shape[1] == in_chans
            expected = w3.sum(1, keepdim=True) if in_chans == 1 else \
                torch.cat([w3, w3], 1)[:, :in_chans] * (3 / in_chans)
            torch.testing.assert_close(wn, expected)
        if in_chans == 4:
            continue
        x3 = torch.rand(2, 1, 64, 64).expand(-1, 3, -1, -1) if in_chans == 1 else torch.rand(2, 3, 64, 64)
        xn = x3[:, :1] if in_chans == 1 else torch.cat([x3, x3], 1)
        with torch.no_grad():
            torch.testing.assert_close(other(xn), rgb(x3), rtol=1e-4, atol=1e-4)
        sd = rgb.state_dict()
        assert all(adapt_input_channels(sd, rgb)[k] is sd[k] for k in sd)  # a 3-channel model: unchanged


@pytest.mark.parametrize("name", list(REAL))
def test_meta_construction_then_to_empty_and_load_gives_the_model(name):
    """Built under `torch.device("meta")` every tensor is on meta (no allocation, as timm's tests ask); after
    `to_empty` and `load_state_dict` the model equals one built normally, the buffers derived from the
    configuration (position-bias geometry, bias indices) included."""
    ref = _model(name).eval()
    with torch.device("meta"):
        model = _model(name).eval()
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


# ------------------------------------------------------------- layers: linear epilogue, layer scale, attention
BF16 = torch.bfloat16
# the module (`hybridvit.layers.linear` is also the name of the function the package exports)
linear_module = importlib.import_module("hybridvit.layers.linear")


@pytest.fixture
def native_bf16(monkeypatch):
    """The linear epilogue's native-bf16 gate patched open, so that these run on any CPU (oneDNN emulates bf16
    where the instructions are missing: correct, only slow; the shapes here are tiny)."""
    monkeypatch.setattr(linear_module, "cpu_has_native_bf16", lambda: True)


def _layer_and_input(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(32, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 32, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(48, generator=g))
    return layer, torch.randn(2, 5, 32, generator=g)


def _needs_onednn_linear():
    if not linear_module._ONEDNN_LINEAR:
        pytest.skip("PyTorch built without oneDNN's fused linear")


@pytest.mark.parametrize("gelu,residual", [(False, False), (True, False), (False, True)])
def test_bf16_linear_epilogue_equals_plain_autocast_linear(native_bf16, gelu, residual):
    from hybridvit.layers.linear import linear, onednn_dtype

    _needs_onednn_linear()
    layer, x = _layer_and_input()
    res = torch.randn(2, 5, 48).to(BF16) if residual else None
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        with plain_paths():
            assert onednn_dtype(x) is None
            plain = linear(x, layer, gelu=gelu, residual=res)
        assert onednn_dtype(x) == BF16
        fused = linear(x, layer, gelu=gelu, residual=res)
    assert fused.dtype == plain.dtype == BF16 and fused.shape == plain.shape
    # the plain path rounds the product to bf16 before GELU / the add; the fused one after: one bf16 ulp
    tol = 2 ** -7 * plain.float().abs().max().item()
    assert (fused.float() - plain.float()).abs().max().item() <= tol


@pytest.mark.parametrize("amp", [False, True])
def test_linear_epilogue_reads_the_weight_at_every_call(native_bf16, amp):
    """The fused linear keeps no cast or packed copy of its weight: an in-place edit, a write through
    `.data` (no version counter moves) and a replaced parameter are all seen at the next call, in fp32 and
    under bf16 autocast, with F.linear's values; the parameter itself stays a plain tensor."""
    import torch.nn.functional as F

    from hybridvit.layers.linear import linear, onednn_dtype

    _needs_onednn_linear()
    layer, x = _layer_and_input()
    tol = 2 ** -7 if amp else 1e-5

    def check():
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=amp):
            assert onednn_dtype(x) == (BF16 if amp else torch.float32)
            out = linear(x, layer, gelu=True).float()
        ref = F.gelu(F.linear(x, layer.weight, layer.bias)).detach()
        assert (out - ref).abs().max().item() <= tol * ref.abs().max().item() + 1e-6
        return out

    first = check()
    with torch.no_grad():
        layer.weight.mul_(-1)  # in place, as load_state_dict or an EMA writes it
    flipped = check()
    layer.weight.data.mul_(0.5)  # through .data
    halved = check()
    layer.weight = torch.nn.Parameter(torch.randn(48, 32) * 0.2)  # replaced
    check()
    assert not torch.allclose(first, flipped) and not torch.allclose(flipped, halved)
    assert not layer.weight.is_mkldnn and not layer.state_dict()["weight"].is_mkldnn


def test_linear_epilogue_only_where_exact(monkeypatch):
    """oneDNN's epilogue runs in eager no-grad CPU inference, in fp32 or in bf16 where the CPU has bf16
    instructions; training, fp16 and `plain_paths()` take the plain ops."""
    from hybridvit.layers.linear import onednn_dtype

    _needs_onednn_linear()
    layer, x = _layer_and_input()
    monkeypatch.setattr(linear_module, "cpu_has_native_bf16", lambda: False)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert onednn_dtype(x) is None  # emulated bf16: PyTorch's own ops
    monkeypatch.setattr(linear_module, "cpu_has_native_bf16", lambda: True)
    with torch.autocast("cpu", dtype=BF16):
        assert onednn_dtype(x) is None  # autograd: training takes the plain ops
    with torch.no_grad():
        assert onednn_dtype(x) == torch.float32
        assert onednn_dtype(x.half()) is None
        with torch.autocast("cpu", dtype=torch.float16):
            assert onednn_dtype(x) is None
        with plain_paths():
            assert onednn_dtype(x) is None


def test_layer_scale_keeps_the_branch_dtype():
    from hybridvit.layers.fuse import LayerScale, scale_channels

    x = torch.randn(2, 3, 8).to(BF16)
    gamma = torch.rand(8)
    with torch.autocast("cpu", dtype=BF16):
        assert scale_channels(x, gamma).dtype == BF16
    assert torch.equal(scale_channels(x.float(), gamma), x.float() * gamma)  # fp32 unchanged
    assert scale_channels(x, None) is x  # folded away
    ls = LayerScale(8, 0.5)
    assert ls(x).dtype == BF16
    assert torch.equal(ls(x.float()), x.float() * 0.5)


def _qkv_bias(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(1, 2, 10, 10, generator=g) * 0.5).requires_grad_()
    return q, k, v, bias


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_cpu_attention_with_a_trainable_bias_has_the_gradients_of_sdpa(dtype):
    """The CPU's explicit attention stays in the query dtype with a trainable bias (SDPA's fused CPU
    kernel takes no bias gradient, and its math path upcasts bf16) and gives SDPA's values and
    gradients (fp32 SDPA as the reference)."""
    import torch.nn.functional as F

    from hybridvit.layers import attention
    from hybridvit.layers.attention import attend

    q, k, v, bias = _qkv_bias(dtype)
    assert not attention._sdpa_applies(q)
    out = attend(q, k, v, bias)
    assert out.dtype == dtype and out.shape == q.shape
    out.float().square().sum().backward()
    q32, k32, v32, bias32 = (t.detach().float().requires_grad_() for t in (q, k, v, bias))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=bias32)
    ref.square().sum().backward()
    tol = 0.03 if dtype == BF16 else 0.005
    assert (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    for a, b in [(q, q32), (k, k32), (v, v32), (bias, bias32)]:
        rel = (a.grad.float() - b.grad).norm() / b.grad.norm()
        assert rel.item() < tol
    with plain_paths():  # the plain path: SDPA itself
        assert attention._sdpa_applies(q)


@pytest.mark.parametrize("name", ["fastervit_nano", "crossformer_t", "cabvit_h_l1"])
def test_a_model_built_under_inference_mode_runs(native_bf16, name):
    """Parameters made under torch.inference_mode have no version counter: nothing keys on one, so the
    model runs in fp32 and under bf16 autocast with the plain path's logits, and its fused form too."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model = hybridvit.create_model(name, num_classes=10).eval()
        for amp in (False, True):
            with torch.autocast("cpu", dtype=BF16, enabled=amp):
                fast = model(x).float()
                with plain_paths():
                    plain = model(x).float()
            tol = 0.05 if amp else 1e-4
            assert (fast - plain).abs().max().item() <= tol * plain.abs().max().item() + 1e-6
        ref = model(x)
        fused = model.fuse()(x)
    assert (fused - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-6
