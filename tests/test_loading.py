"""One factory: every command and API loads through `hybridvit.loading`; the import graph of the package has
no circle (imports inside functions counted) and nothing below imports what uses it."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

import hybridvit
from hybridvit import loading
from hybridvit.cli import main

SRC = Path(hybridvit.__file__).resolve().parent


def _imports() -> dict[str, set[str]]:
    """module -> hybridvit modules it imports anywhere in the file (top level and inside functions)."""
    graph: dict[str, set[str]] = {}
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                candidates = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in modules:
                    c = c.rpartition(".")[0]
                if c and c.startswith("hybridvit") and c != name:
                    targets.add(c)
        graph[name] = targets
    return graph


def test_import_graph_has_no_cycle():
    graph = _imports()
    # hybridvit/__init__ is the package's face: everything may be imported through it by users, nothing inside
    for mod, targets in graph.items():
        if mod != "hybridvit":
            assert "hybridvit" not in targets, f"{mod} imports the package face (import the module itself)"
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == "hybridvit":
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])


# what each lower layer may never import (it would be an arrow back up)
_ABOVE = ("hybridvit.loading", "hybridvit.inference", "hybridvit.train", "hybridvit.analysis", "hybridvit.bench",
          "hybridvit.export", "hybridvit.cli", "hybridvit.integrations")
_LOWER = ("hybridvit.errors", "hybridvit._unpickle", "hybridvit.layers", "hybridvit.models", "hybridvit.data",
          "hybridvit.checkpoint", "hybridvit.hub", "hybridvit.registry", "hybridvit.runtime", "hybridvit.flops")


def test_no_import_runs_back_up():
    for mod, targets in _imports().items():
        if mod.startswith(_LOWER):
            up = sorted(t for t in targets if t.startswith(_ABOVE))
            assert not up, f"{mod} imports {up}, which use it"
    assert _imports()["hybridvit.errors"] == set()  # the leaf every layer may import


SPEED_MODULES = ("context", "table", "linear")  # layers/: the per-thread switch and torch shim, tables, linears


def test_speed_machinery_sits_below_the_blocks():
    """The speed machinery (layers/context.py, table.py, linear.py) sits apart from the blocks: it imports no
    block and no model; layers/context.py is the one reader of torch's autocast and export state; nothing in
    the forward path (layers/, models/) reads tensor version counters (no hidden state keyed on them: only
    bench.py's frozen compile checks them, to refuse edited weights); the attention function carries no
    analysis switch."""
    speed = {f"hybridvit.layers.{m}" for m in SPEED_MODULES}
    for mod in speed:
        inside = sorted(t for t in _imports()[mod] if t.startswith("hybridvit.") and t not in speed)
        assert not inside, f"{mod} imports {inside}"
    for path in SRC.rglob("*.py"):
        text, rel = path.read_text(), path.relative_to(SRC).as_posix()
        if re.search(r"\w\._version\b", text):
            assert rel == "bench.py", f"{rel} reads tensor version counters"
        if re.search(r"torch\.(is_autocast|get_autocast)|compiler\.is_exporting", text):
            assert rel == "layers/context.py", f"{rel} reads torch's autocast/export state itself"
    attention = (SRC / "layers" / "attention.py").read_text()
    assert "_CAPTURE" not in attention
    assert not any("analysis" in t for t in _imports()["hybridvit.layers.attention"])


def test_one_place_writes_the_input_size():
    """pretrained_cfg's input_size is written by models._variant.with_input_size only."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "_variant.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if ('["input_size"] =' in line or "input_size=(" in line) and "min_input_size" not in line:
                offenders.append(f"{path.relative_to(SRC)}:{i}")
    assert not offenders


@pytest.fixture
def run_ckpt(tmp_path):
    from PIL import Image

    from hybridvit.checkpoint import make_run_checkpoint
    model = hybridvit.create_model("fastervit_nano", num_classes=2)
    path = tmp_path / "best.pt"
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 32}, num_classes=2,
                                   class_names=["blue", "red"], pretrained_cfg=dict(model.pretrained_cfg),
                                   state_dict=model.state_dict()), path)
    for split in ("train", "val"):
        for cls in ("blue", "red"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 40), (30, 60, 200) if cls == "blue" else (200, 40, 30)).save(
                tmp_path / split / cls / "a.png")
    return path


