"""Checkpoint reading/loading and registry behaviour (shown on FasterViT models)."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import threading

import pytest
import torch
from conftest import load_fixture

import hybridvit
from hybridvit import registry
from hybridvit.checkpoint import CheckpointError


def tiny_overrides(fx: dict) -> dict:
    cfg = dict(fx["official_config"])
    cfg["img_size"] = cfg.pop("resolution")
    return cfg


@pytest.fixture(scope="module")
def fx():
    return load_fixture("fastervit_tiny")


@pytest.fixture(scope="module")
def x(fx):
    return fx["input"][:1]


def logits_after_loading(fx, path_or_dict, **kw) -> torch.Tensor:
    model = hybridvit.create_model("fastervit_0", **{**tiny_overrides(fx), **kw})
    hybridvit.load_checkpoint(model, path_or_dict)
    with torch.no_grad():
        return model.eval()(fx["input"][:1])


def test_official_layouts(fx, tmp_path):
    sd = fx["state_dict"]
    layouts = {
        "state_dict": {"state_dict": sd},
        "model": {"model": sd},
        "bare": dict(sd),
        "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        "extras": {"state_dict": sd, "epoch": 300, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                   "args": "stuff", "max_accuracy": 82.1},
    }
    reference = None
    for layout, obj in layouts.items():
        path = tmp_path / f"{layout}.pth.tar"
        torch.save(obj, path)
        model = hybridvit.create_model("fastervit_0", **tiny_overrides(fx))
        hybridvit.load_checkpoint(model, path)
        state = model.state_dict()
        if reference is None:
            reference = state
            with torch.no_grad():
                out = model.eval()(fx["input"][:1])
            assert (out - fx["logits"][:1]).abs().max().item() <= 1e-4
        else:
            assert all(torch.equal(state[k], reference[k]) for k in reference), layout


def test_hybridvit_layout_roundtrip(fx, tmp_path):
    model = hybridvit.create_model("fastervit_0", **tiny_overrides(fx))
    hybridvit.load_checkpoint(model, fx["state_dict"])
    path = tmp_path / "ours.pt"
    torch.save(model.state_dict(), path)
    assert (logits_after_loading(fx, path) - fx["logits"][:1]).abs().max().item() <= 1e-4


def test_other_num_classes_keeps_fresh_head(fx):
    cfg = tiny_overrides(fx)
    cfg["num_classes"] = 3
    model = hybridvit.create_model("fastervit_0", **cfg)
    head_before = model.head.weight.detach().clone()
    hybridvit.load_checkpoint(model, fx["state_dict"])
    torch.testing.assert_close(model.head.weight, head_before)
    torch.testing.assert_close(model.stem.conv1.weight, fx["state_dict"]["patch_embed.conv_down.0.weight"])


def test_checkpoint_of_another_variant_says_what_differs(fx):
    model = hybridvit.create_model("fastervit_nano", num_classes=10)
    with pytest.raises(CheckpointError) as err:
        hybridvit.load_checkpoint(model, fx["state_dict"])
    msg = str(err.value)
    assert "fastervit_nano" in msg and "shapes differ" in msg
    assert "checkpoint (" in msg and "vs model (" in msg  # names the shapes
    other = hybridvit.create_model("fastervit_0", **{**tiny_overrides(fx), "depths": [1, 1, 3, 2]})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: stages\.2\.blocks\.2\."):
        hybridvit.load_checkpoint(other, fx["state_dict"])


def test_truncated_file(fx, tmp_path):
    path = tmp_path / "full.pth"
    torch.save({"state_dict": fx["state_dict"]}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    model = hybridvit.create_model("fastervit_0", **tiny_overrides(fx))
    with pytest.raises(CheckpointError, match="truncated"):
        hybridvit.load_checkpoint(model, cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        hybridvit.load_checkpoint(model, tmp_path / "nope.pth")


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match="fastervit_") as err:
        hybridvit.create_model("fastervit_9")
    assert "Did you mean" in str(err.value)
    with pytest.raises(ValueError, match="fastervit_nano"):
        hybridvit.create_model("fastervit_nanoo")


def test_list_models():
    names = hybridvit.list_models("fastervit_*")
    assert "fastervit_0" in names and "fastervit_4_21k_768" in names and "fastervit_nano" in names
    assert names == sorted(names)


@pytest.fixture
def tiny_entry(monkeypatch, tmp_path, fx):
    """fastervit_nano's registry entry turned into the tiny fixture's config with a given URL."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    name = "fastervit_nano"
    ckpt = tmp_path / "srv" / "tiny_official.pth.tar"
    ckpt.parent.mkdir()
    torch.save({"state_dict": fx["state_dict"], "epoch": 1}, ckpt)

    def set_url(url: str):
        entry = registry._REGISTRY[name]
        cfg = {**entry.config, **tiny_overrides(fx)}
        cfg.pop("num_classes")
        monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(entry, url=url, config=cfg))
    return name, ckpt, set_url


