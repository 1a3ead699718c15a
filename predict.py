"""Read handwritten digits with a model trained by train.py.

    python predict.py digit.png photo.jpg --checkpoint runs/…/best.pt

Each image (PNG or JPEG, any size, RGB, grayscale or with alpha, dark ink on light paper or light on
dark) is prepared the way MNIST's digits were (torchcnn.mnist.prepare_digit); the script prints the
predicted digit and the three most probable digits with their probabilities.
"""

from __future__ import annotations

import argparse
import sys

import torch

from torchcnn import checkpoint, mnist
from torchcnn.models import MnistNet
from torchcnn.training import parse_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by train.py")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        parse_device(args.device)
    except ValueError as e:
        p.error(f"--device {e}")

    from PIL import Image, UnidentifiedImageError

    try:
        saved = checkpoint.load(args.checkpoint)
        model = MnistNet.from_config(saved["args"]["backend"], saved["model_config"])
        checkpoint.load_model_state(model, saved, args.checkpoint)
    except checkpoint.CheckpointError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    model = model.to(args.device).eval()

    status = 0
    for path in args.images:
        try:
            with Image.open(path) as image:
                image.load()
                digit = mnist.prepare_digit(image)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            reason = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
            print(f"predict.py: error: {path}: {reason}", file=sys.stderr)
            status = 2
            continue
        with torch.no_grad():
            probabilities = model(mnist.normalize(digit[None].to(args.device))).softmax(1)[0].cpu()
        top = probabilities.topk(3)
        ranked = "  ".join(f"{d}: {p:.3f}" for p, d in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {top.indices[0].item()}  ({ranked})")
    return status


if __name__ == "__main__":
    sys.exit(main())
