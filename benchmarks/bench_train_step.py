"""Times one training step of the MNIST model (train.py's default) built from torchcnn's layers
against the identical model built from torch.nn's, on the same batch; the same for the model of
``train.py --recipe fast`` at its batch of 256; and the same for a
Fashion-MNIST-shaped model written with torch.nn and turned into torchcnn's by
``torchcnn.nn.convert``, as a user's own model would be.

    python benchmarks/bench_train_step.py                 # CPU
    python benchmarks/bench_train_step.py --device cuda   # GPU (torch uses cuDNN)

A step is forward, loss, backward and an Adam update, as in train.py: torchcnn's with its fused
conv–ReLU–pool layers (the default) and without (``--no-fuse``); on a GPU also both models' steps
captured in a CUDA graph and replayed (``train.py --cuda-graphs``). The three are timed interleaved,
round by round (bench_conv.py): each figure is a median of ``torch.utils.benchmark`` blocked runs,
each ratio (to torch) the median of the rounds' paired ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capability  # noqa: E402

capability.cap_from_argv()  # --cpu-capability, before torch loads

import torch  # noqa: E402

from bench_ops import describe, setup  # noqa: E402  (imports torchcnn before torch.utils.benchmark)
from bench_conv import interleaved_ms  # noqa: E402

import torchcnn.nn  # noqa: E402
from torchcnn.mnist import engine  # noqa: E402
from torchcnn.mnist.cuda_graph import GraphedTrainStep  # noqa: E402
from torchcnn.mnist.cli import RECIPES  # noqa: E402
from torchcnn.mnist.model import MnistNet, loss_function  # noqa: E402


def make_step(backend: str, batch: int, device: str, fuse: bool = True, graphed: bool = False,
              recipe: str = "standard"):
    """One training step of train.py's model (that of ``recipe``: its size, dropout, label smoothing
    and Adam's betas) on a fixed batch, as a function (``graphed``: replayed from a CUDA graph)."""
    torch.manual_seed(0)
    r = RECIPES[recipe]
    model = MnistNet(backend, **r.model, dropout=r.dropout, fuse=fuse).to(device)
    loss_fn = loss_function(backend, label_smoothing=r.label_smoothing)
    optimizer = engine.make_optimizer("adam", model.parameters(), lr=1e-3, betas=r.betas)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)

    if graphed:
        graphed_step = GraphedTrainStep(model, loss_fn, optimizer)

        def step():
            graphed_step(images, labels)
    else:
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
            optimizer.step()

    for _ in range(5):  # warm-up: allocator, cuBLAS/cuDNN handles and algorithm choice, graph capture
        step()
    return step


def fashion_mnist_net() -> torch.nn.Sequential:
    """A Fashion-MNIST classifier as one is written with torch.nn, outside this project: a 5×5
    padded convolution 1→16 and a 3×3 padded one 16→32, each with a ReLU and a 2×2 pool, then two
    dense layers."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def make_fashion_step(backend: str, batch: int, device: str, fuse: bool = True):
    """One training step of :func:`fashion_mnist_net` (SGD with momentum) on a fixed batch: torch.nn's
    model, or for ``backend="torchcnn"`` the same model through ``torchcnn.nn.convert``."""
    torch.manual_seed(0)
    model = fashion_mnist_net().to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    if backend == "torchcnn":
        model, loss_fn = torchcnn.nn.convert(model, fuse=fuse), torchcnn.nn.convert(loss_fn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    for _ in range(5):
        step()
    return step


def main() -> None:
    args = setup(__doc__, more_arguments=lambda p: p.add_argument("--rounds", type=int, default=5))
    rows = []
    for batch in args.batch_sizes:
        steps = {"torch": make_step("torch", batch, args.device), "torchcnn": make_step("torchcnn", batch, args.device),
                 "unfused": make_step("torchcnn", batch, args.device, fuse=False)}
        if args.device == "cuda":
            steps["torch_graph"] = make_step("torch", batch, args.device, graphed=True)
            steps["torchcnn_graph"] = make_step("torchcnn", batch, args.device, graphed=True)
        ms = interleaved_ms(steps, args.device, args.rounds, args.min_run_time)
        rows.append({"case": "MNIST train step (Adam)", "batch": batch, "torch_ms": ms["torch"],
                     "torchcnn_ms": ms["torchcnn"], "ratio": ms["ratio"], "unfused_ms": ms["unfused"],
                     "unfused_ratio": ms["ratio_unfused"]})
        if "torch_graph" in ms:
            rows[-1].update(torch_graph_ms=ms["torch_graph"], torchcnn_graph_ms=ms["torchcnn_graph"],
                            graph_ratio=ms["ratio_torchcnn_graph"] / ms["ratio_torch_graph"])
    fast_batch = RECIPES["fast"].batch_size
    steps = {"torch": make_step("torch", fast_batch, args.device, recipe="fast"),
             "torchcnn": make_step("torchcnn", fast_batch, args.device, recipe="fast"),
             "unfused": make_step("torchcnn", fast_batch, args.device, fuse=False, recipe="fast")}
    ms = interleaved_ms(steps, args.device, args.rounds, args.min_run_time)
    rows.append({"case": "MNIST, --recipe fast's model (Adam)", "batch": fast_batch, "torch_ms": ms["torch"],
                 "torchcnn_ms": ms["torchcnn"], "ratio": ms["ratio"], "unfused_ms": ms["unfused"],
                 "unfused_ratio": ms["ratio_unfused"]})
    for batch in args.batch_sizes:
        steps = {"torch": make_fashion_step("torch", batch, args.device),
                 "torchcnn": make_fashion_step("torchcnn", batch, args.device),
                 "unfused": make_fashion_step("torchcnn", batch, args.device, fuse=False)}
        ms = interleaved_ms(steps, args.device, args.rounds, args.min_run_time)
        rows.append({"case": "Fashion-MNIST-shaped, converted (SGD)", "batch": batch, "torch_ms": ms["torch"],
                     "torchcnn_ms": ms["torchcnn"], "ratio": ms["ratio"], "unfused_ms": ms["unfused"],
                     "unfused_ratio": ms["ratio_unfused"]})
    print(f"device: {describe(args.device)}")
    print("| case | batch | torch ms | torchcnn ms (fused) | ratio | torchcnn --no-fuse ms | ratio | torchcnn img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {r['torch_ms']:.3f} | {r['torchcnn_ms']:.3f} | {r['ratio']:.2f}× | "
              f"{r['unfused_ms']:.3f} | {r['unfused_ratio']:.2f}× | {r['batch'] / r['torchcnn_ms'] * 1e3:,.0f} |")
    graphed = [r for r in rows if "graph_ratio" in r]
    if graphed:
        print("\nCaptured in a CUDA graph and replayed (train.py --cuda-graphs):")
        print("| case | batch | torch ms | torchcnn ms | ratio |")
        print("|---|---:|---:|---:|---:|")
        for r in graphed:
            print(f"| {r['case']} | {r['batch']} | {r['torch_graph_ms']:.3f} | {r['torchcnn_graph_ms']:.3f} | "
                  f"{r['graph_ratio']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"device": describe(args.device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
