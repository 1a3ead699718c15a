"""Train an MNIST digit classifier built from torchcnn's layers.

    python train.py                         # default recipe, GPU if there is one
    python train.py --device cuda --epochs 1
    python train.py --backend torch         # the identical model from torch.nn, for comparison
    python train.py --resume runs/…/last.pt
    python train.py --eval runs/…/best.pt
    torchrun --nproc_per_node=2 train.py --device cpu

The data, the model and the training step live in torchcnn.mnist (data, model, engine, checkpoint,
plots); this script wires them together: arguments, data, model, loop, outputs. The arguments are
checked before torch is imported, the data before torchcnn's first op (which builds its extension).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import math
import re
import sys
import time
from pathlib import Path

# The command line's vocabulary; test_cli checks that the package accepts exactly these names.
BACKENDS = ("torchcnn", "torch")
OPTIMIZERS = ("sgd", "momentum", "adam", "adadelta")
SCHEDULES = ("onecycle", "step", "none")
# The optimizers whose update can be captured in a CUDA graph (torchcnn/mnist/cuda_graph.py).
GRAPHED_OPTIMIZERS = ("adam", "adadelta")
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.05, "adam": 5e-3, "adadelta": 1.0}

# The arguments that define a run. A checkpoint keeps them, and --resume holds the run to them:
# see resume_args for the one that may change (--epochs).
RECIPE = ("recipe", "epochs", "batch_size", "optimizer", "lr", "schedule", "step_size", "gamma", "weight_decay",
          "dropout", "shift", "seed", "limit_train", "limit_test")


def _load_recipes() -> dict:
    """torchcnn/mnist/recipes.py's RECIPES, read by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_torchcnn_mnist_recipes",
                                                  Path(__file__).resolve().parent / "torchcnn" / "mnist" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.RECIPES


# The presets --recipe names: the model's size and defaults for the training arguments.
RECIPES = _load_recipes()
# The arguments --eval uses; any other given with it is refused.
EVAL_ARGS = {"eval", "backend", "device", "data_dir", "no_download", "test_batch_size", "limit_test", "quiet",
             "no_fuse"}