def test_pretrained_true_file_url(tiny_entry, fx, tmp_path):
    name, ckpt, set_url = tiny_entry
    set_url(ckpt.as_uri())
    model = hybridvit.create_model(name, pretrained=True, num_classes=10).eval()
    assert (tmp_path / "hub" / "checkpoints" / ckpt.name).is_file()
    with torch.no_grad():
        assert (model(fx["input"][:1]) - fx["logits"][:1]).abs().max().item() <= 1e-4


def test_pretrained_true_http_server_and_cache(tiny_entry, fx, tmp_path):
    name, ckpt, set_url = tiny_entry
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ckpt.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        set_url(f"http://127.0.0.1:{server.server_address[1]}/{ckpt.name}")
        model = hybridvit.create_model(name, pretrained=True, num_classes=10).eval()
    finally:
        server.shutdown()
        server.server_close()
    with torch.no_grad():
        assert (model(fx["input"][:1]) - fx["logits"][:1]).abs().max().item() <= 1e-4
    # second time: served from the hub cache, the server is gone
    model = hybridvit.create_model(name, pretrained=True, num_classes=10)
    assert torch.equal(model.stem.conv1.weight, fx["state_dict"]["patch_embed.conv_down.0.weight"])


def test_pretrained_download_failure_is_actionable(tiny_entry):
    name, _, set_url = tiny_entry
    set_url("http://127.0.0.1:9/missing.pth.tar")
    with pytest.raises(CheckpointError, match="pretrained='/path/to/missing.pth.tar'"):
        hybridvit.create_model(name, pretrained=True, num_classes=10)


def test_no_published_weights_says_so():
    with pytest.raises(CheckpointError, match="pretrained='/path/to/file.pth'"):
        hybridvit.create_model("fastervit_nano", pretrained=True)


def test_pretrained_path(fx, tmp_path):
    path = tmp_path / "local.pth"
    torch.save({"model": fx["state_dict"]}, path)
    model = hybridvit.create_model("fastervit_0", pretrained=str(path), **tiny_overrides(fx)).eval()
    with torch.no_grad():
        assert (model(fx["input"][:1]) - fx["logits"][:1]).abs().max().item() <= 1e-4


