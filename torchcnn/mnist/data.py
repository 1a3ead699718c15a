"""MNIST as tensors on the training device: find, verify, load, batch and augment.

The whole dataset is 55 MB of uint8, so it is held as two tensors on the device and batched by
indexing with a permutation; shifts for augmentation are drawn for the whole batch at once.
No DataLoader, no worker processes.

Files are looked for in the folder given, in torchvision's layout (``DIR/MNIST/raw``) or as the four
original IDX files (``DIR/train-images-idx3-ubyte[.gz]`` …). Each is checked against the published MD5
of its uncompressed content before use. With ``download=True`` and no local copy, torchvision's
``MNIST(download=True)`` fetches them into ``DIR/MNIST/raw``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "TORCHCNN_DATA_DIR"

# Mean and standard deviation of the training images' pixels in [0, 1], as everyone uses them.
MEAN, STD = 0.1307, 0.3081

# name -> (MD5 of the uncompressed file, IDX shape)
FILES = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", (60000,)),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", (10000,)),
}


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are not where we looked, and they could not be downloaded."""


class MNISTCorruptError(ValueError):
    """A file has the right name but not MNIST's content."""


def default_data_dir() -> str:
    return os.environ.get(ENV_VAR) or "./data"


def _candidate_dirs(root: Path) -> list[Path]:
    return [root, root / "MNIST" / "raw", root / "raw"]


def find_files(root: str | os.PathLike) -> dict[str, Path] | None:
    """Paths of the four IDX files (plain or .gz) in ``root`` or its torchvision layout, or None."""
    for folder in _candidate_dirs(Path(root)):
        found = {}
        for name in FILES:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(FILES):
            return found
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise MNISTCorruptError(f"{path}: cannot be read ({e})") from e


def read_idx(path: Path, name: str) -> torch.Tensor:
    """The uint8 tensor in one MNIST IDX file, after checking its MD5, header and size."""
    data = _read_bytes(path)
    md5, shape = FILES[name]
    if hashlib.md5(data).hexdigest() != md5:
        raise MNISTCorruptError(
            f"{path}: content does not match MNIST's {name} (MD5 of the uncompressed bytes differs); "
            "the file is corrupt or truncated: delete it and fetch it again")
    # IDX header: two zero bytes, type 0x08 (uint8), number of dims, then each dim as big-endian int32.
    header = 4 + 4 * len(shape)
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(len(shape)))
    if data[:4] != bytes([0, 0, 8, len(shape)]) or dims != shape:  # unreachable for a matching MD5
        raise MNISTCorruptError(f"{path}: unexpected IDX header")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(shape)


def _download(root: Path) -> None:
    try:
        import torchvision
    except ImportError as e:
        raise MNISTNotFoundError("torchvision is needed to download MNIST") from e
    for train in (True, False):
        torchvision.datasets.MNIST(str(root), train=train, download=True)


@dataclass
class MNIST:
    """The training and test sets as uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str

    def to(self, device) -> "MNIST":
        return MNIST(*(t.to(device) for t in (self.train_images, self.train_labels,
                                              self.test_images, self.test_labels)), self.source)

    def limit(self, train: int | None = None, test: int | None = None) -> "MNIST":
        """Only the first ``train`` training and ``test`` test images (None: all)."""
        for arg, value in (("limit_train", train), ("limit_test", test)):
            if value is not None and value < 1:
                raise ValueError(f"{arg} must be a positive number of images, got {value}")
        return MNIST(self.train_images[:train], self.train_labels[:train],
                     self.test_images[:test], self.test_labels[:test], self.source)


def load(root: str | os.PathLike | None = None, download: bool = True) -> MNIST:
    """Load MNIST from ``root`` (default: ``$TORCHCNN_DATA_DIR`` or ``./data``), downloading if allowed."""
    root = Path(default_data_dir() if root is None else root).expanduser()
    files = find_files(root)
    reason = "download disabled"
    if files is None and download:
        try:
            _download(root)
            reason = "downloaded, but the files are not where torchvision puts them"
        except Exception as e:  # no network, no permission, no torchvision: say where we looked
            reason = f"download failed ({type(e).__name__}: {e})"
        files = find_files(root)
    if files is None:
        looked = ", ".join(str(d) for d in _candidate_dirs(root))
        raise MNISTNotFoundError(
            f"MNIST not found: looked for {', '.join(FILES)} (plain or .gz) in {looked}; {reason}. "
            f"Put the four IDX files in one of those folders, or point --data-dir (or the "
            f"{ENV_VAR} environment variable) at the folder that holds them.")
    tensors = {name: read_idx(path, name) for name, path in files.items()}
    return MNIST(tensors["train-images-idx3-ubyte"], tensors["train-labels-idx1-ubyte"].long(),
                 tensors["t10k-images-idx3-ubyte"], tensors["t10k-labels-idx1-ubyte"].long(),
                 source=str(files["train-images-idx3-ubyte"].parent))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] images ``(N, 28, 28)`` -> normalized float32 ``(N, 1, 28, 28)``."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255
    return ((x - MEAN) / STD).unsqueeze(1)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of ``(N, H, W)`` by its own random (dy, dx) in [-max_shift, max_shift].

    Pixels shifted in are zero (background). The offsets come from ``generator`` (on the CPU, so a
    run draws the same numbers on every device); the shift itself is one gather on the images' device.
    """
    if max_shift == 0:
        return images
    n, h, w = images.shape
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(images.device)
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


class Batches:
    """Batches of a (sub)set, normalised, for training or evaluation: ``batch(i)``, or iterate.

    Training (``generator`` given): one epoch's random order and each batch's shifts (up to
    ``max_shift`` pixels) are drawn from ``generator``. With ``world_size`` > 1 every rank draws the
    same permutation and takes every ``world_size``-th example of it, trimmed so that every rank runs
    the same number of steps. Batch i is the same whether an epoch runs from its start or resumes at i.

    Evaluation (``generator=None``): the images in their order, rank r taking examples
    r, r + world_size, ... with none left out.
    """

    def __init__(self, images, labels, batch_size: int, generator: torch.Generator | None = None, *,
                 max_shift: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if generator is None:
            if max_shift:
                raise ValueError("shifts are drawn from a generator: pass one with max_shift")
            self.order = torch.arange(rank, images.shape[0], world_size, device=images.device)
        else:
            n = images.shape[0] // world_size * world_size
            order = torch.randperm(images.shape[0], generator=generator)
            self.order = order[:n][rank::world_size].to(images.device)
        self.images, self.labels = images, labels
        self.batch_size, self.max_shift = batch_size, max_shift
        # Each batch's shifts come from a seed drawn now, so that batch i does not depend on the
        # batches before it.
        self.shift_seeds = ([] if generator is None else
                            torch.randint(0, 2**62, (len(self),), generator=generator).tolist())

    @staticmethod
    def per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
        """Batches per epoch on each rank: its equal share of ``n_images``, ``batch_size`` at a time."""
        return -(-(n_images // world_size) // batch_size)

    def __len__(self) -> int:
        return self.per_epoch(self.order.numel(), self.batch_size)

    def __iter__(self):
        return (self.batch(i) for i in range(len(self)))

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i``: normalised float images ``(B, 1, 28, 28)`` and their labels ``(B,)``."""
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.images[idx]
        if self.max_shift:
            images = random_shift(images, self.max_shift,
                                  torch.Generator().manual_seed(self.shift_seeds[i]))
        return normalize(images), self.labels[idx]
