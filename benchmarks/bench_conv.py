"""Times torchcnn's conv2d against torch.nn.functional.conv2d on the shapes people train, and a
whole ResNet-18 training step with torchcnn's convolutions against the same model with torch's.

    python benchmarks/bench_conv.py                 # CPU (torch uses oneDNN)
    python benchmarks/bench_conv.py --device cuda   # GPU (torch uses cuDNN)

Each conv row is forward + backward as in training: the output, then one ``torch.autograd.grad``
for input, weight and bias. The two libraries are measured interleaved in one process — round
after round, alternating which goes first; each time is the median over the rounds, and the
ratio (torchcnn / torch, lower is better) the median of the rounds' ratios, so that a neighbour's
load on a shared machine, which comes and goes, falls on both sides of each ratio.
The strategy column is the CPU algorithm torchcnn's rule picks for the shape.
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
import torch.nn.functional as TF  # noqa: E402

from bench_ops import describe, setup  # noqa: E402  (imports torchcnn before torch.utils.benchmark)
from torch.utils import benchmark  # noqa: E402

import torchcnn  # noqa: E402
import torchcnn.functional as CF  # noqa: E402
from torchcnn.testing import cpu_conv2d_strategy  # noqa: E402


def conv_cases():
    """(name, input shape, weight shape, stride, padding, groups)."""
    yield "MNIST conv1 1→32 3×3, 28×28", (64, 1, 28, 28), (32, 1, 3, 3), 1, 0, 1
    yield "MNIST conv2 32→64 3×3, 26×26", (64, 32, 26, 26), (64, 32, 3, 3), 1, 0, 1
    yield "ResNet stem 3→64 7×7 s2, 64×64", (32, 3, 64, 64), (64, 3, 7, 7), 2, 3, 1
    for channels, size in ((64, 32), (128, 16), (256, 8), (512, 4)):
        yield (f"ResNet {channels}→{channels} 3×3, {size}×{size}", (32, channels, size, size),
               (channels, channels, 3, 3), 1, 1, 1)
    for channels, size in ((64, 32), (128, 16), (256, 8)):
        yield (f"ResNet {channels}→{2 * channels} 3×3 s2, {size}×{size}", (32, channels, size, size),
               (2 * channels, channels, 3, 3), 2, 1, 1)
        yield (f"ResNet {channels}→{2 * channels} 1×1 s2, {size}×{size}", (32, channels, size, size),
               (2 * channels, channels, 1, 1), 2, 0, 1)
    for channels, size in ((64, 32), (256, 8)):
        yield (f"depthwise {channels} 3×3, {size}×{size}", (32, channels, size, size),
               (channels, 1, 3, 3), 1, 1, channels)
    # Few channels and wider filters (issue 25): the layers of small models and first layers.
    yield "MNIST fast conv1 1→24 5×5, 28×28", (256, 1, 28, 28), (24, 1, 5, 5), 1, 0, 1
    yield "MNIST fast conv2 24→32 3×3, 12×12", (256, 24, 12, 12), (32, 24, 3, 3), 1, 0, 1
    yield "Fashion conv1 1→16 5×5 pad 2, 28×28", (128, 1, 28, 28), (16, 1, 5, 5), 1, 2, 1
    yield "Fashion conv2 16→32 3×3, 14×14", (128, 16, 14, 14), (32, 16, 3, 3), 1, 1, 1
    yield "small 8→16 3×3, 28×28", (32, 8, 28, 28), (16, 8, 3, 3), 1, 1, 1
    yield "small 16→32 3×3, 7×7", (64, 16, 7, 7), (32, 16, 3, 3), 1, 1, 1
    yield "small 32→64 3×3, 56×56", (8, 32, 56, 56), (64, 32, 3, 3), 1, 1, 1
    yield "5×5 16→32 pad 2, 28×28", (32, 16, 28, 28), (32, 16, 5, 5), 1, 2, 1
    yield "5×5 32→64 pad 2, 14×14", (32, 32, 14, 14), (64, 32, 5, 5), 1, 2, 1
    yield "7×7 3→32 pad 3, 56×56", (8, 3, 56, 56), (32, 3, 7, 7), 1, 3, 1
    yield "7×7 16→32 pad 3, 14×14", (32, 16, 14, 14), (32, 16, 7, 7), 1, 3, 1
    # Grouped (not depthwise) and pointwise layers of torchvision's models.
    yield "RegNet-like 64, 8 groups 3×3, 16×16", (32, 64, 16, 16), (64, 8, 3, 3), 1, 1, 8
    yield "ResNeXt-like 128, 32 groups 3×3, 16×16", (16, 128, 16, 16), (128, 4, 3, 3), 1, 1, 32
    yield "SqueezeNet squeeze 128→16 1×1, 15×15", (8, 128, 15, 15), (16, 128, 1, 1), 1, 0, 1
    yield "SqueezeNet expand 16→64 1×1, 15×15", (8, 16, 15, 15), (64, 16, 1, 1), 1, 0, 1
    yield "DenseNet bottleneck 256→128 1×1, 8×8", (8, 256, 8, 8), (128, 256, 1, 1), 1, 0, 1


def interleaved_ms(fns: dict, device: str, rounds: int, seconds: float) -> dict:
    """Milliseconds per call of each fn (torch's, torchcnn's, and any others), measured alternately
    round by round: the median of each, and for each but torch's the median of the rounds' ratios
    to torch's, ``ratio_<name>`` (``ratio`` for torchcnn's; each round's calls ran back to back, so
    a neighbour's load that comes and goes falls on both sides)."""
    for fn in fns.values():
        fn()  # warm-up: one-time allocations, oneDNN/cuDNN primitive creation
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fns[name]})
            times[name].append(timer.blocked_autorange(min_run_time=seconds / rounds).median * 1e3)
    ratios = {f"ratio_{name}": statistics.median(c / t for c, t in zip(times[name], times["torch"]))
              for name in fns if name != "torch"}
    return {**{name: statistics.median(t) for name, t in times.items()}, **ratios, "ratio": ratios["ratio_torchcnn"]}


