"""What a training checkpoint holds, defined once (``TrainingState``); files that survive a kill at
any moment (written to a temporary file beside the target, flushed, then renamed over it); the
files that make a run (``RUN_FILES``); and loading, with a clear error for anything that is not a
checkpoint and with checkpoints of format 1 (written before the application moved into
torchcnn.mnist) upgraded as they are read."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from .engine import Schedule, Totals
from .model import BACKENDS, MnistNet

FORMAT = "torchcnn-mnist-checkpoint"
FORMAT_VERSION = 2  # 2: the backend and the recipe are fields of their own (1 kept all arguments)

# Version 1 kept every command-line argument under "args"; these defined the run, with --lr None
# meaning the optimizer's default of that release.
_V1_RECIPE = ("epochs", "batch_size", "optimizer", "lr", "schedule", "step_size", "gamma",
              "weight_decay", "dropout", "shift", "seed", "limit_train", "limit_test")
_V1_DEFAULT_LR = {"sgd": 0.05, "momentum": 0.05, "adam": 5e-3, "adadelta": 1.0}
_V1_TRAIN_IMAGES = 60000  # MNIST's training set, which --limit-train None meant


class CheckpointError(ValueError):
    """The file is not a usable checkpoint (missing, truncated, foreign, or another architecture)."""


@dataclass
class TrainingState:
    """Everything a run needs to go on exactly where it stopped: what a checkpoint holds.

    ``state_dict()`` gathers it, ``load_state_dict()`` restores it, the live objects (model,
    optimizer, schedule, data generator, torch's RNG) in place, as torch's own objects do.
    A checkpoint written in the middle of an epoch holds the data generator as it was when the
    epoch began (``begin_epoch()``), so that the epoch's order and shifts are drawn again alike.
    """

    model: MnistNet  # the model itself, not its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    data_rng: torch.Generator  # each epoch's order and shifts
    recipe: dict  # the arguments that define the run: epochs, batch_size, optimizer, lr, ...
    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished in the current epoch
    totals: Totals | None = None  # the current epoch's running sums
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    train_seconds: float = 0.0
    epoch_train_seconds: float = 0.0  # the current epoch's training time so far, across stops
    best_accuracy: float = -1.0
    epoch_rng: torch.Tensor | None = None  # data_rng's state when the current epoch began

    def begin_epoch(self) -> None:
        self.epoch_rng = self.data_rng.get_state()

    def end_epoch(self, row: dict) -> None:
        self.history.append(row)
        self.epoch, self.step, self.totals, self.epoch_train_seconds = self.epoch + 1, 0, None, 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_dict(self) -> dict:
        mid_epoch = self.step > 0
        return {
            "backend": self.model.backend, "model_config": self.model.config,
            "model": self.model.state_dict(), "optimizer": portable_optimizer_state(self.optimizer),
            "scheduler": plain_numbers(self.schedule.state_dict()), "recipe": dict(self.recipe),
            "epoch": self.epoch, "step": self.step,
            "totals": self.totals.state_dict() if mid_epoch and self.totals is not None else None,
            "data_rng": self.epoch_rng if mid_epoch else self.data_rng.get_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "history": self.history, "train_seconds": self.train_seconds,
            "epoch_train_seconds": self.epoch_train_seconds if mid_epoch else 0.0,
            "best_accuracy": self.best_accuracy,
            "torch": str(torch.__version__), "torchcnn": __version__,
        }

    def load_state_dict(self, state: dict, path="checkpoint") -> None:
        require_training_state(state, path)
        load_model_state(self.model, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.recipe = dict(state["recipe"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.totals = Totals.from_state_dict(state["totals"], self.device) if state.get("totals") else None
        self.data_rng.set_state(state["data_rng"])
        self.epoch_rng = state["data_rng"]
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = list(state["history"])
        self.train_seconds = state.get("train_seconds", 0.0)
        self.epoch_train_seconds = state.get("epoch_train_seconds", 0.0) if self.step else 0.0
        self.best_accuracy = state.get("best_accuracy", -1.0)


def plain_numbers(value):
    """``value`` with every one-element tensor in it (in lists, tuples and dicts) as a Python number."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(plain_numbers(v) for v in value)
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    return value


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as an optimizer built with plain arguments loads it on any device:
    hyperparameters that live in device tensors (``train.py --cuda-graphs``: cuda_graph.py) as Python
    numbers, ``capturable`` off, step counts on the CPU."""
    saved = optimizer.state_dict()
    groups = []
    for group in saved["param_groups"]:
        group = {name: plain_numbers(value) if name != "params" else value for name, value in group.items()}
        if group.get("capturable"):
            group["capturable"] = False
        groups.append(group)
    state = {key: {name: value.cpu() if name == "step" and torch.is_tensor(value) else value
                   for name, value in entry.items()}
             for key, entry in saved["state"].items()}
    return {"state": state, "param_groups": groups}


def require_training_state(checkpoint: dict, path="checkpoint") -> None:
    """A CheckpointError unless ``checkpoint`` holds what resuming needs, not only weights."""
    missing = [k for k in ("recipe", "optimizer", "scheduler", "epoch", "step", "data_rng", "rng", "history")
               if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} holds weights but no training state ({', '.join(missing)} "
                              "missing): it can be evaluated, not resumed")


def _replace_atomically(path, write) -> None:
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


def unwritable(folder) -> str | None:
    """Why files could not be written in ``folder`` (made when the first one is), or None."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create the output folder ({existing} is not a folder)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return ("the output folder is not writable" if existing == folder
                else f"cannot create the output folder ({existing} is not writable)")
    return None


