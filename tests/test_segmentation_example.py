"""examples/segmentation/digits_seg.py: its data are real digit scans on real photographs with per-pixel
labels, its Semantic-FPN model gives full-resolution logits, and one training step lowers the loss."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT

pytest.importorskip("sklearn", reason="the example's data need the train extra (scikit-learn)")
pytest.importorskip("matplotlib", reason="the example's validation photograph ships with matplotlib")
sys.path.insert(0, str(ROOT / "examples" / "segmentation"))
import digits_seg  # noqa: E402

TINY = dict(dim=16, in_dim=8, depths=(1, 1, 1, 1), drop_path_rate=0.0, img_size=64)


def test_digits_on_photos_labels():
    data = digits_seg.DigitsOnPhotos("val", size=64)
    x, y = data.batch(6, torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 64, 64) and y.shape == (6, 64, 64) and y.dtype == torch.long
    assert int(y.min()) == 0 and int(y.max()) <= 10
    for img, lab in zip(x, y):
        digit = lab > 0
        assert 0.005 < digit.float().mean() < 0.6  # every image has some digit pixels and mostly photo
        # the photograph is real: its pixels vary (not a flat colour)
        assert img[:, ~digit].std() > 0.1
    # the same generator seed gives the same batch; another gives another
    x2, y2 = data.batch(6, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(y, data.batch(6, torch.Generator().manual_seed(1))[1])


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    data = digits_seg.DigitsOnPhotos("train", size=64)
    x, y = data.batch(4, torch.Generator().manual_seed(0))
    model = digits_seg.SemanticFPN("fastervit_nano", channels=16, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    assert model(x).shape == (4, digits_seg.NUM_CLASSES, 64, 64)
    first = digits_seg.train_step(model, opt, x, y)
    with torch.no_grad():
        model.train()  # the same BatchNorm mode as the step
        after = float(torch.nn.functional.cross_entropy(model(x), y, weight=digits_seg.CLASS_WEIGHTS))
    assert after < first

    metrics = digits_seg.evaluate(model, x, y)
    assert 0 <= metrics["miou"] <= 100 and len(metrics["iou"]) == digits_seg.NUM_CLASSES


class _Oracle(torch.nn.Module):
    """Predicts the given label maps (or them with the digits erased)."""

    def __init__(self, labels: torch.Tensor, erase_digits: bool = False) -> None:
        super().__init__()
        self.labels = torch.zeros_like(labels) if erase_digits else labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.labels[: len(x)], digits_seg.NUM_CLASSES).permute(0, 3, 1, 2).float()


def test_miou():
    x, y = digits_seg.DigitsOnPhotos("val", size=64).batch(8, torch.Generator().manual_seed(0))
    assert digits_seg.evaluate(_Oracle(y), x, y, batch_size=8)["miou"] == pytest.approx(100)
    none = digits_seg.evaluate(_Oracle(y, erase_digits=True), x, y, batch_size=8)
    present = int((torch.bincount(y.flatten(), minlength=11) > 0).sum())
    # background IoU = its pixel share, every present digit class 0
    share = float((y == 0).float().mean())
    assert none["miou"] == pytest.approx(100 * share / present, abs=1e-3)


@pytest.mark.integration
def test_upernet_head_one_training_step_lowers_the_loss():
    """`--head upernet`: transformers' UperNet on the hybridvit backbone (through timm) gives full-resolution
    logits and trains."""
    for module in ("timm", "transformers"):
        pytest.importorskip(module, reason=f"the UperNet head needs {module} (the ecosystem lane has it)")
    torch.manual_seed(0)
    data = digits_seg.DigitsOnPhotos("train", size=64)
    x, y = data.batch(4, torch.Generator().manual_seed(0))
    model = digits_seg.UperNet("fastervit_nano", channels=16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    assert model(x).shape == (4, digits_seg.NUM_CLASSES, 64, 64)
    first = digits_seg.train_step(model, opt, x, y)
    with torch.no_grad():
        model.train()
        after = float(torch.nn.functional.cross_entropy(model(x), y, weight=digits_seg.CLASS_WEIGHTS))
    assert after < first
