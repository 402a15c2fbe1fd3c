"""Transformer feed-forward network."""
from __future__ import annotations

import torch
from torch import nn

from .linear import linear


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 on (..., C), parameter names `fc1`/`fc2` as in timm and the official code.

    forward(x, shortcut) returns shortcut + MLP(x) when a shortcut is given: in inference the GELU and
    the add join the GEMMs (`layers.linear`). `act` names the activation in the module tree only.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(linear(x, self.fc1, gelu=True))
        if shortcut is None or (self.training and isinstance(self.drop, nn.Dropout)):
            y = self.drop(linear(h, self.fc2))
            return y if shortcut is None else shortcut + y
        return linear(h, self.fc2, residual=shortcut)
