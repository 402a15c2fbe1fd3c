"""`hybridvit analyze`: stage breakdown and block amplitudes."""
import json

import hybridvit
from hybridvit.analysis import analyze
from hybridvit.cli import main


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