COMMANDS = {
    "eval": ["eval", "--pretrained", "CKPT", "--data", "TMP/val", "--no-progress"],
    "predict": ["predict", "--pretrained", "CKPT", "TMP/val/red/a.png"],
    "bench": ["bench", "--pretrained", "CKPT", "-b", "1", "--warmup", "0", "--repeats", "1"],
    "analyze": ["analyze", "amplitude", "--pretrained", "CKPT", "TMP/val", "--output", "TMP/an"],
    "export": ["export", "--pretrained", "CKPT", "-o", "TMP/m.onnx"],
    "train": ["train", "--pretrained", "CKPT", "--data", "TMP", "--epochs", "1", "--batch-size", "2",
              "--workers", "0", "--no-progress", "--no-plot", "--output", "TMP/run"],
}


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c in ("export", "train") else c
                                     for c in COMMANDS])  # ONNX export, a training run
def test_every_command_loads_through_the_one_factory(run_ckpt, tmp_path, monkeypatch, command):
    if command == "export":
        pytest.importorskip("onnxscript", reason="export needs the onnx extra")
    seen = []
    real = loading._from_source

    def spy(source, *args, **kwargs):
        seen.append(source.kind)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(loading, "_from_source", spy)
    argv = [a.replace("CKPT", str(run_ckpt)).replace("TMP", str(tmp_path)) for a in COMMANDS[command]]
    rc = main(argv)
    assert "run" in seen, f"{command} did not load its model through hybridvit.loading (exit {rc})"


def test_api_loads_through_the_one_factory(run_ckpt, monkeypatch):
    seen = []
    real = loading._from_source
    monkeypatch.setattr(loading, "_from_source", lambda s, *a, **k: seen.append(s.kind) or real(s, *a, **k))
    hybridvit.load_model(run_ckpt)
    hybridvit.create_model("fastervit_nano", pretrained=str(run_ckpt))
    hybridvit.create_model("fastervit_nano")
    assert seen == ["run", "run", "none"]