def number(kind, rule: str, ok):
    """An argparse type: ``kind`` (int or float) for which ``ok(value)`` holds; argparse names the
    flag in the error ("argument --gamma: must be in (0, 1], got 0")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


# engine.DEVICE_PATTERN, written here too so that --device is checked before torch is imported
# (test_cli holds the two to be equal); engine.parse_device then checks that the device exists.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def device_arg(text: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    positive_int = number(int, "at least 1", lambda v: v >= 1)
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto, cpu, cuda or cuda:N; under torchrun each rank takes cuda:LOCAL_RANK "
                        "(default: auto, which is cuda if available, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="torchcnn",
                   help="build the model from torchcnn's layers or, identically, from torch.nn's "
                        "(default: torchcnn)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="MNIST folder: torchvision's layout or the four IDX files, gzipped or not "
                        "(default: $TORCHCNN_DATA_DIR, else ./data)")
    p.add_argument("--no-download", action="store_true",
                   help="never try to download MNIST (default: download when it is not found)")
    default, fast = RECIPES["standard"], RECIPES["fast"]
    p.add_argument("--recipe", choices=tuple(RECIPES), default="standard",
                   help="standard: 12 epochs, 99.4–99.5 %%; fast: a narrower model (channels "
                        f"{'/'.join(map(str, fast.model['channels']))}, hidden {fast.model['hidden']}) for one "
                        "epoch, 99 %% in seconds; the flags below take the recipe's values unless given "
                        "(default: standard)")
    p.add_argument("--epochs", type=positive_int, default=default.epochs, metavar="N",
                   help=f"epochs to train (default: {default.epochs}; fast: {fast.epochs})")
    p.add_argument("--batch-size", type=positive_int, default=default.batch_size, metavar="N",
                   help=f"training images per step and process (default: {default.batch_size}; fast: "
                        f"{fast.batch_size})")
    p.add_argument("--test-batch-size", type=positive_int, default=1000, metavar="N",
                   help="test images per evaluation batch (default: 1000)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=default.optimizer,
                   help="sgd is plain gradient descent θ ← θ − η∂L/∂θ; momentum is Nesterov SGD "
                        f"(default: {default.optimizer})")
    p.add_argument("--lr", type=number(float, "positive", lambda v: v > 0),
                   help=f"(peak) learning rate (default: the recipe's — standard {default.lr:g}, fast "
                        f"{fast.lr:g} — or, with another --optimizer, that optimizer's: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--schedule", choices=SCHEDULES, default=default.schedule,
                   help="onecycle: up to --lr and down to ~0 over the run, per batch; step: times "
                        f"--gamma every --step-size epochs; none: constant (default: {default.schedule})")
    p.add_argument("--step-size", type=positive_int, default=1, metavar="N",
                   help="epochs between decays, with --schedule step (default: 1)")
    p.add_argument("--gamma", type=number(float, "in (0, 1]", lambda v: 0 < v <= 1), default=0.7,
                   help="decay factor, with --schedule step (default: 0.7)")
    p.add_argument("--weight-decay", type=number(float, "at least 0", lambda v: v >= 0), default=0.0,
                   help="L2 penalty, as the optimizer applies it (default: 0)")
    p.add_argument("--dropout", type=number(float, "in [0, 1)", lambda v: 0 <= v < 1), default=default.dropout,
                   help=f"dropout probability before each dense layer (default: {default.dropout:g}; fast: "
                        f"{fast.dropout:g})")
    p.add_argument("--shift", type=number(int, "between 0 and 27", lambda v: 0 <= v <= 27), default=default.shift,
                   metavar="N", help="augmentation: shift each training image by up to this many pixels, "
                                     f"0 for none (default: {default.shift}; fast: {fast.shift})")
    p.add_argument("--seed", type=number(int, "between 0 and 2**63 - 1", lambda v: 0 <= v < 2**63),
                   default=1, metavar="N", help="seeds the weights, the data order, shifts and dropout "
                                                 "(default: 1)")
    p.add_argument("--limit-train", type=positive_int, metavar="N",
                   help="use the first N training images (default: all 60,000)")
    p.add_argument("--limit-test", type=positive_int, metavar="N",
                   help="use the first N test images (default: all 10,000)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: a new one under runs/; with --resume, the checkpoint's)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", metavar="CHECKPOINT",
                     help="continue the run saved there; see the README for the flags that may change "
                          "(default: a new run)")
    run.add_argument("--eval", metavar="CHECKPOINT",
                     help="only evaluate that checkpoint on the test set (default: train)")
    p.add_argument("--no-fuse", action="store_true",
                   help="torchcnn backend: run conv, ReLU and pool as separate ops, for comparison "
                        "(default: one fused op each)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the training step in a CUDA graph and replay it for every batch (needs a "
                        f"CUDA device, one process and --optimizer {' or '.join(GRAPHED_OPTIMIZERS)}; default: "
                        "launch kernel by kernel)")
    p.add_argument("--no-plots", action="store_true", help="skip the pictures (default: draw them)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (default: bars when stderr is a terminal)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The arguments, range-checked, and the names of those the command line gave."""
    p = parser()
    args = p.parse_args(argv)

    for action in p._actions:  # parsed again without defaults: what remains was given
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_args(argv)))
    recipe = RECIPES[args.recipe]
    for name, value in recipe.arguments().items():  # the recipe's defaults, where no flag was given
        if name not in given:
            setattr(args, name, value)
    if "lr" not in given and "optimizer" in given and args.optimizer != recipe.optimizer:
        args.lr = None  # the optimizer's own default
    if args.cuda_graphs and args.optimizer not in GRAPHED_OPTIMIZERS and not args.resume:
        p.error(f"argument --cuda-graphs: {args.optimizer}'s update reads its learning rate on the host, so it "
                f"cannot be captured; use --optimizer {' or '.join(GRAPHED_OPTIMIZERS)}")
    if args.eval:
        extra = sorted(given - EVAL_ARGS)
        if extra:
            p.error(f"argument --{extra[0].replace('_', '-')}: not used with --eval, which only "
                    "evaluates the checkpoint on the test set")
    return args, given


