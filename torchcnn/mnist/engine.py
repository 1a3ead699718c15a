"""The pieces of a training run that train.py wires together: the device and the process group,
optimizers, schedules, the training epoch, evaluation, progress bars and stop requests.
Device-agnostic; distributed-aware through ``torch.distributed`` when a process group is up."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cli import DEVICE_PATTERN, OPTIMIZERS, SCHEDULES


def parse_device(text: str) -> torch.device:
    """A ``--device`` argument (``auto``: cuda if available, else cpu) as a torch.device, or a
    ValueError that says what is wrong with it."""
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise ValueError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def from_rank0(value):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself in one process.
    A collective when distributed: every rank calls it at the same point."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(problem: str | None) -> str | None:
    """The problem of the first rank that has one (None if none has), on every rank: for an error
    that one rank may meet alone (a file it cannot read), so that every rank ends with it. A
    collective when distributed: every rank calls it at the same point."""
    if not distributed():
        return problem
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


@contextlib.contextmanager
def process_group(device: torch.device):
    """Yields (rank, world_size, device). Under torchrun (WORLD_SIZE > 1) it joins the process
    group, gloo on CPU and nccl on CUDA with one GPU per rank (cuda:LOCAL_RANK), and tears it down
    on the way out. A single process yields (0, 1, device).

    Every rank leaves the same way: when the block returns, or exits (SystemExit) with an error
    that every rank has reached alike (decided from what every rank holds alike, from rank 0's
    word, or through :func:`agree`), the ranks meet at a barrier and each then destroys the group,
    before the interpreter shuts down. Any other exception is one rank's own: it skips the
    barrier, which the other ranks would never reach, and torchrun stops them.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, 1, device
        return
    # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, evaluated
    # when the module is first imported, as DistributedDataParallel's constructor imports it.
    # Imported once the group is up, they would hold it for the life of the interpreter:
    # destroy_process_group would leave gloo's threads running, to be torn down during interpreter
    # exit, where that teardown can abort the process. Imported first, they hold None.
    import torch.distributed.nn  # noqa: F401

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    agreed = False
    try:
        yield dist.get_rank(), dist.get_world_size(), device
        agreed = True
    except SystemExit:
        agreed = True
        raise
    finally:
        if agreed:
            try:
                dist.barrier()
            except Exception as e:  # a rank that is gone: say so, and leave with the run's own exit
                print(f"rank {dist.get_rank()}: the other ranks did not meet at the end ({e})", file=sys.stderr)
        dist.destroy_process_group()


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what ``kill`` sends, and schedulers such as SLURM before they
    preempt a job) ask the run to stop after the current step, so that it can save and exit with
    128 + the signal's number (130, 143). A second signal of the same kind acts at once, as it
    would without this. Under torchrun every rank is signalled; the ranks agree through
    ``agreed()``, which every rank calls at the same points."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, every: int = 10):
        self.signum: int | None = None
        self.every = every
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    @property
    def requested(self) -> bool:
        """Whether this process has been asked to stop."""
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

    def agreed(self) -> bool:
        """Whether any rank has been asked to stop; a collective when distributed."""
        if not distributed():
            return self.requested
        flag = torch.tensor([float(self.signum or 0)])
        if dist.get_backend() != "gloo":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and flag.item():
            self.signum = int(flag.item())
        return self.signum is not None

    def __call__(self, step: int) -> bool:
        """The check train_epoch makes after each step: every ``every`` steps when distributed."""
        if not distributed():
            return self.requested
        return step % self.every == 0 and self.agreed()


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
    """``sgd`` is the design notes' gradient descent, θ ← θ − η ∂L/∂θ; the others are torch's
    (``betas``: Adam's, torch's own when None)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **({} if betas is None else {"betas": betas}))
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
                  step_size: int = 1, gamma: float = 0.7, cycle_momentum: bool = True) -> Schedule:
    """``onecycle``: warm up to ``lr`` then anneal to ~0 over the run (per batch), and, with
    ``cycle_momentum``, an optimizer's momentum (Adam's β₁, momentum SGD's) down from 0.95 to 0.85
    and back, as torch's OneCycleLR does by default (without it, the optimizer's own stays; plain
    SGD and Adadelta have none to cycle); ``step``: multiply by ``gamma`` every ``step_size``
    epochs (pytorch/examples' mnist); ``none``: constant."""
    if name == "onecycle":
        # OneCycleLR would give plain SGD (momentum 0) a momentum of 0.95, and refuses Adadelta.
        has_momentum = "betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0
        return Schedule(torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
            cycle_momentum=cycle_momentum and has_momentum), per_batch=True)
    if name == "step":
        return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma), per_batch=False)
    if name == "none":
        return Schedule(None, per_batch=False)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


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

    def state_dict(self) -> dict:
        return {"loss": self.loss.item(), "correct": self.correct.item(), "count": self.count}

    @classmethod
    def from_state_dict(cls, state: dict, device) -> "Totals":
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


def eager_step(model, loss_fn, optimizer):
    """``step(images, labels) -> (logits, loss)``: one optimizer step on the batch, kernel by kernel
    (cuda_graph.GraphedTrainStep replays the same step from a CUDA graph)."""
    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        return logits, loss
    return step


def train_epoch(model, loss_fn, optimizer, schedule: Schedule, batches, *, start: int = 0,
                totals: Totals | None = None, stop=lambda step: False, progress: Progress | None = None,
                step=None):
    """Train on ``batches`` from batch ``start``; returns (totals, next batch). Stops early, after a
    complete optimizer step, when ``stop(step)`` is true. ``step`` takes each optimizer step
    (default: ``eager_step``)."""
    model.train()
    device = next(model.parameters()).device
    totals = Totals.zeros(device) if totals is None else totals
    step = eager_step(model, loss_fn, optimizer) if step is None else step
    for i in range(start, len(batches)):
        images, labels = batches.batch(i)
        logits, loss = step(images, labels)
        schedule.step_batch()
        totals.add(logits, loss, labels)
        if progress is not None:
            progress.update(totals, labels.numel())
        if stop(i + 1):
            return totals, i + 1
    return totals, len(batches)


@torch.no_grad()
def evaluate(model, loss_fn, batches) -> Totals:
    """Loss and accuracy over ``batches`` (``data.Batches`` in order); when distributed, each rank
    evaluates its own batches and the totals are summed over ranks."""
    model.eval()
    totals = Totals.zeros(batches.images.device)
    for images, labels in batches:
        logits = model(images)
        totals.add(logits, loss_fn(logits, labels), labels)
    return totals.all_reduced()


@torch.no_grad()
def predict(model, batches) -> torch.Tensor:
    """The predicted label of every example in ``batches``, in this process alone."""
    model.eval()
    return torch.cat([model(images).argmax(1) for images, _ in batches])


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """``m[true, predicted]`` counts."""
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).view(classes, classes)
