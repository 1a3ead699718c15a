"""Train an MNIST digit classifier built from torchcnn's layers.

    python train.py                         # default recipe, GPU if there is one
    python train.py --device cuda --epochs 1
    python train.py --backend torch         # the identical model from torch.nn, for comparison
    python train.py --resume runs/…/last.pt
    python train.py --eval runs/…/best.pt
    torchrun --nproc_per_node=2 train.py --device cpu

The data, the model and the training step live in the package (torchcnn.mnist, torchcnn.models,
torchcnn.training, torchcnn.checkpoint, torchcnn.plots); this script wires them together.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import torchcnn
from torchcnn import checkpoint, mnist, plots
from torchcnn.models import BACKENDS, MnistNet, loss_function
from torchcnn.training import (DEFAULT_LR, OPTIMIZERS, SCHEDULES, Progress, Totals, confusion_matrix,
                               evaluate, make_optimizer, make_schedule, parse_device, predict, train_epoch)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses (for metrics.json)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (under torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--backend", choices=BACKENDS, default="torchcnn",
                   help="build the model from torchcnn's layers or, identically, from torch.nn's")
    p.add_argument("--data-dir", default=mnist.default_data_dir(),
                   help=f"MNIST folder: torchvision's layout or the four IDX files, gzipped or not "
                        f"(default from ${mnist.ENV_VAR}, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="sgd is plain gradient descent θ ← θ − η∂L/∂θ; momentum is Nesterov SGD")
    p.add_argument("--lr", type=float, default=None,
                   help="(peak) learning rate; default per optimizer: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    p.add_argument("--schedule", choices=SCHEDULES, default="onecycle")
    p.add_argument("--step-size", type=int, default=1, help="epochs between decays (--schedule step)")
    p.add_argument("--gamma", type=float, default=0.7, help="decay factor (--schedule step)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--shift", type=int, default=2,
                   help="augmentation: shift each training image by up to this many pixels (0: off)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N training images")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="use the first N test images")
    p.add_argument("--out", default=None, help="output folder (default: a new one under runs/)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue the run saved there")
    p.add_argument("--eval", default=None, metavar="CHECKPOINT",
                   help="only evaluate that checkpoint on the test set")
    p.add_argument("--no-plots", action="store_true", help="skip the pictures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "test_batch_size", "step_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr is not None and not args.lr > 0:
        p.error("--lr must be positive")
    if args.shift < 0 or not 0 <= args.dropout < 1:
        p.error("--shift must be >= 0 and --dropout in [0, 1)")
    for name in ("limit_train", "limit_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive number of images")
    try:
        parse_device(args.device)
    except ValueError as e:
        p.error(f"--device {e}")
    return args


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: gloo on CPU, nccl on CUDA, one GPU per rank."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def fail(message: str, code: int = 2):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one
    interrupts at once. Under torchrun every rank gets the signal; ranks agree every few steps."""

    def __init__(self, world_size: int, every: int = 10):
        self.requested = False
        self.world_size, self.every = world_size, every
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __call__(self, step: int) -> bool:
        if self.world_size == 1:
            return self.requested
        if step % self.every:
            return False
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag if dist.get_backend() == "gloo" else flag.cuda(), op=dist.ReduceOp.MAX)
        return bool(flag.item())


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)

    # Resuming or evaluating: the checkpoint's arguments define the run; the command line may
    # change only where the output goes and how it is shown.
    saved = None
    if args.resume or args.eval:
        try:
            saved = checkpoint.load(args.resume or args.eval)
        except checkpoint.CheckpointError as e:
            fail(str(e))
        if args.resume:
            keep = {k: getattr(args, k) for k in ("resume", "quiet", "no_plots", "data_dir", "no_download")}
            args = argparse.Namespace(**{**saved["args"], **keep, "device": args.device,
                                         "out": args.out or str(Path(args.resume).parent)})

    # Data: the whole set as tensors on the device.
    try:
        data = mnist.load(args.data_dir, download=not args.no_download)
    except (mnist.MNISTNotFoundError, mnist.MNISTCorruptError) as e:
        fail(str(e))
    data = data.limit(args.limit_train, args.limit_test).to(device)

    # Model, loss, optimizer, schedule. The same seed gives the same weights on every backend.
    torch.manual_seed(args.seed)
    model = (MnistNet.from_config(args.backend, saved["model_config"]) if saved
             else MnistNet(args.backend, dropout=args.dropout)).to(device)
    loss_fn = loss_function(args.backend)
    if args.eval:
        checkpoint.load_model_state(model, saved, args.eval)
        started = time.perf_counter()
        test = evaluate(model, loss_fn, data.test_images, data.test_labels, args.test_batch_size,
                        normalize=mnist.normalize)
        say(f"{args.eval}: test accuracy {100 * test.accuracy:.2f}% ({test.correct.item()}/{test.count}), "
            f"test loss {test.mean_loss:.4f}, {time.perf_counter() - started:.1f} s")
        return 0
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    net = model.module if world_size > 1 else model
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    optimizer = make_optimizer(args.optimizer, model.parameters(), lr, args.weight_decay)
    steps_per_epoch = mnist.Batches.per_epoch(data.train_images.shape[0], args.batch_size, world_size)
    schedule = make_schedule(args.schedule, optimizer, lr=lr, epochs=args.epochs,
                             steps_per_epoch=steps_per_epoch, step_size=args.step_size, gamma=args.gamma)
    data_rng = torch.Generator().manual_seed(args.seed)  # order and shifts: the same on every rank
    torch.manual_seed(args.seed + rank)  # dropout: different on every rank

    history, epoch, step, totals, train_seconds, best = [], 0, 0, None, 0.0, -1.0
    if saved is not None:
        checkpoint.load_model_state(net, saved, args.resume)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        data_rng.set_state(saved["data_rng"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        history, epoch, step = saved["history"], saved["epoch"], saved["step"]
        train_seconds, best = saved["train_seconds"], saved["best_accuracy"]
        totals = Totals.from_state_dict(saved["totals"], device) if saved["totals"] else None
        say(f"resuming {args.resume}: epoch {epoch + 1}, step {step}")

    out = Path(args.out or Path("runs") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--out {out}: cannot create the output folder ({e.strerror})")
        if not os.access(out, os.W_OK):
            fail(f"--out {out}: the output folder is not writable")
    say(f"torchcnn {torchcnn.__version__} | torch {torch.__version__} | {device} x{world_size} | "
        f"backend {args.backend} | data {data.source} | {data.train_images.shape[0]} train / "
        f"{data.test_images.shape[0]} test images | output {out}")
    show_progress = is_main and not args.quiet and sys.stderr.isatty()

    def save_state(path: Path, epoch_start_rng: torch.Tensor):
        checkpoint.save({
            "model": net.state_dict(), "model_config": net.config, "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "epoch": epoch, "step": step,
            "totals": totals.state_dict() if totals is not None and step else None,
            "data_rng": epoch_start_rng, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": history, "train_seconds": train_seconds, "best_accuracy": best,
            "args": vars(args), "torch": str(torch.__version__), "torchcnn": torchcnn.__version__,
        }, path)

    def write_metrics(test: Totals | None):
        checkpoint.write_json({
            "test_accuracy": test.accuracy if test else None, "test_loss": test.mean_loss if test else None,
            "history": history, "train_seconds": train_seconds,
            "images_per_second": sum(r["train_images"] for r in history) / max(train_seconds, 1e-9),
            "device": str(device), "device_name": device_name(device), "backend": args.backend, "world_size": world_size,
            "seed": args.seed, "torch": str(torch.__version__), "torchcnn": torchcnn.__version__,
            "args": vars(args), "argv": ["train.py", *(sys.argv[1:] if argv is None else map(str, argv))],
        }, out / "metrics.json")

    # The loop: train an epoch, evaluate, save; Ctrl-C stops after a step and saves where it was.
    with StopRequest(world_size) as stop:
        test, run_started = None, time.perf_counter()
        while epoch < args.epochs:
            epoch_start_rng = data_rng.get_state()
            batches = mnist.Batches(data.train_images, data.train_labels, args.batch_size, data_rng,
                                    max_shift=args.shift, rank=rank, world_size=world_size)
            progress = Progress(len(batches), step, f"epoch {epoch + 1}/{args.epochs}", show_progress)
            started = time.perf_counter()
            totals, step = train_epoch(model, loss_fn, optimizer, schedule, batches, start=step,
                                       totals=totals, stop=stop, progress=progress)
            progress.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_train_seconds = time.perf_counter() - started
            train_seconds += epoch_train_seconds
            if step < len(batches):  # stopped by Ctrl-C in the middle of the epoch
                data_rng.set_state(epoch_start_rng)
                if is_main:
                    save_state(out / "interrupted.pt", epoch_start_rng)
                say(f"\ninterrupted in epoch {epoch + 1} at step {step}/{len(batches)}; saved "
                    f"{out / 'interrupted.pt'}\ncontinue with: python train.py --resume {out / 'interrupted.pt'}")
                return 130
            schedule.step_epoch()
            train = totals.all_reduced()
            test = evaluate(model, loss_fn, data.test_images, data.test_labels, args.test_batch_size,
                            normalize=mnist.normalize)
            seconds = time.perf_counter() - started
            history.append({"epoch": epoch + 1, "train_loss": train.mean_loss, "train_accuracy": train.accuracy,
                            "test_loss": test.mean_loss, "test_accuracy": test.accuracy,
                            "seconds": seconds, "train_seconds": epoch_train_seconds, "train_images": train.count,
                            "lr": optimizer.param_groups[0]["lr"]})
            epoch, step, totals = epoch + 1, 0, None
            say(f"epoch {epoch:>2}/{args.epochs}  train loss {train.mean_loss:.4f} acc {100 * train.accuracy:.2f}%"
                f"  test loss {test.mean_loss:.4f} acc {100 * test.accuracy:.2f}%  "
                f"{seconds:.1f} s  (training {train.count / epoch_train_seconds:,.0f} img/s)", flush=True)
            if is_main:
                save_state(out / "last.pt", data_rng.get_state())
                if test.accuracy > best:
                    best = test.accuracy
                    save_state(out / "best.pt", data_rng.get_state())
                write_metrics(test)
            if stop(0 if world_size == 1 else stop.every):
                say(f"interrupted after epoch {epoch}; saved {out / 'last.pt'}\n"
                    f"continue with: python train.py --resume {out / 'last.pt'}")
                return 130

        # The end: metrics and pictures from the final model.
        if test is None:  # resumed a run that had already finished
            test = evaluate(model, loss_fn, data.test_images, data.test_labels, args.test_batch_size,
                            normalize=mnist.normalize)
        if is_main:
            write_metrics(test)
            if not args.no_plots:
                predictions = predict(net, data.test_images, args.test_batch_size, normalize=mnist.normalize)
                plots.curves(history, out / "curves.png")
                plots.confusion(confusion_matrix(data.test_labels, predictions), out / "confusion.png")
                plots.filters(net.features[0].weight, out / "filters.png")
                plots.mistakes(data.test_images, data.test_labels, predictions, out / "mistakes.png")
        say(f"test accuracy {100 * test.accuracy:.2f}%  test loss {test.mean_loss:.4f}  "
            f"train time {train_seconds:.1f} s (total {time.perf_counter() - run_started:.1f} s)  "
            f"outputs in {out}")
        if world_size > 1:
            dist.destroy_process_group()
        return 0


if __name__ == "__main__":
    sys.exit(main())