def resume_args(args: argparse.Namespace, given: set[str], saved: dict) -> list[str]:
    """Hold ``args`` to the recipe of the checkpoint ``saved``; what the command line may change.

    --epochs may: more extend the run, fewer (but not fewer than are finished) end it sooner,
    except under onecycle, whose learning rate was laid out for the epochs it was given. Any other
    recipe flag must agree with the checkpoint (a ValueError names the first that does not).
    Returns the notes to print about what was honoured.
    """
    recipe = {**saved["recipe"], "backend": saved["backend"]}
    recipe.setdefault("recipe", "standard")  # checkpoints from before --recipe
    for name in ("backend", *RECIPE):
        if name not in recipe or (name == "epochs" and name in given):
            continue
        if name in given and getattr(args, name) != recipe[name]:
            raise ValueError(f"argument --{name.replace('_', '-')}: {getattr(args, name)} contradicts the "
                             f"checkpoint's {recipe[name]}; a resumed run keeps its recipe (start a new run "
                             "to change it)")
        setattr(args, name, recipe[name])
    notes = []
    if "epochs" in recipe and args.epochs != recipe["epochs"]:
        planned, finished = recipe["epochs"], saved["epoch"]
        if recipe.get("schedule") == "onecycle":
            raise ValueError(f"argument --epochs: {args.epochs} contradicts the checkpoint's {planned}: its "
                             f"onecycle learning rate was laid out for {planned} epochs (start a new run)")
        if args.epochs < finished:
            raise ValueError(f"argument --epochs: the checkpoint has finished {finished} epochs already")
        if args.epochs == finished and saved.get("step"):
            raise ValueError(f"argument --epochs: {args.epochs} would drop the {saved['step']} steps of epoch "
                             f"{finished + 1} that the checkpoint holds; give --epochs {finished + 1} or more")
        notes.append(f"--epochs {args.epochs}: the run {'extends to' if args.epochs > planned else 'ends at'} "
                     f"epoch {args.epochs} instead of {planned}")
    return notes


def output_folder(args: argparse.Namespace, saved: dict | None) -> tuple[Path, str | None, bool]:
    """Where the run's outputs go, why they cannot go there (None when they can), and whether the
    folder was made for this run; decided by rank 0 alone.

    No run replaces another's files. A new run's --out must hold no run (checkpoint.RUN_FILES); the
    default, runs/<date>_<time>, is made at once, with -2, -3, ... for runs started in the same
    second. A resumed run goes on in its checkpoint's folder, unless --out names another that holds
    no run, and not where a last.pt or interrupted.pt is further along than the checkpoint resumed.
    """
    from torchcnn.mnist import checkpoint

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


