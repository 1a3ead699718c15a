"""Checkpoints and metrics that survive a kill at any moment: write to a temporary file beside the
target, flush it to disk, then rename it over the target (atomic on POSIX and Windows)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT = "torchcnn-mnist-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a usable checkpoint (missing, truncated, foreign, or another architecture)."""


def _replace_atomically(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(obj: dict, path) -> None:
    """``torch.save`` to ``path`` atomically; the previous file stays intact until the new one is whole."""
    _replace_atomically(path, lambda f: torch.save({"format": FORMAT, "version": FORMAT_VERSION, **obj}, f))


def write_json(data, path) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _replace_atomically(path, lambda f: f.write(text.encode()))


def load(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (arbitrary bytes make the unpickler fail in arbitrary ways)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated, corrupt or not a torch.save "
            f"file ({first_line})") from e
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a torch file but not a torchcnn training checkpoint")
    if checkpoint.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {checkpoint.get('version')}, "
                              f"this torchcnn reads version {FORMAT_VERSION}")
    return checkpoint


def load_model_state(model: torch.nn.Module, checkpoint: dict, path="checkpoint") -> None:
    """Load the checkpoint's weights into ``model``, which must have the same architecture."""
    config = getattr(model, "config", None)
    if config is not None and checkpoint.get("model_config") not in (None, config):
        raise CheckpointError(f"{path} holds a model with configuration {checkpoint['model_config']}, "
                              f"not {config}: build the model from the checkpoint's arguments")
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path} holds weights of another architecture: {e}") from e