class _TrainingConfig(dict):
    """Like the yacs CfgNode that CrossFormer's training script saves next to the weights."""


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_published_files_with_training_objects_load_without_running_their_code(fx, tmp_path):
    import argparse

    cfg = _TrainingConfig(MODEL="fastervit_0")
    cfg.nested = _TrainingConfig(lr=0.1)
    marker = tmp_path / "ran"
    path = tmp_path / "published.pth.tar"
    torch.save({"state_dict": fx["state_dict"], "args": argparse.Namespace(lr=0.005, model="faster_vit_0"),
                "config": cfg, "hook": _Exploit(marker), "epoch": 309}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(path, weights_only=True)
    out = logits_after_loading(fx, path)
    assert (out - fx["logits"][:1]).abs().max().item() <= 1e-4
    assert not marker.exists()


def test_safetensors_file_loads(fx, tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="needs the safetensors extra")
    model = hybridvit.create_model("fastervit_0", **tiny_overrides(fx))
    hybridvit.load_checkpoint(model, fx["state_dict"])
    path = tmp_path / "ours.safetensors"
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert (logits_after_loading(fx, path) - fx["logits"][:1]).abs().max().item() <= 1e-4
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        logits_after_loading(fx, path)


def _old_run_checkpoint(model, ema_model=None) -> dict:
    """A run checkpoint exactly as hybridvit 0.1 (CHECKPOINT_VERSION = 1 in train/engine.py) wrote it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {"model": "fastervit_nano", "img_size": 32, "epochs": 2, "seed": 0, "data": "digits"}
    return {"version": 1, "model_name": "fastervit_nano", "model_kwargs": {"img_size": 32}, "num_classes": 10,
            "class_names": [str(i) for i in range(10)], "pretrained_cfg": dict(model.pretrained_cfg),
            "state_dict": model.state_dict(),
            "state_dict_ema": ema_model.state_dict() if ema_model is not None else None,
            "ema_updates": 3 if ema_model is not None else 0, "optimizer": opt.state_dict(),
            "scheduler": {"step": 3, "total": 6}, "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
            "epoch": 1, "step_in_epoch": 0, "best_top1": 50.0, "rng": [{"torch": torch.get_rng_state().tolist()}],
            "running": [[0.0, 0.0, 0.0]], "skipped_images": [], "config": cfg, "world_size": 1}


def test_old_layout_run_checkpoint_still_loads(tmp_path):
    torch.manual_seed(0)
    model = hybridvit.create_model("fastervit_nano", num_classes=10, img_size=32).eval()
    ema = hybridvit.create_model("fastervit_nano", num_classes=10, img_size=32).eval()
    path = tmp_path / "old.pt"
    torch.save(_old_run_checkpoint(model, ema), path)
    x = torch.randn(2, 3, 32, 32)
    loaded = hybridvit.load_model(path)
    assert loaded.model_name == "fastervit_nano" and loaded.model_kwargs == {"img_size": 32}
    assert loaded.class_names == [str(i) for i in range(10)] and loaded.pretrained_cfg["input_size"][-1] == 32
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(hybridvit.load_model(path, ema=True)(x), ema(x), rtol=0, atol=0)
    # create_model(pretrained=run.pt) keeps the trained head when num_classes matches
    again = hybridvit.create_model("fastervit_nano", pretrained=str(path), num_classes=10, img_size=32).eval()
    assert torch.equal(again.head.weight, model.head.weight)


def test_load_model_of_a_run_folder_and_its_errors(tmp_path):
    from hybridvit.checkpoint import make_run_checkpoint

    model = hybridvit.create_model("fastervit_nano", num_classes=3, img_size=48)
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 48}, num_classes=3,
                                   class_names=["a", "b", "c"], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), tmp_path / "best.pt")
    loaded = hybridvit.load_model(tmp_path, device="cpu")
    assert loaded.class_names == ["a", "b", "c"] and loaded.num_classes == 3
    assert loaded.pretrained_cfg["input_size"] == (3, 48, 48)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        hybridvit.load_model(tmp_path / "best.pt", ema=True)
    official = tmp_path / "official.pth"
    torch.save({"state_dict": model.state_dict()}, official)
    with pytest.raises(CheckpointError, match="not a hybridvit run checkpoint"):
        hybridvit.load_model(official)
    future = tmp_path / "future.pt"
    torch.save({"format": "hybridvit-run", "version": 9, "model_name": "fastervit_nano",
                "state_dict": model.state_dict()}, future)
    with pytest.raises(CheckpointError, match="format version 9"):
        hybridvit.load_model(future)
