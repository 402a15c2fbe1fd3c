"""save_pretrained folders (model.safetensors + config.json): local round trips, the `hf-hub:` path through
huggingface_hub against a Hub look-alike on 127.0.0.1, its offline cache, push_to_hub, and the errors of
corrupt or mismatched folders."""
from __future__ import annotations

import json

import pytest
import torch
from _hubserver import COMMIT, hub_server, point_hub_at

import hybridvit
from hybridvit import hub
from hybridvit.checkpoint import CheckpointError

# one small model per family (64px images)
TINY = {
    "fastervit_nano": dict(dim=16, in_dim=8, depths=(1, 1, 1, 1), drop_path_rate=0.0),
    "crossformer_t": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), img_size=64),
    "cabvit_h_l1": dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(0, 0, 2, 2), img_size=64),
}
CLASSES = ["cat", "dog", "fish"]


def trained(name: str, **kw) -> torch.nn.Module:
    """A model after two SGD steps (weights and BatchNorm statistics away from their initial values), with
    the class names a training run attaches, in eval mode."""
    torch.manual_seed(0)
    model = hybridvit.create_model(name, num_classes=3, **{**TINY[name], **kw})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(3, model.in_chans, 64, 64)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.class_names = list(CLASSES)
    return model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, model.in_chans, 72, 56, generator=torch.Generator().manual_seed(seed))
    return model.eval()(x)


@pytest.mark.parametrize("name", list(TINY))
def test_save_pretrained_round_trip(name, tmp_path):
    model = trained(name)
    folder = hybridvit.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    card = (folder / "README.md").read_text()
    licence = model.pretrained_cfg["license"]
    assert card.startswith("---\nlibrary_name: timm\n") and f"**Architecture:** `{name}`" in card
    assert f"**Licence of the weights:** {licence}" in card
    assert ("license: other\nlicense_name: nvidia-source-code-license-nc" in card) == name.startswith("fastervit")
    assert f"3 classes, index order: {', '.join(f'`{c}`' for c in CLASSES)}" in card
    assert f"mean {model.pretrained_cfg['mean']}" in card and "crop_pct 0.875" in card
    assert cfg["architecture"] == name and cfg["num_classes"] == 3 and cfg["label_names"] == CLASSES
    assert cfg["model_args"] == json.loads(json.dumps(model.model_kwargs))
    assert cfg["pretrained_cfg"]["input_size"] == [3, 64, 64] and cfg["num_features"] == model.num_features

    for loaded in (hybridvit.create_model(None, pretrained=folder),
                   hybridvit.create_model(name, pretrained=str(folder)),
                   hybridvit.load_model(folder)):
        assert torch.equal(logits(loaded), logits(model))
        assert loaded.class_names == CLASSES and loaded.model_name == name and not loaded.training
        assert loaded.model_kwargs == json.loads(json.dumps(model.model_kwargs))
        assert loaded.pretrained_cfg["input_size"] == (3, 64, 64)
        assert loaded.pretrained_cfg["source"] == "local-dir"


def test_round_trip_keeps_in_chans_and_features(tmp_path):
    model = trained("fastervit_nano", in_chans=1)
    folder = hybridvit.save_pretrained(model, tmp_path / "gray")
    assert json.loads((folder / "config.json").read_text())["model_args"]["in_chans"] == 1
    loaded = hybridvit.create_model(None, pretrained=folder)
    assert loaded.in_chans == 1 and torch.equal(logits(loaded), logits(model))

    feats = hybridvit.create_model(None, pretrained=folder, features_only=True, out_indices=(1, 3)).eval()
    x = torch.randn(1, 1, 80, 48)
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
        out = feats(x)
    assert [o.shape for o in out] == [ref[1].shape, ref[3].shape]
    assert torch.equal(out[0], ref[1]) and torch.allclose(out[1], ref[3])


def test_other_num_classes_gets_a_fresh_head(tmp_path):
    model = trained("fastervit_nano")
    folder = hybridvit.save_pretrained(model, tmp_path / "m")
    other = hybridvit.create_model(None, pretrained=folder, num_classes=7).eval()
    assert other.head.out_features == 7 and other.class_names is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(other.forward_features(x), model.forward_features(x))


