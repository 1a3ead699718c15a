"""The pieces of a training run that train.py wires together: optimizers, schedules, the epoch loop,
evaluation, progress bars. Device-agnostic; distributed-aware through ``torch.distributed`` when a
process group is initialised."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

OPTIMIZERS = ("sgd", "momentum", "adam", "adadelta")
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.05, "adam": 5e-3, "adadelta": 1.0}
SCHEDULES = ("onecycle", "step", "none")


def parse_device(text: str) -> torch.device:
    """A ``--device`` argument as a torch.device, or a ValueError that says what is wrong with it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"{text!r}: only cpu and cuda devices are supported")
    return device


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``sgd`` is the design notes' gradient descent, θ ← θ − η ∂L/∂θ; the others are torch's."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


@dataclass
class Schedule:
    """A learning-rate scheduler and whether it steps after every batch or after every epoch."""

    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    per_batch: bool

    def step_batch(self):
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def step_epoch(self):
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()

    def state_dict(self):
        return None if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state):
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def make_schedule(name: str, optimizer, *, lr: float, epochs: int, steps_per_epoch: int,
                  step_size: int = 1, gamma: float = 0.7) -> Schedule:
    """``onecycle``: warm up to ``lr`` then anneal to ~0 over the run (per batch); ``step``: multiply
    by ``gamma`` every ``step_size`` epochs (pytorch/examples' mnist); ``none``: constant."""
    if name == "onecycle":
        return Schedule(torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch), per_batch=True)
    if name == "step":
        return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma), per_batch=False)
    if name == "none":
        return Schedule(None, per_batch=False)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class Totals:
    """Sums over examples, kept on the device so that the loop never waits for the GPU."""

    loss: torch.Tensor  # float64 sum of per-example losses
    correct: torch.Tensor  # int64
    count: int = 0

    @classmethod
    def zeros(cls, device) -> "Totals":
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    def add(self, logits: torch.Tensor, mean_loss: torch.Tensor, labels: torch.Tensor):
        n = labels.numel()
        self.loss += mean_loss.detach().double() * n
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.count += n

    def all_reduced(self) -> "Totals":
        """Summed over all ranks (a copy; itself when not distributed)."""
        if not distributed():
            return self
        packed = torch.stack([self.loss, self.correct.double(),
                              torch.tensor(float(self.count), dtype=torch.float64, device=self.loss.device)])
        dist.all_reduce(packed)
        return Totals(packed[0], packed[1].long(), int(packed[2].item()))

    @property
    def mean_loss(self) -> float:
        return self.loss.item() / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct.item() / max(self.count, 1)

    def state_dict(self):
        return {"loss": self.loss.item(), "correct": self.correct.item(), "count": self.count}

    @classmethod
    def from_state_dict(cls, state, device) -> "Totals":
        return cls(torch.tensor(state["loss"], dtype=torch.float64, device=device),
                   torch.tensor(state["correct"], dtype=torch.int64, device=device), state["count"])


class Progress:
    """A tqdm bar over an epoch's batches showing loss, accuracy and images/s; silent when off."""

    def __init__(self, total: int, start: int, desc: str, enabled: bool, refresh_every: int = 20):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="batch", leave=False,
                            dynamic_ncols=True, file=sys.stderr)
        self.refresh_every, self.steps = refresh_every, 0
        self.t0, self.images = time.perf_counter(), 0

    def update(self, totals: Totals, batch_images: int):
        self.steps += 1
        self.images += batch_images
        if self.bar is None:
            return
        self.bar.update(1)
        if self.steps % self.refresh_every == 0:  # .item() waits for the device: not every step
            rate = self.images / (time.perf_counter() - self.t0)
            self.bar.set_postfix(loss=f"{totals.mean_loss:.4f}", acc=f"{totals.accuracy:.4f}",
                                 img_s=f"{rate:,.0f}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train_epoch(model, loss_fn, optimizer, schedule: Schedule, batches, *, start: int = 0,
                totals: Totals | None = None, stop=lambda step: False, progress: Progress | None = None):
    """Train on ``batches`` from batch ``start``; returns (totals, next batch). Stops early, after a
    complete optimizer step, when ``stop(step)`` is true."""
    model.train()
    device = next(model.parameters()).device
    totals = Totals.zeros(device) if totals is None else totals
    for i in range(start, len(batches)):
        images, labels = batches.batch(i)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        schedule.step_batch()
        totals.add(logits, loss, labels)
        if progress is not None:
            progress.update(totals, labels.numel())
        if stop(i + 1):
            return totals, i + 1
    return totals, len(batches)


@torch.no_grad()
def evaluate(model, loss_fn, images, labels, batch_size: int = 1000, *, normalize) -> Totals:
    """Loss and accuracy on ``images``/``labels``. When distributed, each rank takes every
    world_size-th example and the totals are summed over ranks."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    idx = torch.arange(rank, images.shape[0], world, device=images.device)
    totals = Totals.zeros(images.device)
    for chunk in idx.split(batch_size):
        labels_chunk = labels[chunk]
        logits = model(normalize(images[chunk]))
        totals.add(logits, loss_fn(logits, labels_chunk), labels_chunk)
    return totals.all_reduced()


@torch.no_grad()
def predict(model, images, batch_size: int = 1000, *, normalize) -> torch.Tensor:
    """Predicted labels of all ``images``, in this process alone (pass the unwrapped model)."""
    model.eval()
    return torch.cat([model(normalize(x)).argmax(1) for x in images.split(batch_size)])


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """``m[true, predicted]`` counts."""
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).view(classes, classes)

