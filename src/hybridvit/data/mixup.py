"""Mixup and CutMix on a batch on the device, with label smoothing (as timm's `Mixup`, batch mode)."""
from __future__ import annotations

import math

import torch


def one_hot(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    return out.scatter_(1, targets[:, None], 1.0 - smoothing + off)


class MixupCutmix:
    """With probability `prob` per batch, mix the batch with its flip: CutMix (alpha `cutmix`) with
    probability `switch_prob` when both are on, else Mixup (alpha `mixup`). Returns images and soft
    targets (B, num_classes). Random numbers come from torch's global generator (saved in checkpoints).
    """

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1) -> None:
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, smoothing

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def _beta(self, alpha: float) -> float:
        d = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
        return float(d.sample())

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = one_hot(targets, self.num_classes, self.smoothing)
        if float(torch.rand(())) >= self.prob:
            return x, y
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or float(torch.rand(())) < self.switch_prob)
        if use_cutmix:
            lam = self._beta(self.cutmix)
            h, w = x.shape[-2:]
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        else:
            lam = self._beta(self.mixup)
            x = x * lam + x.flip(0) * (1 - lam)
        return x, y * lam + y.flip(0) * (1 - lam)
