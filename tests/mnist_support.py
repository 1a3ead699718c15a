"""What the application's tests share (test_data, test_training, test_checkpoint, test_cli,
test_predict, test_distributed): the MNIST files, train.py and predict.py, short runs.

The real-data tests find MNIST through $TORCHCNN_DATA_DIR (CI points it at ../shared/data/mnist), or
../shared/data/mnist beside the checkout; they are skipped, saying so, only when neither holds it.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from torchcnn.mnist import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import predict  # noqa: E402,F401  (the scripts import nothing heavy until main() runs)
import train  # noqa: E402,F401


def _mnist_dir():
    for candidate in (os.environ.get(data.ENV_VAR), ROOT.parent / "shared" / "data" / "mnist"):
        if candidate and data.find_files(candidate):
            return Path(candidate)
    return None


MNIST_DIR = _mnist_dir()
needs_mnist = pytest.mark.skipif(
    MNIST_DIR is None, reason=f"MNIST files not found: set {data.ENV_VAR} to the folder that holds them")
QUICK = ["--no-download", "--quiet", "--device", "cpu"]
# A short run's arguments: 2 epochs of 20 steps.
TINY = ["--epochs", 2, "--limit-train", 640, "--limit-test", 200, "--batch-size", 32]


def run_train(argv, data_dir=None):
    """train.main in this process, with QUICK and the MNIST files."""
    return train.main([*QUICK, "--data-dir", str(data_dir or MNIST_DIR), *map(str, argv)])


def train_command(*argv) -> list[str]:
    """train.py as a command line of its own (for signals and fresh processes)."""
    return [sys.executable, str(ROOT / "train.py"), *QUICK, "--data-dir", str(MNIST_DIR), *map(str, argv)]


def metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def short_run(tmp_path_factory) -> Path:
    """One epoch on 12,000 images (about 96 %), run once per session and
    shared by the modules that need a trained checkpoint."""
    if MNIST_DIR is None:
        pytest.skip(f"MNIST files not found: set {data.ENV_VAR}")
    out = tmp_path_factory.getbasetemp() / "short_run"
    if not (out / "metrics.json").is_file():
        assert run_train(["--epochs", 1, "--limit-train", 12000, "--limit-test", 2000, "--out", out]) == 0
    return out


def write_idx(folder: Path, images: torch.Tensor, labels: torch.Tensor, gz: bool):
    """The four MNIST files with MNIST's shapes, every image ``images`` and every label ``labels``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60000), ("t10k", 10000)):
        for kind, tensor, dims in (("images", images, 3), ("labels", labels, 1)):
            shape = (n, 28, 28) if dims == 3 else (n,)
            body = tensor.expand(*shape).contiguous().numpy().tobytes()
            header = bytes([0, 0, 8, dims]) + b"".join(d.to_bytes(4, "big") for d in shape)
            name = f"{split}-{kind}-idx{dims}-ubyte"
            content = header + body
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(content) if gz else content)


def help_blocks(text: str) -> dict[str, str]:
    """An argparse --help text as {"--flag METAVAR": its help, ...}, one entry per argument."""
    blocks, head = {}, None
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):  # an argument's first line
            head, _, rest = line.strip().partition("  ")
            blocks[head] = rest.strip()
        elif head is not None and line.startswith("    ") and line.strip():
            blocks[head] = f"{blocks[head]} {line.strip()}".strip()
        else:
            head = None
    return blocks
