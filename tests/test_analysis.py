"""`hybridvit analyze`: complexity table, attention capture, attention maps, attended distance, block
amplitudes (with and without CrossFormer++'s cooling layers) and the throughput/accuracy chart."""
import importlib.util
import itertools
import json
import sys

import pytest
import torch
from conftest import load_fixture
from test_cabvit import fixture_model as cabvit_fixture_model
from test_crossformer import fixture_model as crossformer_fixture_model
from test_crossformer import overrides as crossformer_overrides
from test_fastervit import fixture_model as fastervit_fixture_model

import hybridvit
from hybridvit.analysis import AnalysisError, analyze
from hybridvit.analysis.amplitude import blocks, cooling_layers
from hybridvit.analysis.attention import attended_distance, capture, group_index, query_map
from hybridvit.analysis.capture import capture_attention
from hybridvit.analysis.load import load_images, load_model
from hybridvit.cli import main
from hybridvit.layers.context import plain
from hybridvit.models.crossformer import group_tokens

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the analysis figures need matplotlib (pip install 'hybridvit[train]')")


def test_stage_breakdown_adds_up_and_every_block_is_measured():
    model = hybridvit.create_model("fastervit_nano", num_classes=10)
    res = analyze(model, (64, 64))
    assert len(res["stages"]) == 4
    assert sum(s["params_m"] for s in res["stages"]) < res["params_m"]
    assert 0 < sum(s["gmacs_per_img"] for s in res["stages"]) <= res["gmacs_per_img"]
    assert len(res["blocks"]) == sum(len(list(s.blocks)) for s in model.stages)
    assert all(b["rms"] > 0 for b in res["blocks"])


def test_cli_writes_json(tmp_path):
    out = tmp_path / "a.json"
    assert main(["analyze", "-m", "crossformer_t", "--img-size", "96", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["img_size"] == [96, 96] and len(res["blocks"]) == 16


def test_analyze_without_model_or_analysis_says_what_to_give():
    with pytest.raises(AnalysisError, match="--model"):
        main(["--debug", "analyze"])


def _small_model(name: str) -> tuple[torch.nn.Module, int]:
    """A small model of each family and an input side that pads windows/groups where the family pads."""
    torch.manual_seed(0)
    if name == "fastervit_nano":
        return hybridvit.create_model("fastervit_nano", num_classes=10), 72  # padded windows, carriers
    if name == "crossformerpp_tiny":
        return crossformer_fixture_model("crossformerpp_tiny"), 100  # 25x25 map in LDA groups of 4, interval 4
    if name == "cabvit_h_tiny":
        return cabvit_fixture_model(load_fixture("cabvit_h_tiny")), 64
    return hybridvit.create_model("cabvit_p_tiny", embed_dim=48, depths=(3,), num_heads=3), 64  # class token


@pytest.mark.parametrize("name", ["fastervit_nano", "crossformerpp_tiny", "cabvit_h_tiny", "cabvit_p"])
def test_capture_gives_the_fused_output_and_rows_that_sum_to_one(name):
    model, size = _small_model(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = model.eval()(x)
        with capture_attention(model) as cap:
            captured = model(x)
    assert not plain()  # the plain paths switched off again on exit: the default forward is back
    with torch.no_grad():
        assert torch.equal(model(x), fused)
    assert (captured - fused).abs().max().item() <= 1e-5
    expected = [n for n, m in model.named_modules() if hasattr(m, "qkv") and hasattr(m, "proj")]
    assert sorted({r["module"] for r in cap.records}) == sorted(expected)
    for r in cap.records:
        w = r["weights"]
        assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)
    kinds = set()
    for layout, w in capture(model, x):
        kinds.add(layout.kind)
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)
        assert layout.q_index.shape == w.shape[1:2] + w.shape[3:4]
        # every key of a query lands on the map or is counted off it (carriers, digest, class token)
        for pixel in ((0.0, 0.0), (size / 2, size / 3), (size - 1.0, size - 1.0)):
            heat, off, _ = query_map(layout, w, pixel)
            assert heat.sum().item() + off == pytest.approx(1.0, abs=1e-5)
            assert heat.shape == layout.map_hw
    assert kinds == {"fastervit_nano": {"window", "carriers"}, "crossformerpp_tiny": {"sda", "lda"},
                     "cabvit_h_tiny": {"cab"}, "cabvit_p": {"cab"}}[name]


def test_group_positions_are_the_models_own_grouping():
    """CrossFormer's LDA groups are interleaved with stride = interval: the analysis' token ids per group
    equal the model's grouping applied to a map of token ids."""
    for G, interval, nh, nw in itertools.product((2, 3), (1, 2, 4), (1, 2), (1, 3)):
        Hp, Wp = G * interval * nh, G * interval * nw
        ids = torch.arange(Hp * Wp).view(1, Hp, Wp, 1)
        assert torch.equal(group_index(ids[0, ..., 0], G, interval), group_tokens(ids, G, interval)[..., 0])


def test_uniform_attention_distance_is_exact_and_lda_reaches_interval_times_farther():
    """With q = k = 0 and no position bias every token attends uniformly within its group: the distance of
    an SDA block is the mean distance between the cells of a 7x7 grid times the stride, LDA's is
    `interval` times that (crossformer_tiny at 224: stage 3 is a 14x14 map, groups of 7, interval 2)."""
    model = crossformer_fixture_model("crossformer_tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.qkv.weight", "attn.qkv.bias")) or ".dpb.mlp.8." in name:
                p.zero_()
    model.eval()
    rows = {lay.module: (lay, w) for lay, w in capture(model, torch.randn(1, 3, 224, 224))}
    sda, lda = rows["stages.2.blocks.0.attn"], rows["stages.2.blocks.1.attn"]
    assert (sda[0].kind, lda[0].kind) == ("sda", "lda")
    cells = torch.stack(torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij"), -1).view(-1, 2)
    expected = torch.cdist(cells, cells).mean().item() * 16  # stride 16 in stage 3
    assert attended_distance(*sda) == pytest.approx(expected, rel=1e-4)
    assert attended_distance(*lda) == pytest.approx(2 * expected, rel=1e-4)


def test_global_attention_reaches_farther_than_local_with_official_weights(tmp_path):
    x = load_fixture("crossformer_tiny")["input"]
    model = crossformer_fixture_model("crossformer_tiny")
    d = {lay.module: attended_distance(lay, w) for lay, w in capture(model, x)}
    assert d["stages.2.blocks.1.attn"] > 1.5 * d["stages.2.blocks.0.attn"]  # LDA (interval 2) vs SDA
    model = fastervit_fixture_model(load_fixture("fastervit_tiny"))
    d = {lay.module: attended_distance(lay, w) for lay, w in capture(model, x)}
    for b in ("stages.2.blocks.0", "stages.2.blocks.1"):  # carrier attention spans the whole map
        assert d[f"{b}.ct_attn"] > 1.3 * d[f"{b}.attn"]


def _save_run(model: torch.nn.Module, name: str, kwargs: dict, path) -> str:
    """A hybridvit run checkpoint of `model` (what `hybridvit train` writes, minus the optimizer)."""
    torch.save({"model_name": name, "model_kwargs": kwargs, "num_classes": model.num_classes,
                "class_names": [str(i) for i in range(model.num_classes)], "state_dict": model.state_dict()}, path)
    return str(path)


@needs_matplotlib
def test_attention_command_maps_account_for_every_key(tmp_path):
    """fastervit_nano at 72 px (padded windows, carriers): each block's map of the query plus its share on
    carrier tokens is the query's whole attention; the per-window carrier share lies in [0, 1]."""
    out = tmp_path / "att"
    # options before and after the images, the model before the subcommand
    assert main(["analyze", "-m", "fastervit_nano", "attention", "--img-size", "72", "random", "--num-images", "2",
                 "--query", "10", "60", "-o", str(out)]) == 0
    data = json.loads((out / "attention.json").read_text())
    assert {f.rsplit("/", 1)[-1] for f in data["files"]} >= {"attention.png", "attention.svg", "carriers.png",
                                                           "attention.json"}
    assert [s["stage"] for s in data["stages"]] == [2, 3]
    for b in data["blocks"] + data["carrier_attention"]:
        assert sum(map(sum, b["map"])) + b["off_map_share"] == pytest.approx(1.0, abs=1e-4)
    hat = [b for b in data["blocks"] if "window_carrier_share" in b]
    assert len(hat) == 2 and len(data["carrier_attention"]) == 2
    for b in hat:
        shares = torch.tensor(b["window_carrier_share"])
        assert shares.shape == (1, 1) and 0 <= shares.min() and shares.max() <= 1  # 5x5 map: one window
        assert b["off_map_share"] > 0
    # the query (10, 60) sits in the top-right token of the 5x5 stage-3 map (stride 72/5)
    assert hat[0]["query_token_yx"] == pytest.approx([0.5 * 72 / 5, 4.5 * 72 / 5])


@needs_matplotlib
def test_attention_command_reports_the_digest_share_of_cabvit(tmp_path):
    fx = load_fixture("cabvit_h_tiny")
    model = cabvit_fixture_model(fx)
    c = fx["official_config"]
    ckpt = _save_run(model, "cabvit_h_l1", dict(embed_dims=c["embed_dims"], depths=c["depths"],
                                                num_heads=c["num_heads"]), tmp_path / "cab.pt")
    out = tmp_path / "att"
    assert main(["analyze", "attention", "random", "--pretrained", ckpt, "--img-size", "64", "--num-images", "2",
                 "-o", str(out)]) == 0
    data = json.loads((out / "attention.json").read_text())
    assert (out / "digest.png").is_file()
    x, _, _ = load_images(["random"], load_model(None, ckpt, 64), 2)  # the command's input (seeded)
    with torch.no_grad(), capture_attention(model) as cap:
        model(x)
    for b, r in zip(data["blocks"], cap.records):
        n = r["weights"].shape[-2]
        expected = r["weights"][..., n:].sum(-1).mean().item()  # keys after the block's own tokens
        assert b["module"] == r["module"] and b["digest_share"] == pytest.approx(expected, abs=1e-5)
    assert data["blocks"][0]["digest_share"] == 0 and data["blocks"][1]["digest_share"] > 0


@needs_matplotlib
def test_distance_command_one_line_per_model(tmp_path):
    out = tmp_path / "dist"
    assert main(["analyze", "distance", "-m", "fastervit_nano", "-m", "crossformerpp_s", "random", "--img-size", "64",
                 "--num-images", "1", "-o", str(out)]) == 0
    data = json.loads((out / "distance.json").read_text())
    assert [m["model"] for m in data["models"]] == ["fastervit_nano", "crossformerpp_s"]
    pp = {b["module"]: b for b in data["models"][1]["blocks"]}
    assert pp["stages.0.blocks.1.attn"]["kind"] == "lda"  # 16x16 map, group 4, interval 4
    assert pp["stages.0.blocks.1.attn"]["distance_px"] > 2 * pp["stages.0.blocks.0.attn"]["distance_px"]
    assert (out / "distance.png").is_file() and (out / "distance.svg").is_file()


@needs_matplotlib
def test_amplitude_json_equals_hooks_and_no_acl_changes_only_blocks_after_a_cooling_layer(tmp_path):
    fx = load_fixture("crossformerpp_tiny")
    model = crossformer_fixture_model("crossformerpp_tiny")
    kwargs = crossformer_overrides(fx["official_config"])
    ckpt = _save_run(model, "crossformerpp_s", kwargs, tmp_path / "pp.pt")
    out = tmp_path / "amp"
    assert main(["analyze", "amplitude", "random", "--pretrained", ckpt, "--img-size", "64", "--num-images", "2",
                 "--no-acl", "-o", str(out)]) == 0
    (res,) = json.loads((out / "amplitude.json").read_text())["models"]
    x, _, _ = load_images(["random"], load_model(None, ckpt, 64), 2)  # the command's input (seeded)
    measured = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: measured.__setitem__(n, (o.abs().max().item(),
                                                                                     o.abs().mean().item())))
             for n, m in blocks(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert [b["block"] for b in res["blocks"]] == list(measured)
    for b in res["blocks"]:
        assert (b["max_abs"], b["mean_abs"]) == pytest.approx(measured[b["block"]], rel=1e-5)
    cooled = [i for i, b in enumerate(res["blocks"]) if b["cooling"]]
    assert [res["blocks"][i]["block"] for i in cooled] == list(cooling_layers(model)) == ["stages.2.blocks.2"]
    for i, (a, b) in enumerate(zip(res["blocks"], res["blocks_no_acl"])):
        if i < cooled[0]:
            assert (a["max_abs"], a["mean_abs"]) == (b["max_abs"], b["mean_abs"])
        else:
            assert a["mean_abs"] != pytest.approx(b["mean_abs"], rel=1e-3)
    assert cooling_layers(model)  # restored after the command


@needs_matplotlib
def test_no_acl_needs_cooling_layers():
    with pytest.raises(AnalysisError, match="no amplitude cooling"):
        main(["--debug", "analyze", "amplitude", "random", "-m", "fastervit_nano", "--img-size", "64",
              "--num-images", "1", "--no-acl", "-o", "/nonexistent/never-written"])


@needs_matplotlib
def test_pareto_from_bench_results(tmp_path):
    results = tmp_path / "bench.json"
    rows = [("fastervit_0", 20.0), ("fastervit_1", 10.0), ("crossformer_t", 25.0), ("crossformer_s", 5.0),
            ("fastervit_nano", 100.0), ("timm:resnet50", 30.0)]
    results.write_text(json.dumps({"environment": {"threads": 2}, "results": [
        {"model": m, "img_per_s": v, "device": "cpu", "amp": "fp32", "batch_size": 16, "img_size": 224}
        for m, v in rows]}))
    out = tmp_path / "pareto"
    assert main(["analyze", "pareto", "--results", str(results), "-o", str(out)]) == 0
    data = json.loads((out / "pareto.json").read_text())
    top1 = {p["model"]: (p["family"], p["top1"]) for p in data["points"]}
    assert top1 == {"fastervit_0": ("fastervit", 82.1), "fastervit_1": ("fastervit", 83.2),
                    "crossformer_t": ("crossformer", 81.5), "crossformer_s": ("crossformer", 82.5)}
    # crossformer_s (82.5 at 5 img/s) is beaten by fastervit_1 (83.2 at 10 img/s)
    assert data["pareto_front"] == ["crossformer_t", "fastervit_0", "fastervit_1"]
    assert {s["model"] for s in data["skipped"]} == {"fastervit_nano", "timm:resnet50"}
    assert (out / "pareto.png").is_file() and (out / "pareto.svg").is_file()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(AnalysisError, match="bench --json"):
        main(["--debug", "analyze", "pareto", "--results", str(tmp_path / "bad.json"), "-o", str(out),
              "--overwrite"])


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    from hybridvit.analysis.plotting import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(AnalysisError, match=r"pip install 'hybridvit\[train\]'"):
        pyplot()
