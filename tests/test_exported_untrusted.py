"""Exported files (`.onnx`, OpenVINO `.xml` + `.bin`) are untrusted input like checkpoints: `eval`, `predict`
and `bench --pretrained FILE` run them. Crafted files: external data that points outside the file's folder,
headers that claim huge tensors, XML with entity declarations or that is not IR, metadata that smuggles
values; and mutated real exports. Each is refused with a CheckpointError (exit 2 on the command line) or
loads as the valid model it still is: never a crash, a traceback, a huge allocation or a file read elsewhere."""
from __future__ import annotations

import json
import random
import resource
from pathlib import Path

import pytest
import torch

from hybridvit.checkpoint import CheckpointError
from hybridvit.cli import main
from hybridvit.models._schema import ConfigError

onnx = pytest.importorskip("onnx", reason="crafting ONNX files needs the onnx extra: pip install 'hybridvit[onnx]'")
pytest.importorskip("onnxruntime", reason="running ONNX files needs the onnx extra: pip install 'hybridvit[onnx]'")
from onnx import TensorProto, helper  # noqa: E402

from hybridvit.deploy import ExportedModel  # noqa: E402

REFUSED = (CheckpointError, ConfigError)
META = {"hybridvit.model_name": "fastervit_nano", "hybridvit.num_classes": "4",
        "hybridvit.class_names": json.dumps(["a", "b", "c", "d"]),
        "hybridvit.preprocess": json.dumps({"input_size": [3, 2, 2], "crop_pct": 1.0, "crop_mode": "center",
                                            "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}),
        "hybridvit.version": "0.1.0"}


def _onnx_file(path, weight: TensorProto, meta=META, dims=(1, 4)):
    """images (1, 4) + W -> logits: a graph small enough to see what the runtime does with W."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Add", ["images", "W"], ["logits"])], "g", [x], [y], [weight])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    path.write_bytes(m.SerializeToString())
    return path


def _external(location: str) -> TensorProto:
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    return w


def _secret(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "link.bin").symlink_to(secret)
    return secret


def test_a_well_formed_crafted_file_loads(tmp_path):
    """The crafting itself is sound: the same graph with its weights inside loads and runs."""
    path = _onnx_file(tmp_path / "ok.onnx", helper.make_tensor("W", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0]))
    m = ExportedModel(path)
    assert m.class_names == ["a", "b", "c", "d"]
    torch.testing.assert_close(m(torch.zeros(1, 4)), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink", "inside", "subgraph"])
def test_onnx_external_data_is_refused_before_the_runtime_opens_it(tmp_path, capsys, where):
    secret = _secret(tmp_path)
    (tmp_path / "model" / "w.bin").write_bytes(secret.read_bytes())
    location = {"absolute": str(secret), "parent": "../secret.bin", "symlink": "link.bin", "inside": "w.bin",
                "subgraph": "w.bin"}[where]
    path = tmp_path / "model" / "m.onnx"
    if where == "subgraph":  # the external tensor sits in the then-branch of an If node
        then = helper.make_graph([helper.make_node("Identity", ["W"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])], [_external(location)])
        other = helper.make_graph([helper.make_node("Constant", [], ["e"], value=helper.make_tensor(
            "z", TensorProto.FLOAT, [4], [0.0] * 4))], "else", [], [helper.make_tensor_value_info(
                "e", TensorProto.FLOAT, [4])])
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes = [helper.make_node("If", ["c"], ["w"], then_branch=then, else_branch=other),
                 helper.make_node("Add", ["images", "w"], ["logits"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [cond])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        for k, v in META.items():
            model.metadata_props.add(key=k, value=v)
        path.write_bytes(model.SerializeToString())
    else:
        _onnx_file(path, _external(location))
    with pytest.raises(CheckpointError, match="external data, which hybridvit never writes"):
        ExportedModel(path)
    assert main(["predict", "--pretrained", str(path), str(tmp_path / "secret.bin")]) == 2
    err = capsys.readouterr().err
    assert "external data" in err and "Traceback" not in err


def test_onnx_claiming_a_huge_tensor_is_refused_without_allocating_it(tmp_path):
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    path = _onnx_file(tmp_path / "huge.onnx", w)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="could not be read by onnxruntime"):
        ExportedModel(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: no 4 TiB attempt


def test_onnx_that_is_not_onnx_is_refused(tmp_path):
    for name, data in (("zip.onnx", b"PK\x03\x04" + b"\0" * 60), ("pickle.onnx", b"\x80\x02cos\nsystem\n."),
                       ("empty.onnx", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError):
            ExportedModel(tmp_path / name)


@pytest.mark.parametrize("meta, said", [
    ({**META, "hybridvit.preprocess": json.dumps({"input_size": [3, 10 ** 9, 2]})}, "input_size"),
    ({**META, "hybridvit.preprocess": json.dumps({"input_size": [3, 2, 2], "std": [0, 1, 1]})}, "std"),
    ({**META, "hybridvit.preprocess": "{not json"}, "metadata is not valid"),
    ({**META, "hybridvit.class_names": json.dumps(["a"] * 3)}, "class names do not match"),
    ({**META, "hybridvit.class_names": json.dumps([{"__class__": "os.system"}] * 4)}, "class names do not match"),
    ({**META, "hybridvit.num_classes": "4; rm -rf /"}, "metadata is not valid"),
    ({k: v for k, v in META.items() if k != "hybridvit.preprocess"}, "carries no hybridvit metadata"),
])
def test_exported_metadata_is_data_that_is_checked(tmp_path, meta, said):
    path = _onnx_file(tmp_path / "m.onnx", helper.make_tensor("W", TensorProto.FLOAT, [4], [0.0] * 4), meta)
    with pytest.raises(REFUSED, match=said):
        ExportedModel(path)


def test_exported_class_names_are_printed_escaped(tmp_path):
    meta = {**META, "hybridvit.class_names": json.dumps(["\x1b[31mred\x1b[0m", "b\nc", "c", "d"]),
            "hybridvit.model_name": "\x1b]0;owned\x07"}
    m = ExportedModel(_onnx_file(tmp_path / "m.onnx", helper.make_tensor("W", TensorProto.FLOAT, [4], [0.0] * 4),
                                 meta))
    assert all("\x1b" not in c and "\n" not in c for c in m.class_names) and "\x07" not in m.model_name


# --------------------------------------------------------------------------------------------- OpenVINO IR

_IR = """<net name="m" version="11">
<layers>
<layer id="0" name="images" type="Parameter" version="opset1"><data shape="1,4" element_type="f32"/>
<output><port id="0" precision="FP32"><dim>1</dim><dim>4</dim></port></output></layer>
<layer id="1" name="W" type="Const" version="opset1">
<data element_type="f32" shape="{shape}" offset="{offset}" size="16"/>
<output><port id="0" precision="FP32">{dims}</port></output></layer>
<layer id="2" name="add" type="Add" version="opset1"><input><port id="0"><dim>1</dim><dim>4</dim></port>
<port id="1">{dims}</port></input><output><port id="2" precision="FP32"><dim>1</dim><dim>4</dim></port></output></layer>
<layer id="3" name="logits" type="Result" version="opset1"><input><port id="0"><dim>1</dim><dim>4</dim></port></input>
</layer></layers>
<edges><edge from-layer="0" from-port="0" to-layer="2" to-port="0"/><edge from-layer="1" from-port="0" to-layer="2"
to-port="1"/><edge from-layer="2" from-port="2" to-layer="3" to-port="0"/></edges>
<rt_info><hybridvit>{meta}</hybridvit></rt_info>
</net>
"""


def _ir(path, shape=(4,), offset=0, head='<?xml version="1.0"?>\n', meta=META, weights=True):
    pytest.importorskip("openvino", reason="OpenVINO files need the openvino extra: pip install 'hybridvit[openvino]'")
    from xml.sax.saxutils import quoteattr
    dims = "".join(f"<dim>{d}</dim>" for d in shape)
    rt = "".join(f"<{k.removeprefix('hybridvit.')} value={quoteattr(v)}/>" for k, v in meta.items())
    path.write_text(head + _IR.format(shape=",".join(map(str, shape)), offset=offset, dims=dims, meta=rt))
    if weights:
        path.with_suffix(".bin").write_bytes(torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy().tobytes())
    return path


def test_a_well_formed_crafted_ir_loads(tmp_path):
    m = ExportedModel(_ir(tmp_path / "ok.xml"))
    assert m.runtime == "openvino" and m.class_names == ["a", "b", "c", "d"]
    torch.testing.assert_close(m(torch.zeros(1, 4)), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


@pytest.mark.parametrize("case", ["doctype", "entity-in-body", "not-ir", "onnx-as-xml", "no-bin"])
def test_xml_that_is_not_plain_ir_is_refused(tmp_path, case):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    path = tmp_path / "m.xml"
    if case == "doctype":
        _ir(path, head=f'<?xml version="1.0"?>\n<!DOCTYPE net [<!ENTITY x SYSTEM "file://{secret}">]>\n')
    elif case == "entity-in-body":
        _ir(path, head='<!ENTITY x "y">\n')
    elif case == "not-ir":
        _ir(path, head='<?xml version="1.0"?>\n<svg/>\n')
    elif case == "onnx-as-xml":
        _onnx_file(path, helper.make_tensor("W", TensorProto.FLOAT, [4], [0.0] * 4))
        path.with_suffix(".bin").write_bytes(b"")
    else:
        _ir(path, weights=False)
    with pytest.raises(CheckpointError, match="not an OpenVINO IR file|weights m.bin are missing"):
        ExportedModel(path)


@pytest.mark.parametrize("shape, offset", [((1 << 20, 1 << 20), 0), ((4,), 1 << 40), ((4,), -16)])
def test_ir_constants_outside_their_weights_are_refused(tmp_path, shape, offset):
    path = _ir(tmp_path / "m.xml", shape=shape, offset=offset)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="could not be read by openvino"):
        ExportedModel(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024


# ------------------------------------------------------------------------------------ mutated real exports

@pytest.fixture(scope="module")
def real_exports(tmp_path_factory):
    import hybridvit
    from hybridvit.deploy import export_onnx, export_openvino
    tmp = tmp_path_factory.mktemp("real")
    model = hybridvit.create_model("fastervit_nano", num_classes=3, img_size=32).eval()
    files = {"onnx": export_onnx(model, tmp / "m.onnx", (32, 32))}
    try:
        import openvino  # noqa: F401
        files["xml"] = export_openvino(model, tmp / "m.xml", (32, 32))
    except ImportError:
        pass
    return files


def _mutations(data: bytes, rng: random.Random, n: int):
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 1:  # truncate
            del b[rng.randrange(len(b)):]
        elif kind == 2:  # splice a run of bytes from elsewhere
            i, j = rng.randrange(len(b)), rng.randrange(len(b))
            b[i:i + 16] = data[j:j + 16]
        else:  # a large varint / number where one was
            i = rng.randrange(len(b))
            b[i:i + 5] = b"\xff\xff\xff\xff\x0f" if rng.random() < 0.5 else b"99999"
        yield bytes(b)


def _load_each(paths: list[str]) -> dict:
    """ExportedModel on each file: loaded (and run, or refused at run time by the runtime's exception),
    refused (CheckpointError / ConfigError), or anything else (the failures)."""
    outcomes: dict = {"loaded": 0, "refused": 0, "other": []}
    for path in paths:
        try:
            m = ExportedModel(path)
        except REFUSED:
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 (what the test reports)
            outcomes["other"].append(f"{path}: {type(e).__name__}: {e}"[:300])
            continue
        outcomes["loaded"] += 1
        try:
            out = m(torch.randn(1, 3, 32, 32))
        except RuntimeError:  # the runtime's own error at run time, raised as an exception: not a crash
            continue
        if out.ndim != 2:
            outcomes["other"].append(f"{path}: output of shape {tuple(out.shape)}")
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnx", "xml"])
def test_mutated_exports_load_or_are_refused(real_exports, tmp_path, kind):
    """Mutated real exports: each loads or is refused. OpenVINO's files are read in a child process: in this
    suite, after its IR reader had parsed mutated files, a later, unrelated subprocess call of the test
    process died of a SIGSEGV. OpenVINO does not claim to be safe on crafted IR (see the README's security
    notes), so the child keeps that out of the other tests; a crash of the child fails this test."""
    if kind not in real_exports:
        pytest.skip("OpenVINO files need the openvino extra: pip install 'hybridvit[openvino]'")
    src = real_exports[kind]
    # the IR's text carries the structure; its .bin (weights) is mutated in a third of the cases
    data = src.read_bytes()
    weights = src.with_suffix(".bin").read_bytes() if kind == "xml" else b""
    rng = random.Random(0)
    paths = []
    for i, mutated in enumerate(_mutations(data, rng, 60)):
        path = tmp_path / f"{i}.{kind}"
        path.write_bytes(mutated)
        if kind == "xml":
            path.with_suffix(".bin").write_bytes(next(_mutations(weights, rng, 1)) if i % 3 == 0 else weights)
        paths.append(str(path))
    if kind == "onnx":
        outcomes = _load_each(paths)
    else:
        import subprocess
        import sys
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_exported_untrusted as t; "
                "print(json.dumps(t._load_each(sys.argv[2:])))")
        done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), *paths],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"the child reading mutated IR died ({done.returncode}): {done.stderr[-2000:]}"
        outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{kind}: {outcomes}")
    assert not outcomes["other"], outcomes["other"]
    assert outcomes["refused"] > 0, outcomes
