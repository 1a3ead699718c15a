"""Small models built the same way from torch.nn or torchcnn.nn, for the workflow tests."""

from __future__ import annotations

import torch


class ResNetBlock(torch.nn.Module):
    """A ResNet-style stem and basic block: 3×3 stem, in-place ReLU, 3×3 stride-2 max pool with
    padding, a stride-2 3×3 conv and a 3×3 conv without bias, a 1×1 stride-2 downsample, the
    residual sum, global average pooling and a dense head."""

    def __init__(self, nn, channels=3, width=4, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.downsample = nn.Conv2d(width, 2 * width, 1, stride=2, bias=False)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.stem(x)))
        y = self.conv2(self.relu(self.conv1(x)))
        y = self.relu(y + self.downsample(x))
        return self.fc(y.mean((2, 3)))


class SmallCNN(torch.nn.Module):
    """conv → ReLU → 2×2 pool → conv → ReLU → pool → dense: the MNIST model's shape, smaller."""

    def __init__(self, nn, channels=1, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(x.flatten(-3))


def twins(model_class, device="cpu", dtype=torch.float64, **kwargs):
    """The same model from torchcnn.nn and from torch.nn, with the same weights."""
    import torchcnn

    ours = model_class(torchcnn.nn, **kwargs).to(device=device, dtype=dtype)
    theirs = model_class(torch.nn, **kwargs).to(device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs
