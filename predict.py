"""Read handwritten digits with a model trained by train.py.

    python predict.py digit.png photo.jpg --checkpoint runs/…/best.pt

Each image (PNG or JPEG, any size, RGB, grayscale or with alpha, dark ink on light paper or light on
dark) is prepared the way MNIST's digits were (torchcnn.mnist.digits.prepare_digit); the script
prints the predicted digit and the three most probable digits with their probabilities.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="pictures of one digit each (PNG or JPEG)")
    p.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by train.py (required)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    args = p.parse_args(argv)

    # torch and the package only now, so that --help and argument errors answer at once.
    import torch
    from PIL import Image, UnidentifiedImageError

    from torchcnn.mnist import checkpoint, data, engine
    from torchcnn.mnist.digits import prepare_digit

    try:
        device = engine.parse_device(args.device)
    except ValueError as e:
        p.error(f"argument --device: {e}")
    try:
        saved = checkpoint.load(args.checkpoint)
        model = checkpoint.load_model(saved, args.checkpoint).to(device).eval()
    except checkpoint.CheckpointError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2

    status = 0
    for path in args.images:
        try:
            with Image.open(path) as image:
                image.load()
                digit = prepare_digit(image)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            reason = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
            print(f"predict.py: error: {path}: {reason}", file=sys.stderr)
            status = 2
            continue
        with torch.no_grad():
            probabilities = model(data.normalize(digit[None].to(device))).softmax(1)[0].cpu()
        top = probabilities.topk(3)
        ranked = "  ".join(f"{d}: {p:.3f}" for p, d in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {top.indices[0].item()}  ({ranked})")
    return status


if __name__ == "__main__":
    sys.exit(main())
