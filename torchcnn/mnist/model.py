"""The MNIST classifier, built from torchcnn's layers or, identically, from torch.nn's."""

from __future__ import annotations

import torch
from torch import nn as torch_nn

from .. import nn as torchcnn_nn
from .cli import BACKENDS


def layers(backend: str):
    """The module namespace that provides Conv2d, ReLU, MaxPool2d, Linear and CrossEntropyLoss."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return torchcnn_nn if backend == "torchcnn" else torch_nn


class MnistNet(torch_nn.Module):
    """conv(1→c1) ReLU pool2 · conv(c1→c2) ReLU pool2 · dropout · linear(c2·s·s→hidden) ReLU
    dropout · linear(hidden→10).  Returns logits ``(N, 10)`` for images ``(N, 1, 28, 28)``.

    The filters are ``kernels[i]``² with ``padding[i]`` (by default 3×3 padded by 1, which keeps
    each plane's size: s = 7); ``s`` is what the two convolutions and pools leave of 28 (fast
    recipe: 5×5 and 3×3 unpadded, 28 → 24 → 12 → 10 → 5).

    Both backends create the parameters in the same order with the same initialisation, so the same
    seed gives the same weights, and their state_dicts are interchangeable. On the torchcnn
    backend each conv → ReLU → pool is one fused op (:class:`torchcnn.nn.Conv2dReLUMaxPool2d`)
    unless ``fuse=False``; the fused model keeps the unfused one's parameter names, so the two load
    each other's weights and checkpoints.
    """

    def __init__(self, backend: str = "torchcnn", channels: tuple[int, int] = (32, 64),
                 hidden: int = 128, dropout: float = 0.25, fuse: bool = True,
                 kernels: tuple[int, int] = (3, 3), padding: tuple[int, int] = (1, 1)):
        super().__init__()
        L = layers(backend)
        c1, c2 = channels
        if len(kernels) != 2 or len(padding) != 2:
            raise ValueError(f"MnistNet: expected two kernels and two paddings, one per convolution, got kernels "
                             f"{tuple(kernels)} and padding {tuple(padding)}")
        (k1, k2), (p1, p2) = kernels, padding
        side = 28
        for k, p in zip(kernels, padding):
            if not (isinstance(k, int) and isinstance(p, int) and k >= 1 and 0 <= p <= k // 2):
                raise ValueError(f"MnistNet: expected kernels ≥ 1 and paddings in [0, kernel // 2], got kernels "
                                 f"{tuple(kernels)} and padding {tuple(padding)}")
            side = (side + 2 * p - k + 1) // 2
            if side < 1:
                raise ValueError(f"MnistNet: kernels {tuple(kernels)} with padding {tuple(padding)} leave nothing "
                                 "of a 28×28 image")
        self.backend = backend
        self.fused = fuse and backend == "torchcnn"
        if self.fused:
            # The Identity placeholders keep the convolutions at features.0 and features.3.
            self.features = torch_nn.Sequential(
                L.Conv2dReLUMaxPool2d(1, c1, k1, padding=p1), torch_nn.Identity(), torch_nn.Identity(),
                L.Conv2dReLUMaxPool2d(c1, c2, k2, padding=p2), torch_nn.Identity(), torch_nn.Identity(),
            )
        else:
            self.features = torch_nn.Sequential(
                L.Conv2d(1, c1, k1, padding=p1), L.ReLU(), L.MaxPool2d(2),
                L.Conv2d(c1, c2, k2, padding=p2), L.ReLU(), L.MaxPool2d(2),
            )
        self.classifier = torch_nn.Sequential(
            torch_nn.Flatten(), torch_nn.Dropout(dropout),
            L.Linear(c2 * side * side, hidden), L.ReLU(), torch_nn.Dropout(dropout),
            L.Linear(hidden, 10),
        )
        self.config = {"channels": list(channels), "hidden": hidden, "dropout": dropout}
        if (tuple(kernels), tuple(padding)) != ((3, 3), (1, 1)):  # a checkpoint without them means these
            self.config.update(kernels=list(kernels), padding=list(padding))

    @classmethod
    def from_config(cls, backend: str, config: dict, fuse: bool = True) -> "MnistNet":
        """The model that a ``.config`` (as a checkpoint saves it) describes."""
        kwargs = dict(config)
        for name in ("channels", "kernels", "padding"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        return cls(backend, **kwargs, fuse=fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def loss_function(backend: str = "torchcnn", **kwargs) -> torch_nn.Module:
    return layers(backend).CrossEntropyLoss(**kwargs)
