"""One run of train.py, stage by stage: ``train.main`` calls these in order.

A :class:`Run` holds what the stages hand one another (the device and the ranks, the checkpoint
read, the data, the model, the training state, the output folder). A stage that finds the run
cannot go on raises :class:`RunError`, which :func:`start` turns into one ``train.py: error:``
line and exit code 2. Under torchrun every rank reaches it alike (what one rank alone may meet,
an unreadable file, is shared first through ``engine.agree``), so every rank leaves the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import __version__, load
from . import checkpoint, data, engine, plots
from .cli import DEFAULT_LR, RECIPE, RECIPES, resume_args
from .cuda_graph import GraphedTrainStep
from .model import MnistNet, loss_function


class RunError(Exception):
    """What ends the run with its message as one ``train.py: error:`` line, and exit code 2."""


@contextlib.contextmanager
def start(args, given: set[str], argv):
    """A :class:`Run` of the parsed arguments, inside which Ctrl-C and SIGTERM ask the loop to
    stop and save. A :class:`RunError` ends the run with :func:`fail`, at once: under torchrun each
    rank says why before the ranks meet to leave. The process group is torn down, and a folder made
    for this run removed if it is still empty, however the block is left."""
    try:
        device = engine.parse_device(args.device)
    except ValueError as e:
        fail(f"argument --device: {e}")
    if args.cuda_graphs and device.type != "cuda":
        fail(f"argument --cuda-graphs: needs a CUDA device, and this run is on {device}")
    with engine.StopRequest() as stop, engine.process_group(device) as (rank, world_size, device), \
            contextlib.ExitStack() as on_exit:
        try:
            yield Run(args, given, argv, device, rank, world_size, stop, on_exit)
        except RunError as e:
            fail(str(e))


def fail(message: str, code: int = 2):
    """Exit with ``code`` after one ``train.py: error:`` line. One write, newline included: under
    torchrun the ranks share stderr, and print's separate write of the newline lets another rank's
    line in between (unbuffered, as with PYTHONUNBUFFERED)."""
    sys.stderr.write(f"train.py: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


class Run:
    def __init__(self, args, given, argv, device, rank, world_size, stop, on_exit):
        self.args, self.given, self.argv = args, given, argv
        self.device, self.rank, self.world_size = device, rank, world_size
        self.stop, self._on_exit = stop, on_exit
        self.is_main = rank == 0
        self.saved, self.notes = None, []  # the checkpoint read (--resume, --eval), and what to say of it

    def say(self, *values, **kwargs):
        """print, on rank 0 only."""
        if self.is_main:
            print(*values, **kwargs)

    def read_checkpoint(self):
        """The checkpoint to resume or to evaluate, which every rank reads itself; what one rank
        cannot read ends every rank. A resumed run takes the checkpoint's recipe."""
        args = self.args
        if args.resume or args.eval:
            problem = None
            try:
                self.saved = checkpoint.load(args.resume or args.eval)
                if args.resume:
                    checkpoint.require_training_state(self.saved, args.resume)
            except checkpoint.CheckpointError as e:
                problem = str(e)
            if problem := engine.agree(problem):
                raise RunError(problem)
        if args.resume:
            trained_by = self.saved["recipe"].get("world_size")
            if trained_by is None:
                self.say(f"{args.resume} does not record how many processes trained it (format 1); assuming "
                         f"{self.world_size}, as in this run")
            elif trained_by != self.world_size:
                raise RunError(f"{args.resume} was trained by {trained_by} process{'es' if trained_by > 1 else ''}; "
                               f"resume it with as many (torchrun --nproc_per_node={trained_by})")
            try:
                self.notes = resume_args(args, self.given, self.saved)
            except ValueError as e:
                raise RunError(str(e)) from None
        if args.eval and "backend" not in self.given:
            args.backend = self.saved["backend"]
        self.lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]

    def read_data(self):
        """MNIST, read and checked before the first op, then held on the device. Rank 0 reads first,
        so that it alone downloads what is missing; then the others."""
        args = self.args

        def read():
            try:
                return data.load(args.data_dir, download=not args.no_download), None
            except (data.MNISTNotFoundError, data.MNISTCorruptError) as e:
                return None, str(e)

        mnist, problem = read() if self.is_main else (None, None)
        if not (problem := engine.agree(problem)) and not self.is_main:
            mnist, problem = read()
        if problem := engine.agree(problem):
            raise RunError(problem)
        self.mnist = mnist.limit(args.limit_train, args.limit_test).to(self.device)
        if not args.eval and self.mnist.train_images.shape[0] < self.world_size:
            raise RunError(f"argument --limit-train: {self.mnist.train_images.shape[0]} training images cannot be "
                           f"shared among {self.world_size} processes (each needs one at least)")
        self.test_batches = data.Batches(self.mnist.test_images, self.mnist.test_labels, args.test_batch_size,
                                         rank=self.rank, world_size=self.world_size)

    def build_model(self):
        """The model (new, or the checkpoint's) and its loss. The same seed gives the same weights on
        either backend."""
        args = self.args
        torch.manual_seed(args.seed)
        try:
            fuse = not args.no_fuse
            self.net = (checkpoint.load_model(self.saved, args.resume or args.eval, backend=args.backend, fuse=fuse)
                        if self.saved else
                        MnistNet(args.backend, **RECIPES[args.recipe].model, dropout=args.dropout, fuse=fuse))
        except checkpoint.CheckpointError as e:
            raise RunError(str(e)) from None
        self.net.to(self.device)
        # Training minimises the recipe's loss (labels smoothed or not); the test loss reported is
        # always the plain cross-entropy, comparable across recipes.
        self.loss_fn = loss_function(args.backend, label_smoothing=args.label_smoothing)
        self.test_loss_fn = loss_function(args.backend)

    def load_kernels(self):
        """torchcnn's compiled kernels, loaded (built, the first time in a source checkout) now,
        so that no epoch's or evaluation's clock counts the build."""
        if self.args.backend == "torchcnn":
            load()

    def evaluate_checkpoint(self) -> int:
        """--eval: the checkpoint's accuracy and loss on the test set."""
        self.load_kernels()
        started = time.perf_counter()
        test = engine.evaluate(self.net, self.test_loss_fn, self.test_batches)
        self.say(f"{self.args.eval}: test accuracy {100 * test.accuracy:.2f}% ({test.correct.item()}/{test.count}), "
                 f"test loss {test.mean_loss:.4f}, {time.perf_counter() - started:.1f} s")
        return 0

    def prepare_training(self):
        """The optimizer, the schedule and the training state a checkpoint holds (loaded from the
        one resumed), then the step: kernel by kernel, or (--cuda-graphs) captured once and replayed,
        set up last, since a graph holds on to the tensors it was captured with."""
        args, net = self.args, self.net
        self.model = DistributedDataParallel(net) if self.world_size > 1 else net
        self.optimizer = engine.make_optimizer(args.optimizer, self.model.parameters(), self.lr, args.weight_decay,
                                              args.betas)
        steps_per_epoch = data.Batches.per_epoch(self.mnist.train_images.shape[0], args.batch_size, self.world_size)
        self.schedule = engine.make_schedule(args.schedule, self.optimizer, lr=self.lr, epochs=args.epochs,
                                             steps_per_epoch=steps_per_epoch, step_size=args.step_size,
                                             gamma=args.gamma, cycle_momentum=args.betas is None)
        recipe = {**{name: getattr(args, name) for name in RECIPE}, "lr": self.lr, "world_size": self.world_size}
        # The data generator draws each epoch's order and shifts, the same on every rank.
        self.state = checkpoint.TrainingState(net, self.optimizer, self.schedule,
                                              torch.Generator().manual_seed(args.seed), recipe)
        torch.manual_seed(args.seed + self.rank)  # dropout: different on every rank
        if self.saved is not None:
            try:
                self.state.load_state_dict(self.saved, args.resume)
            except checkpoint.CheckpointError as e:
                raise RunError(str(e)) from None
            self.state.recipe.update(epochs=args.epochs, world_size=self.world_size)  # --epochs may have changed
            self.say(f"resuming {args.resume}: epoch {self.state.epoch + 1}, step {self.state.step}")
            for note in self.notes:
                self.say(note)
        self.step = None
        if args.cuda_graphs:
            if self.world_size > 1:
                raise RunError("argument --cuda-graphs: not under torchrun (a graph cannot hold the gradient "
                               "all-reduce); run one process")
            try:
                self.step = GraphedTrainStep(net, self.loss_fn, self.optimizer)
            except ValueError as e:  # a resumed run's optimizer
                raise RunError(f"argument --cuda-graphs: {e}") from None

    def choose_output_folder(self):
        """Where the outputs go: rank 0 decides, every rank abides (a folder given is made when the
        first file is written; the default one at once, and removed if nothing is written)."""
        out, problem, made = output_folder(self.args, self.saved) if self.is_main else (None, None, False)
        if made:
            self._on_exit.callback(remove_if_empty, out)
        self.out, problem = engine.from_rank0((out, problem))
        if problem:
            raise RunError(f"--out {self.out}: {problem}")

    def banner(self) -> str:
        """The run's first line: versions, where it runs, the data and the output folder."""
        args, mnist = self.args, self.mnist
        where = str(self.device) if self.world_size == 1 else f"{self.world_size} processes on {self.device.type}"
        where += " (CUDA graphs)" if args.cuda_graphs else ""
        return (f"torchcnn {__version__} | torch {torch.__version__} | {where} | backend {args.backend} | "
                f"data {mnist.source} | {mnist.train_images.shape[0]} train / {mnist.test_images.shape[0]} test "
                f"images | output {self.out}")

    def start_clock(self):
        """Where this session's training starts: its step and time (the summary's "in all")."""
        self.started_at = (self.state.epoch, self.state.step)
        self.session_start, self.session_train = time.perf_counter(), 0.0
        self.resume_from = None

    def train_epoch(self) -> bool:
        """Train the current epoch (from its saved step, when resumed there); False when a stop
        request ended it early, in which case interrupted.pt now holds the run."""
        args, state = self.args, self.state
        state.begin_epoch()
        batches = data.Batches(self.mnist.train_images, self.mnist.train_labels, args.batch_size, state.data_rng,
                               max_shift=args.shift, rank=self.rank, world_size=self.world_size)
        progress = engine.Progress(len(batches), state.step, f"epoch {state.epoch + 1}/{args.epochs}",
                                   self.is_main and not args.quiet and sys.stderr.isatty())
        self.epoch_started = time.perf_counter()
        state.totals, state.step = engine.train_epoch(self.model, self.loss_fn, self.optimizer, self.schedule,
                                                      batches, start=state.step, totals=state.totals,
                                                      stop=self.stop, progress=progress, step=self.step)
        progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.epoch_train = time.perf_counter() - self.epoch_started
        state.train_seconds += self.epoch_train
        state.epoch_train_seconds += self.epoch_train  # kept across a stop in the middle of the epoch
        self.session_train += self.epoch_train
        if state.step < len(batches):
            self.resume_from = self.out / "interrupted.pt"
            if self.is_main:
                checkpoint.save(state.state_dict(), self.resume_from)
            self.say(f"\n{self.stop.name} in epoch {state.epoch + 1} at step {state.step}/{len(batches)}: "
                     f"saved {self.resume_from}")
            return False
        return True

    def evaluate_epoch(self):
        """After a whole epoch: test accuracy, the epoch's line, last.pt (and best.pt when it is the
        best so far), metrics.json."""
        state = self.state
        epoch_lr = float(self.optimizer.param_groups[0]["lr"])  # the epoch's (under onecycle: after its last step)
        self.schedule.step_epoch()
        train = state.totals.all_reduced()
        test = engine.evaluate(self.net, self.test_loss_fn, self.test_batches)
        epoch_train_seconds = state.epoch_train_seconds
        seconds = epoch_train_seconds + time.perf_counter() - self.epoch_started - self.epoch_train
        state.end_epoch({"epoch": state.epoch + 1, "train_loss": train.mean_loss, "train_accuracy": train.accuracy,
                         "test_loss": test.mean_loss, "test_accuracy": test.accuracy, "seconds": seconds,
                         "train_seconds": epoch_train_seconds, "train_images": train.count, "lr": epoch_lr})
        self.say(f"epoch {state.epoch:>2}/{self.args.epochs}  train loss {train.mean_loss:.4f} "
                 f"acc {100 * train.accuracy:.2f}%  test loss {test.mean_loss:.4f} acc {100 * test.accuracy:.2f}%  "
                 f"{seconds:.1f} s  (training {train.count / epoch_train_seconds:,.0f} img/s)", flush=True)
        self.resume_from, improved = self.out / "last.pt", test.accuracy > state.best_accuracy
        state.best_accuracy = max(state.best_accuracy, test.accuracy)
        if self.is_main:
            checkpoint.save(state.state_dict(), self.out / "last.pt")
            if improved:
                checkpoint.save(state.state_dict(), self.out / "best.pt")
            self.write_metrics(stopped=False)
            checkpoint.remove_superseded(self.out / "interrupted.pt", state.epoch)

    def write_metrics(self, stopped: bool):
        """metrics.json: the last epoch's test figures, the history, the times and the arguments."""
        args, state, stop = self.args, self.state, self.stop
        last = state.history[-1]
        checkpoint.write_json({
            "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
            "epochs": args.epochs, "stopped": {"signal": stop.name, "epoch": state.epoch + 1,
                                               "step": state.step} if stopped else None,
            "history": state.history, "train_seconds": state.train_seconds,
            "images_per_second": sum(r["train_images"] for r in state.history) / max(state.train_seconds, 1e-9),
            "device": str(self.device), "device_name": engine.device_name(self.device), "backend": args.backend,
            "world_size": self.world_size, "seed": args.seed, "torch": str(torch.__version__),
            "torchcnn": __version__, "args": vars(args),
            "argv": ["train.py", *(sys.argv[1:] if self.argv is None else map(str, self.argv))],
        }, self.out / "metrics.json")

    @property
    def stopped(self) -> bool:
        return self.state.epoch < self.args.epochs

    @property
    def progressed(self) -> bool:
        """Whether this session took a step."""
        return (self.state.epoch, self.state.step) != self.started_at

    def write_outputs(self) -> list[str]:
        """The outputs of the finished epochs (rank 0): metrics.json and, unless --no-plots, the
        pictures; the names of those written."""
        args, state, out = self.args, self.state, self.out
        written = []
        if not (self.is_main and state.history and (self.progressed or not self.stopped)):
            return written
        self.write_metrics(self.stopped)
        written.append("metrics.json")
        if args.no_plots:
            return written
        plots.curves(state.history, out / "curves.png")
        written.append("curves.png")
        whole = not state.step  # stopped mid-epoch: draw the model of the last whole epoch, if here
        if not whole and (out / "last.pt").is_file():
            finished = checkpoint.load(out / "last.pt")
            if finished["epoch"] == state.epoch:
                checkpoint.load_model_state(self.net, finished)
                whole = True
        if whole:
            mnist = self.mnist
            predictions = engine.predict(self.net, data.Batches(mnist.test_images, mnist.test_labels,
                                                                args.test_batch_size))
            plots.confusion(engine.confusion_matrix(mnist.test_labels, predictions), out / "confusion.png")
            plots.filters(self.net.features[0].weight, out / "filters.png")
            plots.mistakes(mnist.test_images, mnist.test_labels, predictions, out / "mistakes.png")
            written += ["confusion.png", "filters.png", "mistakes.png"]
        return written

    def summary(self, written: list[str]) -> int:
        """The run's last lines: the test figures and times, or, after a stop, what holds the run
        and how to continue it. The exit code: 0, or 128 + the stop's signal."""
        args, state, say = self.args, self.state, self.say
        if self.stopped:
            if not self.progressed:
                say(f"{self.stop.name} before the first step: nothing saved" +
                    (f"; {args.resume} is as it was" if args.resume else ""))
            else:
                if not state.step:
                    say(f"{self.stop.name} after epoch {state.epoch}: {self.resume_from} holds it")
                if written:
                    say(f"{names(written)} of epochs 1-{state.epoch} {'is' if len(written) == 1 else 'are'} "
                        f"in {self.out}")
                say(f"continue with: python train.py --resume {self.resume_from}")
            return self.stop.exit_code
        last, session = state.history[-1], time.perf_counter() - self.session_start
        times = (f"train time {state.train_seconds:.1f} s ({session:.1f} s in all)" if not args.resume else
                 f"train time {state.train_seconds:.1f} s, {self.session_train:.1f} s of it in this session "
                 f"({session:.1f} s in all)")
        say(f"test accuracy {100 * last['test_accuracy']:.2f}%  test loss {last['test_loss']:.4f}  {times}  "
            f"outputs in {self.out}")
        return 0