def conv_rows(device: str, rounds: int, seconds: float, match: str = "") -> list[dict]:
    rows = []
    for name, x_shape, w_shape, stride, padding, groups in conv_cases():
        if match.lower().replace("×", "x") not in name.lower().replace("×", "x"):
            continue
        gen = torch.Generator().manual_seed(0)
        x, w = (torch.randn(s, generator=gen).to(device).requires_grad_() for s in (x_shape, w_shape))
        b = torch.randn(w_shape[0], generator=gen).to(device).requires_grad_()

        def step(conv):
            def run():
                y = conv(x, w, b, stride, padding, 1, groups)
                torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
            return run

        ms = interleaved_ms({"torch": step(TF.conv2d), "torchcnn": step(CF.conv2d)}, device, rounds, seconds)
        strategy = cpu_conv2d_strategy(x, w, stride, padding, 1, groups)
        rows.append({"case": name, "input": list(x_shape), "strategy": strategy,
                     "torch_ms": ms["torch"], "torchcnn_ms": ms["torchcnn"], "ratio": ms["ratio"]})
    return rows


def with_torchcnn_convs(module: torch.nn.Module) -> torch.nn.Module:
    """The same model, every torch.nn.Conv2d replaced by a torchcnn.nn.Conv2d with its weights."""
    for name, child in module.named_children():
        if type(child) is torch.nn.Conv2d:
            conv = torchcnn.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                      child.padding, child.dilation, child.groups, child.bias is not None,
                                      child.padding_mode, device=child.weight.device)
            conv.load_state_dict(child.state_dict())
            setattr(module, name, conv)
        else:
            with_torchcnn_convs(child)
    return module


def resnet_row(device: str, rounds: int, seconds: float, batch: int = 16, size: int = 64) -> dict:
    """One SGD training step of torchvision's ResNet-18 (10 classes) on a 64×64 batch of 16."""
    import torchvision

    torch.manual_seed(0)
    models = {"torch": torchvision.models.resnet18(num_classes=10).to(device)}
    models["torchcnn"] = with_torchcnn_convs(torchvision.models.resnet18(num_classes=10).to(device))
    models["torchcnn"].load_state_dict(models["torch"].state_dict())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def run():
            optimizer.zero_grad(set_to_none=True)
            TF.cross_entropy(model(images), labels).backward()
            optimizer.step()
        return run

    ms = interleaved_ms({name: step(m) for name, m in models.items()}, device, rounds, seconds)
    return {"case": f"ResNet-18 training step, {size}×{size}", "input": [batch, 3, size, size], "strategy": "—",
            "torch_ms": ms["torch"], "torchcnn_ms": ms["torchcnn"], "ratio": ms["ratio"]}


def table(rows: list[dict]) -> str:
    lines = ["| case | input (N, C, H, W) | strategy | torch ms | torchcnn ms | ratio |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        shape = "×".join(map(str, r["input"]))
        lines.append(f"| {r['case']} | {shape} | {r['strategy']} | {r['torch_ms']:.2f} | {r['torchcnn_ms']:.2f} | "
                     f"{r['ratio']:.2f}× |")
    return "\n".join(lines)


def arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per figure")
    parser.add_argument("--skip-resnet", action="store_true", help="only the conv rows")
    parser.add_argument("--match", default="", metavar="TEXT",
                        help="only the conv rows whose case names TEXT (any case; x and × alike), e.g. 5x5 "
                             "or groups, and no ResNet-18 step")


def main() -> None:
    args = setup(__doc__, batch_sizes=False, more_arguments=arguments)
    rows = conv_rows(args.device, args.rounds, args.min_run_time, args.match)
    if not rows:
        sys.exit(f"bench_conv.py: argument --match: no conv case names {args.match!r}")
    ratios = [r["ratio"] for r in rows]
    summary = {"geomean": math.exp(statistics.fmean(map(math.log, ratios))), "worst": max(ratios)}
    if not args.skip_resnet and not args.match:
        rows.append(resnet_row(args.device, args.rounds, args.min_run_time))
        summary["resnet18_step"] = rows[-1]["ratio"]
    print(f"device: {describe(args.device)}")
    print(table(rows))
    print("conv rows: geometric mean {geomean:.2f}×, worst {worst:.2f}×".format(**summary)
          + (f"; ResNet-18 step {summary['resnet18_step']:.2f}×" if "resnet18_step" in summary else ""))
    if args.json:
        args.json.write_text(json.dumps({"device": describe(args.device), "rows": rows, **summary}, indent=1))


if __name__ == "__main__":
    main()
