"""Training seconds until the MNIST model first reaches 99 % test accuracy, from scratch.

    python benchmarks/time_to_accuracy.py --device cpu --backend torchcnn
    python benchmarks/time_to_accuracy.py --device cpu --backend torch --json torch.json
    python benchmarks/time_to_accuracy.py --backend both --seeds 1-10   # median and worst of each

Trains train.py's model with one of its recipes (``--recipe``: ``fast``, the default here, or
``standard``, train.py's 12-epoch default) and evaluates the whole test set at fixed points — every
``--eval-every`` of an epoch (a quarter by default) — until the accuracy reaches ``--target``.
Only the training steps are timed: evaluation, data loading and building the model are not. The
two backends run the same recipe with the same seed, so they can be run side by side.
``--json`` writes {"backend", "device", "target", "reached", "seconds_to_target", "test_accuracy",
...}. With ``--seeds`` (a range such as ``1-10``, or a list ``1,4,7``) and/or ``--backend both`` it
trains once per seed and backend, the backends taking turns seed by seed, and reports how many runs
reached the target and the median and worst time to it per backend (the worst of a backend that
missed on some seed is "not reached"); ``--json`` then writes {"runs": [...], "summary": {...}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
import capability  # noqa: E402

capability.cap_from_argv()  # --cpu-capability, before torch loads

import torch  # noqa: E402

import torchcnn  # noqa: E402
from torchcnn.mnist import data, engine  # noqa: E402
from torchcnn.mnist.cuda_graph import GraphedTrainStep  # noqa: E402
from torchcnn.mnist.model import MnistNet, loss_function  # noqa: E402
from torchcnn.mnist.cli import RECIPES  # noqa: E402


def seed_list(text: str) -> list[int]:
    """An argparse type: "1-10" (inclusive) or "1,4,7"."""
    try:
        if "-" in text.strip("-"):
            first, last = (int(part) for part in text.split("-", 1))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range such as 1-10 or a list such as 1,4,7, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"the range {text!r} holds no seed")
    return seeds


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--backend", default="torchcnn", choices=["torchcnn", "torch", "both"])
    parser.add_argument("--recipe", default="fast", choices=sorted(RECIPES), help="train.py's recipe (default: fast)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $TORCHCNN_DATA_DIR, else ./data)")
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to reach (default: 0.99)")
    parser.add_argument("--eval-every", type=float, default=0.25, help="epochs between evaluations (default: 0.25)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=seed_list, default=None, help="several runs: 1-10, or 1,4,7 (instead of --seed)")
    parser.add_argument("--no-fuse", action="store_true", help="torchcnn backend: the unfused ops")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each training step from a CUDA graph (train.py --cuda-graphs)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    capability.add_argument(parser)
    args = parser.parse_args()
    if not 0 < args.target <= 1:
        parser.error(f"argument --target: must be in (0, 1], got {args.target}")
    if args.eval_every <= 0:
        parser.error(f"argument --eval-every: must be positive, got {args.eval_every}")
    return args


def train_to_target(args, backend: str, seed: int, mnist, device) -> dict:
    """One run from scratch: the recipe's training until the test accuracy first reaches the target
    (or the recipe ends), with only the training steps timed."""
    recipe = RECIPES[args.recipe]
    torch.manual_seed(seed)
    model = MnistNet(backend, **recipe.model, dropout=recipe.dropout, fuse=not args.no_fuse).to(device)
    loss_fn = loss_function(backend, label_smoothing=recipe.label_smoothing)
    optimizer = engine.make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, betas=recipe.betas)
    steps_per_epoch = data.Batches.per_epoch(mnist.train_images.shape[0], recipe.batch_size)
    schedule = engine.make_schedule(recipe.schedule, optimizer, lr=recipe.lr, epochs=recipe.epochs,
                                    steps_per_epoch=steps_per_epoch, cycle_momentum=recipe.betas is None)
    generator = torch.Generator().manual_seed(seed)
    test_batches = data.Batches(mnist.test_images, mnist.test_labels, 1000)
    every = max(1, round(args.eval_every * steps_per_epoch))
    train_step = GraphedTrainStep(model, loss_fn, optimizer) if args.cuda_graphs else None

    seconds, accuracy, reached, history = 0.0, 0.0, False, []
    for epoch in range(recipe.epochs):
        batches = data.Batches(mnist.train_images, mnist.train_labels, recipe.batch_size, generator,
                               max_shift=recipe.shift)
        step = 0
        while step < len(batches):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            _, step = engine.train_epoch(model, loss_fn, optimizer, schedule, batches, start=step,
                                         stop=lambda s: s % every == 0, step=train_step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - started
            accuracy = engine.evaluate(model, loss_fn, test_batches).accuracy
            history.append({"epochs": round(epoch + step / len(batches), 3), "seconds": round(seconds, 2),
                            "test_accuracy": accuracy})
            print(f"{backend} seed {seed}  epoch {epoch + step / len(batches):5.2f}  {seconds:6.1f} s  "
                  f"test accuracy {100 * accuracy:.2f}%")
            if accuracy >= args.target:
                reached = True
                break
        if reached:
            break
        schedule.step_epoch()
    return {"backend": backend, "seed": seed, "recipe": args.recipe, "fused": not args.no_fuse,
            "cuda_graphs": args.cuda_graphs, "target": args.target, "reached": reached,
            "seconds_to_target": seconds if reached else None, "training_seconds": seconds,
            "test_accuracy": accuracy, "history": history}


def summarize(runs: list[dict], backend: str) -> dict:
    """How many of a backend's runs reached the target, and the median and worst time to it (the
    worst is None, "not reached", if any run missed)."""
    mine = [r for r in runs if r["backend"] == backend]
    times = [r["seconds_to_target"] for r in mine if r["reached"]]
    return {"runs": len(mine), "reached": len(times), "median_seconds": statistics.median(times) if times else None,
            "worst_seconds": max(times) if times and len(times) == len(mine) else None}


def report(runs: list[dict], backends: list[str], target: float) -> str:
    seeds = sorted({r["seed"] for r in runs})
    cell = {(r["backend"], r["seed"]): (f"{r['seconds_to_target']:.1f} s" if r["reached"] else
                                        f"not reached ({100 * r['test_accuracy']:.2f}%)") for r in runs}
    lines = ["| seed | " + " | ".join(backends) + " |", "|---:|" + "---:|" * len(backends)]
    lines += [f"| {seed} | " + " | ".join(cell[(b, seed)] for b in backends) + " |" for seed in seeds]
    lines.append("")
    for b in backends:
        s = summarize(runs, b)
        median = "—" if s["median_seconds"] is None else f"{s['median_seconds']:.1f} s"
        worst = "not reached" if s["worst_seconds"] is None else f"{s['worst_seconds']:.1f} s"
        lines.append(f"{b}: {100 * target:g}% on {s['reached']}/{s['runs']} seeds, median {median}, worst {worst}")
    return "\n".join(lines)


def main() -> int:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.parse_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        print(f"time_to_accuracy.py: argument --cuda-graphs: needs a CUDA device, not {device}", file=sys.stderr)
        return 2
    try:
        mnist = data.load(args.data_dir or data.default_data_dir(), download=False).to(device)
    except (data.MNISTNotFoundError, data.MNISTCorruptError) as e:
        print(f"time_to_accuracy.py: {e}", file=sys.stderr)
        return 2
    backends = ["torchcnn", "torch"] if args.backend == "both" else [args.backend]
    if "torchcnn" in backends:
        torchcnn.load()  # compiled now if need be, not inside the timing

    seeds = args.seeds or [args.seed]
    runs = [train_to_target(args, backend, seed, mnist, device) for seed in seeds for backend in backends]
    where = engine.device_name(device)
    if device.type == "cpu":
        where += f" ({capability.check(args.cpu_capability)})"
    context = {"device": where, "threads": torch.get_num_threads(), "cpu_capability": args.cpu_capability,
               "torch": torch.__version__}
    if len(runs) == 1:
        (run,) = runs
        seconds = run["training_seconds"]
        print(f"{run['backend']} on {where}: " + (
            f"{100 * args.target:g}% after {seconds:.1f} s of training" if run["reached"] else
            f"{100 * args.target:g}% not reached ({100 * run['test_accuracy']:.2f}% after {seconds:.1f} s)"))
        result = {**run, **context}
    else:
        print(f"recipe {args.recipe} on {where}:")
        print(report(runs, backends, args.target))
        result = {"runs": runs, "summary": {b: summarize(runs, b) for b in backends}, **context}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(r["reached"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
