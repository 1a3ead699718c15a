"""Train an MNIST digit classifier built from torchcnn's layers.

    python train.py                         # default recipe, GPU if there is one
    python train.py --device cuda --epochs 1
    python train.py --backend torch         # the identical model from torch.nn, for comparison
    python train.py --resume runs/…/last.pt
    python train.py --eval runs/…/best.pt
    torchrun --nproc_per_node=2 train.py --device cpu

The application lives in torchcnn.mnist: the command line (cli), the run's stages (run), and what
they are made of (data, model, engine, checkpoint, plots). This script reads top to bottom: parse,
set up, loop over the epochs, finish.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_cli():
    """torchcnn/mnist/cli.py, loaded from its file: importing it through the package would import
    torchcnn, and torch with it, first, and --help and argument errors should answer at once.
    It is entered in sys.modules under its own name, so the package's modules use this one."""
    name = "torchcnn.mnist.cli"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "torchcnn/mnist/cli.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


cli = load_cli()


def main(argv=None) -> int:
    """Train (or, with --eval, evaluate) the classifier; returns the exit code."""
    args, given = cli.parse_args(argv)

    # torch and torchcnn only now, so that --help and argument errors answer at once.
    from torchcnn.mnist.run import start

    # Stop requests are honoured from here; an error ends the run with one "train.py: error:" line
    # and exit code 2, under torchrun on every rank alike.
    with start(args, given, argv) as run:
        run.read_checkpoint()  # --resume or --eval: every rank reads it
        run.read_data()  # before the first op, so that a missing file builds nothing
        run.build_model()
        if args.eval:
            return run.evaluate_checkpoint()
        run.prepare_training()  # optimizer, schedule, the state a checkpoint holds, the step
        run.choose_output_folder()
        run.say(run.banner(), flush=True)
        run.load_kernels()  # built or loaded now, before any epoch's clock starts
        run.start_clock()

        # Train an epoch, evaluate, save. A stop request (Ctrl-C, SIGTERM) ends the epoch after
        # the step in progress and saves interrupted.pt, from which --resume goes on.
        while run.state.epoch < args.epochs and not run.stop.agreed():
            if not run.train_epoch():
                break
            run.evaluate_epoch()

        written = run.write_outputs()  # metrics.json and the pictures of the finished epochs
        return run.summary(written)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        print("\ntrain.py: interrupted", file=sys.stderr)
        sys.exit(130)