RUN_FILES = ("last.pt", "interrupted.pt", "best.pt", "metrics.json")  # a folder with one holds a run


def saved_run(folder) -> list[str]:
    """The files of a run (RUN_FILES) that ``folder`` holds."""
    return [name for name in RUN_FILES if (Path(folder) / name).exists()]


def new_folder(path) -> Path:
    """Make the folder ``path``, or ``path-2``, ``path-3``, ... when it exists: atomically (mkdir
    fails when another process made it first), so that no two runs share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{path} and 9,998 variants of its name exist")


def save(state: dict, path) -> None:
    """``torch.save`` a state dict (``TrainingState.state_dict()``) to ``path`` atomically: the
    previous file stays whole until the new one is."""
    _replace_atomically(path, lambda f: torch.save({"format": FORMAT, "version": FORMAT_VERSION, **state}, f))


def remove_superseded(path, epochs: int) -> None:
    """Remove the interrupted.pt ``path`` once a last.pt of ``epochs`` finished epochs has been
    written beside it and it is behind that (resuming it would rewind the run); an unreadable one
    is left alone."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        behind = load(path)["epoch"] < epochs
    except CheckpointError:
        return
    if behind:
        path.unlink(missing_ok=True)


def write_json(data, path) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _replace_atomically(path, lambda f: f.write(text.encode()))


def _v1_world_size(checkpoint: dict, recipe: dict) -> int | None:
    """The process count of a format-1 run, which did not record it, where the steps per epoch it
    implies (from the one-cycle schedule's length, or from the optimizer's step count) fit one count
    alone; None when they do not."""
    if not {"batch_size", "epochs"} <= recipe.keys():
        return None
    images = min(recipe.get("limit_train") or _V1_TRAIN_IMAGES, _V1_TRAIN_IMAGES)
    scheduler = checkpoint.get("scheduler") or {}
    steps_per_epoch = None
    if "total_steps" in scheduler:  # OneCycleLR: epochs × steps per epoch
        steps_per_epoch = scheduler["total_steps"] / recipe["epochs"]
    elif checkpoint.get("epoch"):  # Adam and Adadelta count the steps taken: epoch × steps per epoch + step
        counts = {int(s["step"]) for s in (checkpoint.get("optimizer") or {}).get("state", {}).values()
                  if "step" in s}
        if len(counts) == 1:
            steps_per_epoch = (counts.pop() - checkpoint.get("step", 0)) / checkpoint["epoch"]
    if steps_per_epoch is None:
        return None
    fits = [w for w in range(1, images + 1) if -(-(images // w) // recipe["batch_size"]) == steps_per_epoch]
    return fits[0] if len(fits) == 1 else None


def _upgrade_from_v1(checkpoint: dict) -> dict:
    args = checkpoint.pop("args", None) or {}
    recipe = {k: args[k] for k in _V1_RECIPE if k in args}
    if recipe.get("lr", 0) is None:
        recipe["lr"] = _V1_DEFAULT_LR[recipe["optimizer"]]
    world_size = _v1_world_size(checkpoint, recipe)
    if world_size is not None:
        recipe["world_size"] = world_size
    return {**checkpoint, "version": 2, "backend": args.get("backend", "torchcnn"), "recipe": recipe}


def load(path, map_location="cpu") -> dict:
    """A checkpoint's contents in the current format (``TrainingState.state_dict()``'s keys), loaded
    with ``weights_only=True``; a clear CheckpointError for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file that is no checkpoint
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (arbitrary bytes make the unpickler fail in arbitrary ways)
        message = str(e).strip()
        if "weights_only" in message or "Weights only" in message:
            # torch's advice (load it with weights_only=False) would run whatever the file holds.
            reason = "it holds Python objects other than tensors and plain values (a pickled model?), " \
                     "which a train.py checkpoint never does"
        else:
            reason = ("it is truncated, corrupt or not a torch.save file ("
                      f"{message.splitlines()[0] if message else type(e).__name__})")
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {reason}") from e
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a torch file but not a torchcnn training checkpoint")
    if checkpoint.get("version") == 1:
        checkpoint = _upgrade_from_v1(checkpoint)
    if checkpoint.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {checkpoint.get('version')}; "
                              f"this torchcnn reads versions 1 and {FORMAT_VERSION}")
    if checkpoint.get("backend") not in BACKENDS or "model" not in checkpoint:
        raise CheckpointError(f"checkpoint {str(path)!r} names no model (backend "
                              f"{checkpoint.get('backend')!r}, weights {'model' in checkpoint})")
    return checkpoint


def load_model_state(model: torch.nn.Module, checkpoint: dict, path="checkpoint") -> None:
    """Load the checkpoint's weights into ``model``, which must have the same architecture."""
    config = getattr(model, "config", None)
    if config is not None and checkpoint.get("model_config") not in (None, config):
        raise CheckpointError(f"{path} holds a model with configuration {checkpoint['model_config']}, "
                              f"not {config}: build the model from the checkpoint (load_model)")
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path} holds weights of another architecture: {e}") from e


def load_model(checkpoint: dict, path="checkpoint", backend: str | None = None, fuse: bool = True) -> MnistNet:
    """The model a checkpoint (as ``load`` returns it) holds, with its weights, on the CPU: from the
    checkpoint's backend, or ``backend`` (their weights are interchangeable), fused or not."""
    model = MnistNet.from_config(backend or checkpoint["backend"], checkpoint.get("model_config") or {}, fuse=fuse)
    load_model_state(model, checkpoint, path)
    return model
