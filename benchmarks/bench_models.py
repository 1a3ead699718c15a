"""Times a training step of torchvision's classifiers converted by ``torchcnn.nn.convert`` against
the untouched models, on the same batch.

    python benchmarks/bench_models.py                          # CPU, batch 8 of 64×64 images
    python benchmarks/bench_models.py --models resnet18 vgg11 --batch 16 --size 96

A step is forward, cross-entropy (torch.nn's loss for the original, the converted one for the
converted), backward and an SGD-with-momentum update; both models start from the same weights.
They are timed interleaved, round by round (bench_conv.py): each figure is a median of
``torch.utils.benchmark`` blocked runs, each ratio (torchcnn / torch, lower is better) the median
of the rounds' paired ratios. The last line is the geometric mean of the ratios and the worst.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capability  # noqa: E402

capability.cap_from_argv()  # --cpu-capability, before torch loads

import torch  # noqa: E402

from bench_ops import describe, setup  # noqa: E402  (imports torchcnn before torch.utils.benchmark)
from bench_conv import interleaved_ms  # noqa: E402

import torchcnn  # noqa: E402

MODELS = ["resnet18", "vgg11", "alexnet", "squeezenet1_1", "googlenet", "densenet121", "mobilenet_v2",
          "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0", "regnet_x_400mf", "mnasnet1_0"]


def build(name: str, device: str) -> torch.nn.Module:
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(num_classes=10, **kwargs).to(device)


def make_step(model: torch.nn.Module, loss_fn, images, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()
    return step


def model_row(name: str, args) -> dict:
    torch.manual_seed(0)
    original = build(name, args.device)
    converted = torchcnn.nn.convert(original, fuse=not args.no_fuse)
    fused = sum(type(m) in (torchcnn.nn.Conv2dReLU, torchcnn.nn.Conv2dReLUMaxPool2d) for m in converted.modules())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(args.device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(args.device)
    steps = {"torch": make_step(original, torch.nn.CrossEntropyLoss(), images, labels),
             "torchcnn": make_step(converted, torchcnn.nn.CrossEntropyLoss(), images, labels)}
    ms = interleaved_ms(steps, args.device, args.rounds, args.min_run_time)
    return {"model": name, "fused": fused, "torch_ms": ms["torch"], "torchcnn_ms": ms["torchcnn"],
            "ratio": ms["ratio"]}


def arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=MODELS, help="torchvision model names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per figure")
    parser.add_argument("--no-fuse", action="store_true", help="convert(fuse=False)")


def main() -> None:
    args = setup(__doc__, batch_sizes=False, more_arguments=arguments)
    rows = []
    for name in args.models:
        rows.append(model_row(name, args))
        print(f"  {name}: {rows[-1]['ratio']:.2f}×", file=sys.stderr, flush=True)
    ratios = [r["ratio"] for r in rows]
    summary = {"geomean": math.exp(statistics.fmean(map(math.log, ratios))), "worst": max(ratios)}
    print(f"device: {describe(args.device)}; batch {args.batch} of {args.size}×{args.size}, "
          f"{'unfused' if args.no_fuse else 'fused where convert fuses'}")
    print("| model | fused layers | torch ms | torchcnn ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['fused']} | {r['torch_ms']:.1f} | {r['torchcnn_ms']:.1f} | {r['ratio']:.2f}× |")
    print("geometric mean {geomean:.2f}×, worst {worst:.2f}×".format(**summary))
    if args.json:
        args.json.write_text(json.dumps({"device": describe(args.device), "batch": args.batch, "size": args.size,
                                         "rows": rows, **summary}, indent=1))


if __name__ == "__main__":
    main()