def test_overrides_win_over_the_stored_arguments(tmp_path):
    folder = hybridvit.save_pretrained(trained("fastervit_nano"), tmp_path / "m")
    model = hybridvit.create_model(None, pretrained=folder, img_size=96, drop_path_rate=0.1)
    assert model.model_kwargs["img_size"] == 96 and model.pretrained_cfg["input_size"] == (3, 96, 96)


def test_save_pretrained_needs_a_name_and_matching_classes(tmp_path):
    model = trained("fastervit_nano")
    del model.model_name
    with pytest.raises(ValueError, match="model_name="):
        hybridvit.save_pretrained(model, tmp_path / "a")
    hybridvit.save_pretrained(model, tmp_path / "b", model_name="fastervit_nano")
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes"):
        hybridvit.save_pretrained(model, tmp_path / "c", model_name="fastervit_nano", class_names=["a", "b"])


def test_bad_folders_name_the_file_and_the_keys(tmp_path):
    folder = hybridvit.save_pretrained(trained("fastervit_nano"), tmp_path / "m")
    weights, config = folder / "model.safetensors", folder / "config.json"
    good_cfg = config.read_text()

    # weights of another configuration: the error names the file and the keys that differ
    cfg = json.loads(good_cfg)
    cfg["model_args"]["depths"] = [1, 1, 1, 3]
    config.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit model fastervit_nano") as e:
        hybridvit.create_model(None, pretrained=folder)
    assert "stages.3.blocks.1" in str(e.value) and "missing" in str(e.value)

    cfg = json.loads(good_cfg)
    cfg["model_args"]["dim"] = 24
    config.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shapes differ:.*norm.bias: checkpoint \(128,\) vs model \(192,\)") as e:
        hybridvit.create_model(None, pretrained=folder)

    config.write_text(good_cfg)
    with pytest.raises(CheckpointError, match="holds a fastervit_nano model"):
        hybridvit.create_model("crossformer_t", pretrained=folder)

    cfg = json.loads(good_cfg)
    del cfg["architecture"]
    cfg["label_names"] = [1, 2, 3]
    config.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: 'architecture'.*'label_names'"):
        hybridvit.create_model(None, pretrained=folder)
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        hybridvit.create_model(None, pretrained=folder)

    config.write_text(good_cfg)
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated download
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        hybridvit.create_model(None, pretrained=folder)


def test_no_pickle_on_the_folder_path(tmp_path, monkeypatch):
    """A folder with a pickled pytorch_model.bin instead of model.safetensors is refused unread."""
    folder = hybridvit.save_pretrained(trained("fastervit_nano"), tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called on the Hub path")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing.*pickle files are not read"):
        hybridvit.create_model(None, pretrained=folder)
    with pytest.raises(CheckpointError, match="folder with neither config.json"):
        hybridvit.create_model("fastervit_nano", pretrained=tmp_path)
    with pytest.raises(ValueError, match="needs pretrained="):
        hybridvit.create_model(None)
    with pytest.raises(CheckpointError, match="does not exist"):
        hybridvit.load_model(tmp_path / "nowhere")


# ------------------------------------------------------------------------------- hf-hub: through huggingface_hub
@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="the hub extra is not installed: pip install 'hybridvit[hub]'")
    model = trained("crossformer_t")
    folder = hybridvit.save_pretrained(model, tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    with hub_server({"org/tiny": folder, "org/empty": tmp_path / "empty"}) as (endpoint, requests):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        yield model, tmp_path / "hf-cache", requests


def test_hf_hub_round_trip_and_cache(hub_repo, monkeypatch):
    model, cache, requests = hub_repo
    for loaded in (hybridvit.create_model("hf-hub:org/tiny"),
                   hybridvit.create_model(None, pretrained="hf-hub:org/tiny"),
                   hybridvit.create_model("crossformer_t", pretrained=f"hf-hub:org/tiny@{COMMIT}")):
        assert torch.equal(logits(loaded), logits(model))
        assert loaded.class_names == CLASSES and loaded.pretrained_cfg["source"] == "hf-hub"
    assert loaded.pretrained_cfg["hf_hub_id"] == f"org/tiny@{COMMIT}"
    # huggingface_hub's standard cache layout
    snapshot = cache / "models--org--tiny" / "snapshots" / COMMIT
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "model.safetensors"}
    assert any(r.startswith("GET /org/tiny/resolve/main/model.safetensors") for r in requests)

    # offline: served from the cache, no request
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(requests)
    offline = hybridvit.load_model("hf-hub:org/tiny")
    assert len(requests) == n and torch.equal(logits(offline), logits(model))