def output_folder(args, saved: dict | None) -> tuple[Path, str | None, bool]:
    """Where the run's outputs go, why they cannot go there (None when they can), and whether the
    folder was made for this run; decided by rank 0 alone.

    No run replaces another's files. A new run's --out must hold no run (checkpoint.RUN_FILES); the
    default, runs/<date>_<time>, is made at once, with -2, -3, ... for runs started in the same
    second. A resumed run goes on in its checkpoint's folder, unless --out names another that holds
    no run, and not where a last.pt or interrupted.pt is further along than the checkpoint resumed.
    """
    if not (args.out or args.resume):
        try:
            name = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            return checkpoint.new_folder(Path("runs") / name), None, True
        except OSError as e:
            return Path("runs"), f"cannot create the output folder ({e.strerror or e})", False
    out = Path(args.out or Path(args.resume).parent)
    problem = checkpoint.unwritable(out)
    if problem:
        return out, problem, False
    if not (args.resume and out.resolve() == Path(args.resume).resolve().parent):
        held = checkpoint.saved_run(out)
        if held:
            return out, (f"it holds a run already ({', '.join(held)}), which this one would replace: choose "
                         "another folder" + ("" if args.resume else ", or continue that run with --resume")), False
        return out, None, False

    def progress(c):
        return f"epoch {c['epoch'] + 1} at step {c['step']}" if c["step"] else f"after epoch {c['epoch']}"

    for name in ("last.pt", "interrupted.pt"):
        path = out / name
        if not path.is_file() or path.samefile(args.resume):
            continue
        try:
            there = checkpoint.load(path)
        except checkpoint.CheckpointError as e:
            return out, f"{e}; resume into another folder with --out", False
        if (there["epoch"], there["step"]) > (saved["epoch"], saved["step"]):
            return out, (f"its {name} is further along ({progress(there)}) than {args.resume} ({progress(saved)}), "
                         "and resuming here would replace it: resume into another folder with --out"), False
    return out, None, False


def remove_if_empty(folder: Path) -> None:
    """Remove the folder made for this run if nothing was written to it (a stop before the first
    step, or an error)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def names(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
