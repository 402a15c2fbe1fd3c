"""Datasets and transforms: folders, bad data, the embedded digits, samplers, device augmentation."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("PIL", reason="needs the train extra (pillow)")
pytest.importorskip("kornia", reason="needs the train extra (kornia)")

from _imagedata import corrupt_jpeg, make_folder  # noqa: E402

from hybridvit.data.digits import DigitsDataset  # noqa: E402
from hybridvit.data.folder import DataError, ImageFolder, collate_skip  # noqa: E402
from hybridvit.data.loader import EpochSampler, build_dataset  # noqa: E402
from hybridvit.data.mixup import MixupCutmix  # noqa: E402
from hybridvit.data.transforms import (  # noqa: E402
    DeviceAugment,
    EvalTransform,
    TrainTransform,
)


def test_image_folder_classes_and_labels(tmp_path):
    root = make_folder(tmp_path, n_train=3, n_val=2)
    ds = build_dataset(str(root), "train", EvalTransform(16, 0.875, "bicubic"))
    assert ds.classes == ["blue", "red"]
    assert len(ds) == 6 and sorted(set(ds.targets)) == [0, 1]
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 0
    assert img[2].float().mean() > img[0].float().mean()  # blue image: blue channel dominates


def test_missing_and_empty_folders_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        build_dataset(str(tmp_path / "nowhere"), "train", None)
    root = make_folder(tmp_path / "d", n_train=2, n_val=1)
    (root / "train" / "green").mkdir()
    with pytest.raises(DataError, match="green"):
        build_dataset(str(root), "train", None)
    (root / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset(str(root / "empty"), "train", None)


def test_corrupt_image_is_skipped_or_strict_error(tmp_path):
    root = make_folder(tmp_path, n_train=2, n_val=1, ext="jpg")
    bad = corrupt_jpeg(root / "train" / "red" / "zzz_broken.jpg")
    ds = ImageFolder(root / "train", EvalTransform(16))
    items = [ds[i] for i in range(len(ds))]
    batch = collate_skip(items)
    assert batch["images"].shape[0] == len(ds) - 1 and batch["bad"] == [str(bad)]
    strict = ImageFolder(root / "train", EvalTransform(16), strict=True)
    with pytest.raises(DataError, match="zzz_broken"):
        [strict[i] for i in range(len(strict))]


def test_digits_split_is_fixed():
    tr, va = DigitsDataset("train"), DigitsDataset("val")
    assert (len(tr), len(va)) == (1437, 360) and tr.classes == [str(i) for i in range(10)]
    assert sorted(set(va.targets)) == list(range(10))
    img, _ = DigitsDataset("val", EvalTransform(32, 1.0))[0]
    assert img.shape == (3, 32, 32) and img.max() > 200  # real strokes, scaled to 0..255


def test_eval_transform_follows_crop_pct():
    from PIL import Image

    img = Image.new("RGB", (40, 20))
    img.paste((255, 255, 255), (0, 0, 40, 2))  # a white band on top: cropped away at crop_pct 0.5
    out = EvalTransform(10, crop_pct=0.5, interpolation="nearest")(img)
    assert out.shape == (3, 10, 10) and out.max() == 0
    out = EvalTransform(10, crop_pct=1.0, interpolation="nearest")(img)
    assert out.max() == 255


def test_train_transform_is_seeded_per_epoch_and_index():
    from PIL import Image

    img = Image.effect_noise((48, 40), 60).convert("RGB")
    tf = TrainTransform(16, scale=(0.1, 0.5), seed=3)
    a, b = tf(img, index=5, epoch=1), tf(img, index=5, epoch=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, tf(img, index=5, epoch=2))
    assert not torch.equal(a, tf(img, index=6, epoch=1))


def test_epoch_sampler_partitions_and_skips():
    s = [EpochSampler(10, True, seed=1, rank=r, world_size=3) for r in range(3)]
    for x in s:
        x.set_epoch(4)
    parts = [x.indices() for x in s]
    assert all(len(p) == 4 for p in parts) and set(sum(parts, [])) == set(range(10))
    full = parts[0]
    s[0].set_epoch(4, start=2)
    assert s[0].indices() == full[2:]
    s[0].set_epoch(5)
    assert s[0].indices() != full
    ev = [EpochSampler(10, False, rank=r, world_size=3, pad=False).indices() for r in range(3)]
    assert sorted(sum(ev, [])) == list(range(10))  # evaluation counts every image once


def test_device_augment_and_mixup():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    aug = DeviceAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "rand-m9-mstd0.5-inc1", hflip=0.5, reprob=1.0)
    y = aug(x)
    assert y.shape == (8, 3, 24, 24) and y.dtype == torch.float32 and torch.isfinite(y).all()
    plain = DeviceAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None, hflip=0.0)(x)
    assert torch.allclose(plain, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)
    mix = MixupCutmix(5, mixup=0.8, cutmix=1.0, smoothing=0.1)
    for _ in range(4):
        xm, t = mix(plain, torch.arange(8) % 5)
        assert xm.shape == plain.shape and torch.allclose(t.sum(1), torch.ones(8))
        assert (t.max(1).values < 1).all()


# ------------------------------------------------------------------ checks before training (issue 19)
def _train_error(argv: list[str], capsys) -> str:
    from hybridvit.cli import main

    assert main(["train", *argv, "--no-progress", "--threads", "1", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_one_class_is_refused_before_training(tmp_path, capsys):
    root = make_folder(tmp_path / "data", n_train=2, n_val=1)
    for split in ("train", "val"):
        for f in (root / split / "red").iterdir():
            f.unlink()
        (root / split / "red").rmdir()
    out = tmp_path / "runs" / "one"
    err = _train_error(["--data", str(root), "--output", str(out)], capsys)
    assert "1 class folder" in err and "at least 2 classes" in err and str(root / "train") in err
    assert not (tmp_path / "runs").exists()  # a failed start leaves no folder, not even runs/


def test_no_readable_validation_image_is_refused_before_training(tmp_path, capsys):
    root = make_folder(tmp_path / "data", n_train=2, n_val=1)
    for f in (root / "val").rglob("*.png"):
        f.write_bytes(b"not an image")
    err = _train_error(["--data", str(root), "--output", str(tmp_path / "run")], capsys)
    assert f"no image of {root / 'val'} can be read" in err and "validation would score 0 %" in err
    assert not (tmp_path / "run").exists()


def test_validation_classes_unknown_to_training_are_refused(tmp_path, capsys):
    root = make_folder(tmp_path / "data", n_train=2, n_val=1)
    green = root / "val" / "green"
    green.mkdir()
    (root / "val" / "red" / "000.png").rename(green / "000.png")
    err = _train_error(["--data", str(root), "--output", str(tmp_path / "run")], capsys)
    assert "green" in err and f"{root / 'train'} does not have" in err and "Training classes: blue, red" in err


def test_data_checks_accept_a_good_folder_and_name_the_folders(tmp_path):
    from hybridvit.data.loader import check_training_data, data_folders

    root = make_folder(tmp_path / "data", n_train=2, n_val=1)
    corrupt_jpeg(root / "val" / "red" / "aaa.jpg")  # the first file is broken, a later one is readable
    assert check_training_data(str(root), "train", "val") == ["blue", "red"]
    assert data_folders(str(root), "train", "val") == {"train_folder": str((root / "train").resolve()),
                                                       "val_folder": str((root / "val").resolve())}
    assert data_folders("digits", "train", "val") == {"train_folder": None, "val_folder": None}


def test_one_preprocessing_follows_crop_mode_and_size():
    """Preprocess (from pretrained_cfg) honours timm's crop modes and a non-square input size."""
    from PIL import Image

    from hybridvit.data.transforms import Preprocess

    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 100))  # a white band on the left edge
    base = {"input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bilinear"}
    center = Preprocess.from_cfg({**base, "crop_mode": "center"}).geometry(img)
    squash = Preprocess.from_cfg({**base, "crop_mode": "squash"}).geometry(img)
    border = Preprocess.from_cfg({**base, "crop_mode": "border", "mean": (0.0, 0.0, 0.0)}).geometry(img)
    assert center.shape == squash.shape == border.shape == (3, 64, 64)
    assert center[:, :, :4].float().mean() < 10  # the center crop cut the band away
    assert squash[:, :, :4].float().mean() > 200  # squash keeps the whole width
    assert border[:, :10].float().mean() < 10 and border[:, 20:40, :4].float().mean() > 200  # padded, whole image
    wide = Preprocess.from_cfg({**base, "input_size": (3, 32, 96)})
    assert wide.geometry(img).shape == (3, 32, 96)
    x = wide(img)
    assert x.dtype == torch.float32 and x.shape == (3, 32, 96)


