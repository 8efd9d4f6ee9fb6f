"""Building blocks shared by the models: MLPs with DLRM-reference initialisation and activations."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

ACTIVATIONS = ("relu", "sigmoid", "none")


def activation(name: str) -> nn.Module:
    """``relu`` | ``sigmoid`` | ``none`` -> module."""
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class MLP(nn.Sequential):
    """Linear layers with ReLU between them and ``last_activation`` after the final one.

    Weights follow the DLRM reference: normal with std sqrt(2 / (fan_in + fan_out)), biases normal
    with std sqrt(1 / fan_out).
    """

    def __init__(
        self, widths: list[int], last_activation: str = "relu", generator: torch.Generator | None = None
    ):
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            linear = nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                linear.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
                linear.bias.normal_(0.0, math.sqrt(1.0 / fan_out), generator=generator)
            layers.append(linear)
            is_last = i == len(widths) - 2
            layers.append(activation(last_activation) if is_last else nn.ReLU())
        super().__init__(*layers)
