"""train.py's command line: the choices it offers, the recipes, the parser and its checks.

Plain Python that imports neither torch nor the rest of this package: train.py loads this file
by itself (see train.py's ``load_cli``) so that ``--help`` and argument errors answer at once,
before torch is imported. The package's modules take their vocabularies from here — the
backends (model), the optimizers, schedules and devices (engine) — so each is written once.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field

BACKENDS = ("torchcnn", "torch")
OPTIMIZERS = ("sgd", "momentum", "adam", "adadelta")
SCHEDULES = ("onecycle", "step", "none")
# The optimizers whose update can be captured in a CUDA graph (torchcnn/mnist/cuda_graph.py).
GRAPHED_OPTIMIZERS = ("adam", "adadelta")
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.05, "adam": 5e-3, "adadelta": 1.0}
# What --device accepts; engine.parse_device then checks that the device exists.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


@dataclass(frozen=True)
class Recipe:
    """What a ``--recipe`` stands for: the model's size and defaults for the training arguments."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    schedule: str
    dropout: float
    shift: int
    label_smoothing: float = 0.0
    betas: tuple[float, float] | None = None  # Adam's, held fixed; None: torch's, β₁ cycled by onecycle
    model: dict = field(default_factory=dict)  # MnistNet's size: channels, hidden, kernels, padding

    def arguments(self) -> dict:
        """The train.py arguments it sets, by their argparse names."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "optimizer": self.optimizer, "lr": self.lr,
                "schedule": self.schedule, "dropout": self.dropout, "shift": self.shift,
                "label_smoothing": self.label_smoothing, "betas": self.betas}


# standard (the default): 12 epochs of Adam with a one-cycle rate and ±2-pixel shifts, 99.4–99.5 %
# (docs/BENCHMARKS.md). fast: the quickest way to 99 % found on a 2-core CPU, on every seed tried —
# one epoch at batch 256 of a model with unpadded 5×5 and 3×3 filters (24 and 32 channels, a
# 256-unit hidden layer), Adam with short memories (betas 0.7, 0.9, held fixed) under a one-cycle
# rate, and labels smoothed by 0.1 (benchmarks/time_to_accuracy.py trains with it; after the shape of
# github.com/tuomaso/train_mnist_fast's one-epoch GPU recipe).
RECIPES = {
    "standard": Recipe(epochs=12, batch_size=64, optimizer="adam", lr=5e-3, schedule="onecycle", dropout=0.25, shift=2),
    "fast": Recipe(epochs=1, batch_size=256, optimizer="adam", lr=1e-2, schedule="onecycle", dropout=0.0, shift=0,
                   label_smoothing=0.1, betas=(0.7, 0.9),
                   model={"channels": (24, 32), "hidden": 256, "kernels": (5, 3), "padding": (0, 0)}),
}
# What a checkpoint from before a recipe argument existed was trained with.
LEGACY_RECIPE = {"label_smoothing": 0.0, "betas": None}

# The arguments that define a run. A checkpoint keeps them, and --resume holds the run to them:
# see resume_args for the one that may change (--epochs).
RECIPE = ("recipe", "epochs", "batch_size", "optimizer", "lr", "schedule", "step_size", "gamma", "weight_decay",
          "dropout", "shift", "label_smoothing", "betas", "seed", "limit_train", "limit_test")
# The arguments --eval uses; any other given with it is refused.
EVAL_ARGS = {"eval", "backend", "device", "data_dir", "no_download", "test_batch_size", "limit_test", "quiet",
             "no_fuse"}
DESCRIPTION = "Train an MNIST digit classifier built from torchcnn's layers."


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


def device_arg(text: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, allow_abbrev=False)
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
                   help="standard: 12 epochs, 99.4–99.5 %%; fast: one epoch of a smaller model ("
                        f"{' and '.join(f'{k}×{k}' for k in fast.model['kernels'])} unpadded filters, channels "
                        f"{'/'.join(map(str, fast.model['channels']))}, hidden {fast.model['hidden']}), 99 %% "
                        "in seconds; the flags below take the recipe's values unless given (default: standard)")
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
    p.add_argument("--label-smoothing", type=number(float, "in [0, 1)", lambda v: 0 <= v < 1),
                   default=default.label_smoothing, metavar="E",
                   help="train against the targets (1 − E)·one-hot + E/10, as torch's "
                        f"CrossEntropyLoss(label_smoothing=E) (default: {default.label_smoothing:g}; fast: "
                        f"{fast.label_smoothing:g})")
    p.add_argument("--betas", type=number(float, "in [0, 1)", lambda v: 0 <= v < 1), nargs=2,
                   default=default.betas, metavar=("B1", "B2"),
                   help="Adam's decay rates of its gradient and squared-gradient averages, held for the whole "
                        "run (default: torch's 0.9 0.999, whose B1 a onecycle schedule moves between 0.95 and "
                        f"0.85 as torch's OneCycleLR does; fast: {' '.join(f'{b:g}' for b in fast.betas)})")
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
    if args.optimizer != "adam":
        if "betas" in given and not args.resume:  # resumed: checked against the checkpoint's optimizer
            p.error(f"argument --betas: Adam's, not used by --optimizer {args.optimizer}")
        if "betas" not in given:
            args.betas = None  # the recipe's are Adam's
    args.betas = None if args.betas is None else tuple(args.betas)
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
    recipe = {**LEGACY_RECIPE, **saved["recipe"], "backend": saved["backend"]}
    recipe.setdefault("recipe", "standard")  # checkpoints from before --recipe
    recipe["betas"] = None if recipe["betas"] is None else tuple(recipe["betas"])
    if "betas" in given and recipe.get("optimizer", "adam") != "adam":
        raise ValueError(f"argument --betas: Adam's, not used by the checkpoint's --optimizer {recipe['optimizer']}")
    for name in ("backend", *RECIPE):
        if name not in recipe or (name == "epochs" and name in given):
            continue
        if name in given and getattr(args, name) != recipe[name]:
            shown = "torch's (β₁ cycled by onecycle)" if name == "betas" and recipe[name] is None else recipe[name]
            raise ValueError(f"argument --{name.replace('_', '-')}: {getattr(args, name)} contradicts the "
                             f"checkpoint's {shown}; a resumed run keeps its recipe (start a new run "
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