def test_randaugment_draws_operations_and_magnitudes_per_image():
    """timm's rand-m9-mstd0.5-inc1, batched: each image draws its own operations, whether each applies, and its
    own magnitude from N(9, 0.5) (kornia's RandAugment drew one magnitude per batch); every operation keeps
    images in [0, 1] and is the identity where timm's is at magnitude 0 (enhance factor 1, no shift)."""
    from hybridvit.data import randaugment as ra

    assert ra.parse("rand-m9-mstd0.5-inc1") == (2, 9.0, 0.5, True)
    assert ra.parse("rand-m7-n3") == (3, 7.0, 0.0, False)
    with pytest.raises(ValueError, match="mmax"):
        ra.parse("rand-m9-mmax12")
    aug = ra.RandAugment("rand-m9-mstd0.5-inc1")
    torch.manual_seed(0)
    m = aug.magnitudes(4096, torch.device("cpu"))
    assert abs(m.mean().item() - 9.0) < 0.05 and abs(m.std().item() - 0.5) < 0.05 and m.max() <= 10
    assert ra.RandAugment("rand-m9").magnitudes(8, torch.device("cpu")).unique().tolist() == [9.0]
    x = torch.rand(6, 3, 20, 20)
    ones, zero = torch.ones(6), torch.zeros(6)
    for op in ra.OPS:
        y = ra.apply_op(op, x, torch.linspace(0, 10, 6), torch.where(torch.arange(6) % 2 == 0, 1.0, -1.0))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, op
        if op in ("color", "contrast", "brightness", "sharpness", "rotate", "shear_x", "shear_y",
                  "translate_x", "translate_y", "solarize_add"):
            torch.testing.assert_close(ra.apply_op(op, x, zero, ones), x, atol=1e-4, rtol=0, msg=op)
    # the same image four times in a batch: per-image draws give different results
    same = torch.rand(1, 3, 20, 20).expand(4, -1, -1, -1).contiguous()
    torch.manual_seed(1)
    out = ra.RandAugment("rand-m9-n4-mstd0.5-inc1", prob=1.0)(same)
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) > 1
    # one operation at per-image magnitudes: brightness scales each image by its own factor
    b = ra.apply_op("brightness", same, torch.tensor([0.0, 5.0, 10.0, 2.5]), torch.ones(4))
    factors = (b.flatten(1).sum(1) / same.flatten(1).sum(1)).tolist()
    assert factors[0] == pytest.approx(1.0, abs=1e-4) and factors[1] > factors[3] > factors[0]