def test_architecture_layout_matches_the_tree():
    """The layout of docs/architecture.md names every module and folder of the package (and the speed modules
    of layers/), and nothing that is gone."""
    page = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    block = page.split("## Layout", 1)[1].split("```", 2)[1]
    tree = {p.name for p in SRC.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    tree |= {p.name for p in (SRC / "layers").iterdir() if p.is_dir() and p.name != "__pycache__"}
    named = set(re.findall(r"([\w.]+\.py)\b", block)) | {m + ".py" for m in re.findall(r"^\s+(\w+)\s", block, re.M)}
    named |= set(re.findall(r"^\s+(\w+)/", block, re.M))
    tree |= {f"{m}.py" for m in SPEED_MODULES}
    missing = {n for n in tree if n not in named and n.removesuffix(".py") + "/" not in block}
    assert not missing, f"docs/architecture.md's layout does not name {sorted(missing)}"
    files = {p.name for p in SRC.rglob("*.py")} | {p.name for p in SRC.rglob("*") if p.is_dir()}
    stale = {n for n in re.findall(r"\b(\w+\.py)\b", block) if n not in files}
    assert not stale, f"docs/architecture.md's layout names {sorted(stale)}, which the tree does not have"


def test_file_schemas_agree_with_the_builders(tmp_path):
    """The construction keys a file may set (models/_schema.py) are exactly each builder's keyword
    parameters, and every value a builder accepts for a string key (e.g. CrossFormer's group_type, 'linear'
    included) passes the file check: a model saved with it loads again."""
    import inspect

    from hybridvit import registry
    from hybridvit.models import crossformer
    from hybridvit.models._schema import schema_for

    builders = {}
    for name in hybridvit.list_models():
        entry = registry.get_entry(name)
        builders[entry.builder] = entry.family
    assert len(builders) == 4  # FasterViT, CrossFormer, CabViT-H, CabViT-P
    for builder, family in builders.items():
        params = set(inspect.signature(builder).parameters) - {"self", "kwargs"}
        schema = schema_for(family, builder)
        assert set(schema) == params, (builder.__name__, sorted(set(schema) ^ params))
    assert schema_for("crossformer", crossformer.CrossFormer)["group_type"].choices == crossformer.GROUP_TYPES
    for group_type in crossformer.GROUP_TYPES:
        model = hybridvit.create_model("crossformer_t", num_classes=2, group_type=group_type, img_size=64)
        hybridvit.save_pretrained(model.eval(), tmp_path / group_type)
        assert hybridvit.load_model(tmp_path / group_type).num_classes == 2


@pytest.mark.parametrize("official,ours", [("faster_vit_0_224", "fastervit_0"),
                                           ("faster_vit_4_21k_384", "fastervit_4_21k_384"),
                                           ("crossformer-s", "crossformer_s"), ("CrossFormer-T", "crossformer_t"),
                                           ("cros_small_patch4_group7_224", "crossformer_s"),
                                           ("crossformer++-b", "crossformerpp_b"),
                                           ("cros_pp_small_patch4_group_const_224", "crossformerpp_s"),
                                           ("cabvit_h_l2", "cabvit_h_l2"), ("cabvit_p_l0", "cabvit_p_tiny")])
def test_official_names_are_aliases(official, ours):
    """The official code's names (builder functions, config NAMEs, the READMEs' spellings) build hybridvit's
    model, under hybridvit's name, and are never listed twice."""
    from hybridvit.registry import get_entry

    assert get_entry(official).name == ours
    assert hybridvit.registry.meta_model(official).model_name == ours
    assert official == ours or official not in hybridvit.list_models()


def test_official_names_lead_the_suggestions_and_reach_the_commands(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"Did you mean: fastervit_0,"):  # before: fastervit_4 first
        hybridvit.create_model("faster_vit_0")
    model = hybridvit.create_model("faster_vit_0_224", num_classes=3, img_size=32)
    assert model.model_name == "fastervit_0" and model.num_classes == 3
    assert main(["models", "faster_vit_0_224", "--no-macs", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())[0]["name"] == "fastervit_0"
    assert main(["bench", "-m", "crossformer++-s", "--img-size", "32", "--batch-size", "1", "--repeats", "1",
                 "--warmup", "0", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["model"] == "crossformerpp_s"


@pytest.mark.integration
def test_official_names_through_timm():
    timm = pytest.importorskip("timm", reason="timm.create_model needs timm (the ecosystem lane)")
    model = timm.create_model("faster_vit_0_224", num_classes=4)
    assert model.model_name == "fastervit_0" and model.num_classes == 4
    assert timm.create_model("cros_pp_small_patch4_group_const_224", features_only=True).model_name == "crossformerpp_s"


def test_an_image_size_far_from_the_trained_one_is_one_warning_line(tmp_path, caplog):
    """eval/predict/export/bench --img-size far (2x or more) from the weights' training size: one warning line
    naming both sizes; near it, or with random weights, or when fine-tuning, nothing."""
    import logging

    from hybridvit.inference import load_for_command
    from hybridvit.loading import FINETUNE

    hybridvit.save_pretrained(hybridvit.create_model("fastervit_nano", num_classes=3).eval(), tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="hybridvit"):
        for size in (7, 96, 160):
            load_for_command(str(tmp_path / "run"), img_size=size)
        load_for_command(None, "fastervit_0", img_size=32)
        load_for_command(str(tmp_path / "run"), img_size=160, num_classes=3, purpose=FINETUNE)
    lines = [r.getMessage() for r in caplog.records if "far from" in r.getMessage()]
    assert len(lines) == 2 and "--img-size 7 is far from the 64 px" in lines[0] and "160" in lines[1]