def test_hf_hub_errors(hub_repo):
    with pytest.raises(CheckpointError, match="'org/missing' not found"):
        hybridvit.create_model("hf-hub:org/missing")
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        hybridvit.create_model("hf-hub:org/empty")
    with pytest.raises(CheckpointError, match="no revision 'v9'"):
        hybridvit.create_model("hf-hub:org/tiny@v9")
    with pytest.raises(ValueError, match="expected 'hf-hub:ORG/REPO'"):
        hybridvit.create_model("hf-hub:tiny")


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub",
                                          reason="the hub extra is not installed: pip install 'hybridvit[hub]'")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message, revision, repo_type):
            from pathlib import Path
            files = {p.name: p for p in Path(folder_path).iterdir()}
            calls.append(("upload", repo_id, sorted(files)))
            # what is uploaded loads back as the same model
            loaded = hybridvit.create_model(None, pretrained=folder_path)
            calls.append(("logits", logits(loaded)))
            assert "hf-hub:me/tiny" in files["README.md"].read_text()
            return type("CommitInfo", (), {"commit_url": f"https://hub.example/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = trained("fastervit_nano")
    url = hub.push_to_hub(model, "me/tiny", token="hf_x", private=True)
    assert url == "https://hub.example/me/tiny/commit/abc"
    assert calls[0] == ("token", "hf_x") and calls[1] == ("create_repo", "me/tiny", True, True)
    assert calls[2] == ("upload", "me/tiny", ["README.md", "config.json", "model.safetensors"])
    assert torch.equal(calls[3][1], logits(model))


@pytest.mark.slow  # a real training run
def test_trained_run_to_hub_folder(tmp_path, capsys):
    """A `hybridvit train` run's best checkpoint -> model with the run's classes -> save_pretrained ->
    create_model(pretrained=DIR): same logits, same classes, same preprocessing."""
    pytest.importorskip("kornia", reason="training needs the train extra (kornia)")
    pytest.importorskip("tqdm", reason="training needs the train extra (tqdm)")
    from _imagedata import make_folder

    from hybridvit.checkpoint import read_checkpoint_file
    from hybridvit.train.config import make_config
    from hybridvit.train.engine import train

    root = make_folder(tmp_path / "data", n_train=8, n_val=4, size=24)
    summary = train(make_config(None, data=str(root), output=str(tmp_path / "run"), epochs=1, model="fastervit_nano",
                                img_size=32, batch_size=8, threads=1, progress=False, plot=False, workers=0))
    model = hybridvit.load_model(summary["checkpoint"])
    ck = read_checkpoint_file(summary["checkpoint"])
    folder = hybridvit.save_pretrained(model.eval(), tmp_path / "hub")
    loaded = hybridvit.create_model(None, pretrained=folder)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert loaded.class_names == ["blue", "red"] == ck["class_names"]
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32) and loaded.model_kwargs == {"img_size": 32}
    # the folder goes wherever a run goes: load_model and every command's --pretrained
    with torch.no_grad():
        assert torch.equal(hybridvit.load_model(folder)(x), model(x))
    from hybridvit.cli import main

    img = next((root / "val" / "red").iterdir())
    capsys.readouterr()
    assert main(["predict", "--pretrained", str(folder), str(img), "--topk", "2", "--threads", "1"]) == 0
    assert {"red", "blue"} <= set(capsys.readouterr().out.replace(",", " ").replace(":", " ").split())
    assert main(["eval", "--pretrained", str(folder), "--data", str(root), "--threads", "1", "--workers", "0",
                 "--no-progress"]) == 0
    with pytest.raises(hybridvit.checkpoint.CheckpointError, match="Hub folder"):
        hybridvit.load_model(folder, ema=True)
