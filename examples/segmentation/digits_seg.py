"""Semantic segmentation with a hybridvit backbone: handwritten digits pasted onto real photographs.

The task: scikit-learn's 1797 handwritten digit scans (real 8x8 scans, as in `hybridvit train`'s default
data) are pasted at random places and scales (24-56 px) in random colours onto random crops of real
photographs (scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg; training crops
from the left 70% of each photograph, validation crops from the right 30%, with held-out digit scans).
Every pixel is labelled: 0 for the photograph, 1 + d where digit d's stroke covers it (11 classes).

The model: a hybridvit `features_only` backbone (maps at strides 4, 8, 16, 32) with a Semantic-FPN head
(Kirillov et al., "Panoptic Feature Pyramid Networks", 2019): lateral 1x1 convolutions, a top-down
pathway, a 3x3 conv per level, every level upsampled to stride 4 and summed, a 1x1 classifier and a
bilinear upsampling to the input size; or (`--head upernet`) Hugging Face transformers' UperNet on the
backbone through `TimmBackboneConfig`. The Semantic-FPN stays the default because it needs nothing but
torch: the example and its test run in the core install, where transformers and timm are not installed.

    python examples/segmentation/digits_seg.py --steps 1500                 # Semantic-FPN
    python examples/segmentation/digits_seg.py --steps 1500 --head upernet  # transformers' UperNet

Needs the train extra (scikit-learn, matplotlib, pillow); `--head upernet` also timm and transformers.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hybridvit

NUM_CLASSES = 11  # background + digits 0-9
CLASS_NAMES = ["photo"] + [str(d) for d in range(10)]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ------------------------------------------------------------------------------------------------ data
def _photo(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0


def photographs(split: str) -> list[torch.Tensor]:
    """Real photographs, (3, H, W) in [0, 1]: scikit-learn's china.jpg and flower.jpg and matplotlib's
    grace_hopper.jpg; training crops come from the left 70% of each, validation crops from the right 30%."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255.0 for im in load_sample_images().images]
    photos.append(_photo(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    cut = [int(0.7 * p.shape[-1]) for p in photos]
    return [p[..., :c] if split == "train" else p[..., c:] for p, c in zip(photos, cut)]


def digit_scans(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 8, 8) ink in [0, 1] and (N,) labels; every 5th scan is validation (hybridvit's digits split)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = [i for i in range(len(d.target)) if (i % 5 == 0) == (split == "val")]
    return torch.from_numpy(d.images[keep]).float() / 16.0, torch.from_numpy(d.target[keep]).long()


class DigitsOnPhotos:
    """Random (image, label map) pairs: `batch(n, generator)` -> ((n, 3, S, S) normalised, (n, S, S) long)."""

    def __init__(self, split: str = "train", size: int = 96, max_digits: int = 3) -> None:
        self.photos = photographs(split)
        self.scans, self.digits = digit_scans(split)
        self.size, self.max_digits = size, max_digits

    def _background(self, g: torch.Generator) -> torch.Tensor:
        photo = self.photos[int(torch.randint(len(self.photos), (1,), generator=g))]
        _, H, W = photo.shape
        side = int(torch.randint(self.size, min(H, W) + 1, (1,), generator=g))
        y = int(torch.randint(H - side + 1, (1,), generator=g))
        x = int(torch.randint(W - side + 1, (1,), generator=g))
        crop = photo[None, :, y:y + side, x:x + side]
        return F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=True)[0]

    def sample(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        img = self._background(g)
        label = torch.zeros(self.size, self.size, dtype=torch.long)
        for _ in range(int(torch.randint(1, self.max_digits + 1, (1,), generator=g))):
            i = int(torch.randint(len(self.digits), (1,), generator=g))
            s = int(torch.randint(24, min(56, self.size) + 1, (1,), generator=g))
            ink = F.interpolate(self.scans[i][None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
            ink = ink.clamp(0, 1)
            y, x = (int(torch.randint(self.size - s + 1, (1,), generator=g)) for _ in range(2))
            colour = torch.rand(3, 1, 1, generator=g)
            region = img[:, y:y + s, x:x + s]
            if (colour.mean() - region.mean()).abs() < 0.3:  # ink must stand out from the photo under it:
                colour = 0.6 + 0.4 * colour if region.mean() < 0.5 else 0.4 * colour  # bright on dark, dark on bright
            img[:, y:y + s, x:x + s] = region * (1 - ink) + colour * ink
            label[y:y + s, x:x + s][ink > 0.3] = 1 + int(self.digits[i])  # the stroke, not its faint rim
        return (img - MEAN) / STD, label

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sample(g) for _ in range(n)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# ----------------------------------------------------------------------------------------------- model
class SemanticFPN(nn.Module):
    """(B, 3, H, W) -> (B, num_classes, H, W) logits from a hybridvit backbone's stride-4..32 maps."""

    def __init__(self, backbone: str = "fastervit_nano", num_classes: int = NUM_CLASSES, channels: int = 64,
                 pretrained: bool | str = False, **backbone_kwargs) -> None:
        super().__init__()
        self.backbone = hybridvit.create_model(backbone, pretrained=pretrained, features_only=True,
                                               **backbone_kwargs)
        chans = self.backbone.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in chans)
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
                                    for _ in chans)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):  # top-down: coarse context into the finer maps
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        size = lat[0].shape[-2:]
        fused = sum(F.interpolate(s(p), size=size, mode="bilinear", align_corners=False) if i else s(p)
                    for i, (s, p) in enumerate(zip(self.smooth, lat)))
        return F.interpolate(self.classifier(fused), size=x.shape[-2:], mode="bilinear", align_corners=False)


class UperNet(nn.Module):
    """(B, 3, H, W) -> (B, num_classes, H, W): Hugging Face transformers' UperNet (the ADE20K head of the
    FasterViT and CrossFormer++ papers: pyramid pooling on the stride-32 map, an FPN over the four maps, all
    fused at stride 4) on the hybridvit backbone through `TimmBackboneConfig` (timm.create_model with
    features_only; the backbone has its registered configuration). Needs timm and transformers."""

    def __init__(self, backbone: str = "fastervit_nano", num_classes: int = NUM_CLASSES, channels: int = 64) -> None:
        super().__init__()
        from transformers import TimmBackboneConfig, UperNetConfig, UperNetForSemanticSegmentation

        config = UperNetConfig(backbone_config=TimmBackboneConfig(backbone=backbone, out_indices=(0, 1, 2, 3)),
                               hidden_size=channels, num_labels=num_classes, use_auxiliary_head=False)
        self.net = UperNetForSemanticSegmentation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


# the photograph covers ~90% of the pixels: weighting it down makes the digits' shapes, not "everything is
# photo", what the first minutes of training learn
CLASS_WEIGHTS = torch.tensor([0.5] + [1.0] * 10)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    loss = F.cross_entropy(model(x), y, weight=CLASS_WEIGHTS)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 32) -> dict[str, float | list[float]]:
    """mIoU (percent) over the 11 classes, per-class IoU and pixel accuracy."""
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in range(0, len(images), batch_size):
        pred = model(images[i:i + batch_size]).argmax(1)
        conf += torch.bincount(labels[i:i + batch_size].flatten() * NUM_CLASSES + pred.flatten(),
                               minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)
    inter = conf.diag().float()
    union = conf.sum(0).float() + conf.sum(1).float() - inter
    iou = inter / union.clamp(min=1)
    return dict(miou=100 * float(iou[union > 0].mean()), iou=[round(100 * float(v), 1) for v in iou],
                pixel_acc=100 * float(inter.sum() / conf.sum()))


def plot(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, path: Path, n: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    model.eval()
    with torch.no_grad():
        pred = model(images[:n]).argmax(1)
    cmap = ListedColormap(["black"] + [plt.get_cmap("tab10")(i) for i in range(10)])
    fig, axes = plt.subplots(3, n, figsize=(2.4 * n, 7.6))
    for j in range(n):
        rgb = (images[j] * STD + MEAN).clamp(0, 1).permute(1, 2, 0)
        for row, (title, im) in enumerate((("image", rgb), ("ground truth", labels[j]), ("prediction", pred[j]))):
            ax = axes[row, j]
            ax.imshow(im, cmap=None if row == 0 else cmap, vmin=0, vmax=NUM_CLASSES - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title)
    fig.legend(handles=[Patch(color=cmap(i), label=c) for i, c in enumerate(CLASS_NAMES)], loc="lower center",
               ncol=NUM_CLASSES, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fastervit_nano", help="hybridvit backbone (features_only)")
    p.add_argument("--head", choices=("fpn", "upernet"), default="fpn",
                   help="fpn: the Semantic-FPN here (torch only); upernet: transformers' UperNet (timm, transformers)")
    p.add_argument("--steps", type=int, default=1500, help="training steps (batches)")
    p.add_argument("--seconds", type=float, default=None, help="stop earlier after this many seconds")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="docs/images/segmentation_digits.png")
    p.add_argument("--results", default=None, help="write the metrics as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_data, val_data = DigitsOnPhotos("train", args.img_size), DigitsOnPhotos("val", args.img_size)
    val_x, val_y = val_data.batch(args.val_images, torch.Generator().manual_seed(1234))
    if args.head == "upernet":
        model = UperNet(args.model)
    else:
        model = SemanticFPN(args.model, drop_path_rate=0.0, img_size=args.img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    start, step, losses = time.perf_counter(), 0, []
    while step < args.steps and (args.seconds is None or time.perf_counter() - start < args.seconds):
        elapsed = time.perf_counter() - start
        for group in opt.param_groups:  # cosine decay, short warm-up
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        x, y = train_data.batch(args.batch_size, g)
        losses.append(train_step(model, opt, x, y))
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  {elapsed:6.0f}s  loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    train_s = time.perf_counter() - start
    metrics = evaluate(model, val_x, val_y)
    result = dict(model=args.model, head=args.head, steps=step, train_seconds=round(train_s, 1), img_size=args.img_size,
                  batch_size=args.batch_size, val_images=args.val_images, miou=round(metrics["miou"], 1),
                  pixel_acc=round(metrics["pixel_acc"], 1), iou=dict(zip(CLASS_NAMES, metrics["iou"])))
    print(json.dumps(result, indent=1))
    if args.plot:
        plot(model, val_x, val_y, Path(args.plot))
        print(f"saved {args.plot}")
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