def fail(message: str, code: int = 2):
    # One write, newline included: under torchrun the ranks share stderr, and print's separate
    # write of the newline lets another rank's line in between (unbuffered, as with PYTHONUNBUFFERED).
    sys.stderr.write(f"train.py: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def main(argv=None) -> int:
    args, given = parse_args(argv)

    # torch and the package only now, so that --help and argument errors answer at once.
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import torchcnn
    from torchcnn.mnist import checkpoint, data, engine, plots
    from torchcnn.mnist.cuda_graph import GraphedTrainStep
    from torchcnn.mnist.model import MnistNet, loss_function

    try:
        device = engine.parse_device(args.device)
    except ValueError as e:
        fail(f"argument --device: {e}")
    if args.cuda_graphs and device.type != "cuda":
        fail(f"argument --cuda-graphs: needs a CUDA device, and this run is on {device}")

    # Ctrl-C and SIGTERM from here on ask the loop to stop and save; the process group is torn
    # down, and a folder made for this run removed if it is still empty, however this block is left.
    with engine.StopRequest() as stop, engine.process_group(device) as (rank, world_size, device), \
            contextlib.ExitStack() as on_exit:
        is_main = rank == 0
        say = print if is_main else (lambda *a, **k: None)

        # A checkpoint to resume or to evaluate.
        # Every rank reads the files itself; what one rank cannot read ends every rank (engine.agree).
        saved, problem = None, None
        if args.resume or args.eval:
            try:
                saved = checkpoint.load(args.resume or args.eval)
                if args.resume:
                    checkpoint.require_training_state(saved, args.resume)
            except checkpoint.CheckpointError as e:
                problem = str(e)
            if problem := engine.agree(problem):
                fail(problem)
        if args.resume:
            trained_by = saved["recipe"].get("world_size")
            if trained_by is None:
                say(f"{args.resume} does not record how many processes trained it (format 1); assuming "
                    f"{world_size}, as in this run")
            elif trained_by != world_size:
                fail(f"{args.resume} was trained by {trained_by} process{'es' if trained_by > 1 else ''}; "
                     f"resume it with as many (torchrun --nproc_per_node={trained_by})")
            try:
                notes = resume_args(args, given, saved)
            except ValueError as e:
                fail(str(e))
        if args.eval and "backend" not in given:
            args.backend = saved["backend"]
        lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]

        # Data: read and checked before the first op, then held on the device. Rank 0 reads first, so
        # that it alone downloads what is missing; then the others.
        def read_mnist():
            try:
                return data.load(args.data_dir, download=not args.no_download), None
            except (data.MNISTNotFoundError, data.MNISTCorruptError) as e:
                return None, str(e)

        mnist, problem = read_mnist() if is_main else (None, None)
        if not (problem := engine.agree(problem)) and not is_main:
            mnist, problem = read_mnist()
        if problem := engine.agree(problem):
            fail(problem)
        mnist = mnist.limit(args.limit_train, args.limit_test).to(device)
        if not args.eval and mnist.train_images.shape[0] < world_size:
            fail(f"argument --limit-train: {mnist.train_images.shape[0]} training images cannot be shared "
                 f"among {world_size} processes (each needs one at least)")
        test_batches = data.Batches(mnist.test_images, mnist.test_labels, args.test_batch_size,
                                    rank=rank, world_size=world_size)

        # Model and loss. The same seed gives the same weights on either backend.
        torch.manual_seed(args.seed)
        try:
            fuse = not args.no_fuse
            net = (checkpoint.load_model(saved, args.resume or args.eval, backend=args.backend, fuse=fuse) if saved
                   else MnistNet(args.backend, **RECIPES[args.recipe].model, dropout=args.dropout, fuse=fuse)).to(device)
        except checkpoint.CheckpointError as e:
            fail(str(e))
        loss_fn = loss_function(args.backend)

        if args.eval:
            started = time.perf_counter()
            test = engine.evaluate(net, loss_fn, test_batches)
            say(f"{args.eval}: test accuracy {100 * test.accuracy:.2f}% ({test.correct.item()}/{test.count}), "
                f"test loss {test.mean_loss:.4f}, {time.perf_counter() - started:.1f} s")
            return 0

        # Optimizer, schedule and the training state that a checkpoint holds.
        model = DistributedDataParallel(net) if world_size > 1 else net
        optimizer = engine.make_optimizer(args.optimizer, model.parameters(), lr, args.weight_decay)
        steps_per_epoch = data.Batches.per_epoch(mnist.train_images.shape[0], args.batch_size, world_size)
        schedule = engine.make_schedule(args.schedule, optimizer, lr=lr, epochs=args.epochs,
                                        steps_per_epoch=steps_per_epoch, step_size=args.step_size,
                                        gamma=args.gamma)
        recipe = {**{name: getattr(args, name) for name in RECIPE}, "lr": lr, "world_size": world_size}
        # The data generator draws each epoch's order and shifts, the same on every rank.
        state = checkpoint.TrainingState(net, optimizer, schedule, torch.Generator().manual_seed(args.seed), recipe)
        torch.manual_seed(args.seed + rank)  # dropout: different on every rank
        if saved is not None:
            try:
                state.load_state_dict(saved, args.resume)
            except checkpoint.CheckpointError as e:
                fail(str(e))
            state.recipe.update(epochs=args.epochs, world_size=world_size)  # --epochs may have changed
            say(f"resuming {args.resume}: epoch {state.epoch + 1}, step {state.step}")
            for note in notes:
                say(note)

        # The training step: kernel by kernel, or (--cuda-graphs) captured once and replayed, set up
        # after the state is loaded, since a graph holds on to the tensors it was captured with.
        step = None
        if args.cuda_graphs:
            if world_size > 1:
                fail("argument --cuda-graphs: not under torchrun (a graph cannot hold the gradient all-reduce); "
                     "run one process")
            try:
                step = GraphedTrainStep(net, loss_fn, optimizer)
            except ValueError as e:  # a resumed run's optimizer
                fail(f"argument --cuda-graphs: {e}")

        # Where the outputs go: rank 0 decides, every rank abides (a folder given is made when the
        # first file is written; the default one at once, and removed if nothing is written).
        out, problem, made = output_folder(args, saved) if is_main else (None, None, False)
        if made:
            on_exit.callback(remove_if_empty, out)
        out, problem = engine.from_rank0((out, problem))
        if problem:
            fail(f"--out {out}: {problem}")
        where = str(device) if world_size == 1 else f"{world_size} processes on {device.type}"
        where += " (CUDA graphs)" if args.cuda_graphs else ""
        say(f"torchcnn {torchcnn.__version__} | torch {torch.__version__} | {where} | backend {args.backend} | "
            f"data {mnist.source} | {mnist.train_images.shape[0]} train / {mnist.test_images.shape[0]} test "
            f"images | output {out}", flush=True)
        show_progress = is_main and not args.quiet and sys.stderr.isatty()

        def write_metrics(stopped: bool):
            last = state.history[-1]
            checkpoint.write_json({
                "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
                "epochs": args.epochs, "stopped": {"signal": stop.name, "epoch": state.epoch + 1,
                                                   "step": state.step} if stopped else None,
                "history": state.history, "train_seconds": state.train_seconds,
                "images_per_second": sum(r["train_images"] for r in state.history) / max(state.train_seconds, 1e-9),
                "device": str(device), "device_name": engine.device_name(device), "backend": args.backend,
                "world_size": world_size, "seed": args.seed, "torch": str(torch.__version__),
                "torchcnn": torchcnn.__version__, "args": vars(args),
                "argv": ["train.py", *(sys.argv[1:] if argv is None else map(str, argv))],
            }, out / "metrics.json")

        # The loop: train an epoch, evaluate, save. A stop request ends the epoch after the step
        # in progress and saves interrupted.pt, from which --resume goes on at the next step.
        started_at, session_start, session_train = (state.epoch, state.step), time.perf_counter(), 0.0
        resume_from = None
        while state.epoch < args.epochs and not stop.agreed():
            state.begin_epoch()
            batches = data.Batches(mnist.train_images, mnist.train_labels, args.batch_size, state.data_rng,
                                   max_shift=args.shift, rank=rank, world_size=world_size)
            progress = engine.Progress(len(batches), state.step, f"epoch {state.epoch + 1}/{args.epochs}",
                                       show_progress)
            started = time.perf_counter()
            state.totals, state.step = engine.train_epoch(model, loss_fn, optimizer, schedule, batches,
                                                          start=state.step, totals=state.totals, stop=stop,
                                                          progress=progress, step=step)
            progress.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - started
            state.train_seconds += train_seconds
            state.epoch_train_seconds += train_seconds  # kept across a stop in the middle of the epoch
            session_train += train_seconds
            if state.step < len(batches):
                resume_from = out / "interrupted.pt"
                if is_main:
                    checkpoint.save(state.state_dict(), resume_from)
                say(f"\n{stop.name} in epoch {state.epoch + 1} at step {state.step}/{len(batches)}: "
                    f"saved {resume_from}")
                break
            epoch_lr = float(optimizer.param_groups[0]["lr"])  # the epoch's (under onecycle: after its last step)
            schedule.step_epoch()
            train = state.totals.all_reduced()
            test = engine.evaluate(net, loss_fn, test_batches)
            epoch_train_seconds = state.epoch_train_seconds
            seconds = epoch_train_seconds + time.perf_counter() - started - train_seconds
            state.end_epoch({"epoch": state.epoch + 1, "train_loss": train.mean_loss,
                             "train_accuracy": train.accuracy, "test_loss": test.mean_loss,
                             "test_accuracy": test.accuracy, "seconds": seconds,
                             "train_seconds": epoch_train_seconds, "train_images": train.count, "lr": epoch_lr})
            say(f"epoch {state.epoch:>2}/{args.epochs}  train loss {train.mean_loss:.4f} "
                f"acc {100 * train.accuracy:.2f}%  test loss {test.mean_loss:.4f} acc {100 * test.accuracy:.2f}%  "
                f"{seconds:.1f} s  (training {train.count / epoch_train_seconds:,.0f} img/s)", flush=True)
            resume_from, improved = out / "last.pt", test.accuracy > state.best_accuracy
            state.best_accuracy = max(state.best_accuracy, test.accuracy)
            if is_main:
                checkpoint.save(state.state_dict(), out / "last.pt")
                if improved:
                    checkpoint.save(state.state_dict(), out / "best.pt")
                write_metrics(stopped=False)
                checkpoint.remove_superseded(out / "interrupted.pt", state.epoch)
        stopped, last = state.epoch < args.epochs, state.history[-1] if state.history else None
        progressed = (state.epoch, state.step) != started_at

        # The outputs of the finished epochs: metrics.json, the pictures, the summary.
        written = []
        if is_main and last and (progressed or not stopped):
            write_metrics(stopped)
            written.append("metrics.json")
            if not args.no_plots:
                plots.curves(state.history, out / "curves.png")
                written.append("curves.png")
                whole = not state.step  # stopped mid-epoch: draw the model of the last whole epoch, if here
                if not whole and (out / "last.pt").is_file():
                    finished = checkpoint.load(out / "last.pt")
                    if finished["epoch"] == state.epoch:
                        checkpoint.load_model_state(net, finished)
                        whole = True
                if whole:
                    predictions = engine.predict(net, data.Batches(mnist.test_images, mnist.test_labels,
                                                                   args.test_batch_size))
                    plots.confusion(engine.confusion_matrix(mnist.test_labels, predictions), out / "confusion.png")
                    plots.filters(net.features[0].weight, out / "filters.png")
                    plots.mistakes(mnist.test_images, mnist.test_labels, predictions, out / "mistakes.png")
                    written += ["confusion.png", "filters.png", "mistakes.png"]
        if stopped:
            if not progressed:
                say(f"{stop.name} before the first step: nothing saved" +
                    (f"; {args.resume} is as it was" if args.resume else ""))
            else:
                if not state.step:
                    say(f"{stop.name} after epoch {state.epoch}: {resume_from} holds it")
                if written:
                    say(f"{names(written)} of epochs 1-{state.epoch} {'is' if len(written) == 1 else 'are'} "
                        f"in {out}")
                say(f"continue with: python train.py --resume {resume_from}")
            return stop.exit_code
        session = time.perf_counter() - session_start
        times = (f"train time {state.train_seconds:.1f} s ({session:.1f} s in all)" if not args.resume else
                 f"train time {state.train_seconds:.1f} s, {session_train:.1f} s of it in this session "
                 f"({session:.1f} s in all)")
        say(f"test accuracy {100 * last['test_accuracy']:.2f}%  test loss {last['test_loss']:.4f}  {times}  "
            f"outputs in {out}")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        print("\ntrain.py: interrupted", file=sys.stderr)
        sys.exit(130)
