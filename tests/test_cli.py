"""`hybridvit models` and the command-line entry point."""
import json

import pytest

import hybridvit
from hybridvit.cli import main
from hybridvit.registry import count_params, meta_model


def test_models_table_lists_every_family(tmp_path, capsys):
    out = tmp_path / "models.json"
    assert main(["models", "--no-macs", "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == set(hybridvit.list_models())
    assert {r["family"] for r in rows.values()} == {"fastervit", "crossformer", "cabvit"}
    assert len([n for n in rows if n.startswith("crossformer")]) == 8
    assert rows["fastervit_0"]["top1"] == 82.1 and rows["fastervit_0"]["weights"] == "download"
    assert rows["crossformer_s"]["weights"] == "by hand" and rows["cabvit_h_l2"]["weights"] == "-"
    assert rows["crossformerpp_s"]["params_m"] == round(count_params(meta_model("crossformerpp_s")) / 1e6, 2)
    assert "cabvit_h_l2" in capsys.readouterr().out


def test_models_counts_macs_at_the_default_size(tmp_path):
    out = tmp_path / "m.json"
    assert main(["models", "fastervit_0", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert 3.0 < row["gmacs"] < 4.0  # the paper reports 3.3 GFLOPs (MACs) for FasterViT-0 at 224


def test_unknown_pattern_and_model_errors():
    assert main(["models", "nothing_*"]) == 1
    with pytest.raises(ValueError, match="Did you mean: crossformerpp_s"):
        hybridvit.create_model("crossformer_pp_s")
