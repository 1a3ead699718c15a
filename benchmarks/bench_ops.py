"""Times torchcnn's ops against torch's built-ins on the MNIST model's shapes, and the fused
conv–ReLU–pool op against torch's composition of the three.

    python benchmarks/bench_ops.py                 # CPU
    python benchmarks/bench_ops.py --device cuda   # GPU (torch uses cuDNN)
    python benchmarks/bench_ops.py --overhead      # per-call cost: each op on tiny tensors
    python benchmarks/bench_ops.py --device cuda --cuda-routes   # + each conv forward on every CUDA route

Forward is timed as in training (inputs require grad, so max_pool2d computes its indices in both
libraries); backward is one ``torch.autograd.grad`` over the same graph for every input. The two
libraries are timed interleaved, round by round (as bench_conv.py): each figure is a median, and
ratio = torchcnn / torch the median of the rounds' paired ratios.

With ``--overhead`` the tensors are a few dozen values, so that what is timed is what a call costs
besides its arithmetic (argument checks, dispatch, autograd's bookkeeping): each op without a
gradient, its forward with one, and its forward and backward together, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capability  # noqa: E402

capability.cap_from_argv()  # --cpu-capability, before torch loads

import torch  # noqa: E402
import torch.nn.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing
import torchcnn  # noqa: E402
import torchcnn.functional as CF  # noqa: E402

torchcnn.load()  # the kernels, compiled now if need be (not inside a timing); imports cpp_extension quietly
from torch.utils import benchmark  # noqa: E402  (after torchcnn.load(): it would log a CUDA warning)


def cases(batch: int):
    """(name, torchcnn fn, torch fn, inputs) for the MNIST model's layers: each input a shape (a
    random float tensor that takes a gradient) or a function of a generator (a tensor that does not)."""
    yield ("conv 1→32 3×3, 28×28", CF.conv2d, TF.conv2d, [(batch, 1, 28, 28), (32, 1, 3, 3), (32,)])
    yield ("conv 32→64 3×3, 26×26", CF.conv2d, TF.conv2d, [(batch, 32, 26, 26), (64, 32, 3, 3), (64,)])
    yield ("max_pool 2×2, 64×24×24", lambda x: CF.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2),
           [(batch, 64, 24, 24)])
    # The MnistNet layers (padding 1), fused against torch's composition of the three.
    fused = lambda x, w, b: CF.conv2d_relu_max_pool2d(x, w, b, padding=1)  # noqa: E731
    composed = lambda x, w, b: TF.max_pool2d(TF.relu(TF.conv2d(x, w, b, padding=1)), 2)  # noqa: E731
    yield ("conv+relu+pool 1→32, 28×28 (fused)", fused, composed, [(batch, 1, 28, 28), (32, 1, 3, 3), (32,)])
    yield ("conv+relu+pool 32→64, 14×14 (fused)", fused, composed, [(batch, 32, 14, 14), (64, 32, 3, 3), (64,)])
    # softmax + cross-entropy of the 10 logits against class indices (an int64 input: no gradient).
    labels = lambda gen: torch.randint(0, 10, (batch,), generator=gen)  # noqa: E731
    yield ("softmax + cross-entropy, 10 classes", CF.cross_entropy, TF.cross_entropy, [(batch, 10), labels])


def overhead_cases():
    """(name, torchcnn fn, torch fn, inputs) on tiny tensors, inputs as in :func:`cases`."""
    fused = lambda x, w, b: CF.conv2d_relu_max_pool2d(x, w, b, padding=1)  # noqa: E731
    composed = lambda x, w, b: TF.max_pool2d(TF.relu(TF.conv2d(x, w, b, padding=1)), 2)  # noqa: E731
    labels = lambda gen: torch.randint(0, 10, (4,), generator=gen)  # noqa: E731
    yield "relu, 4×8", CF.relu, TF.relu, [(4, 8)]
    # torch takes its direct convolution for the first, oneDNN for the second.
    yield "conv2d 1→2 3×3, 1×1×4×4", CF.conv2d, TF.conv2d, [(1, 1, 4, 4), (2, 1, 3, 3), (2,)]
    yield "conv2d 3→4 3×3, 2×3×6×6", CF.conv2d, TF.conv2d, [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]
    yield "max_pool2d 2×2, 2×3×6×6", lambda x: CF.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2), [(2, 3, 6, 6)]
    yield "conv+relu+pool 3→4, 2×3×6×6 (fused)", fused, composed, [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]
    yield "softmax + cross-entropy, 4×10", CF.cross_entropy, TF.cross_entropy, [(4, 10), labels]


def make_inputs(shapes, device: str) -> list:
    gen = torch.Generator().manual_seed(0)
    return [s(gen).to(device) if callable(s) else torch.randn(s, generator=gen).to(device).requires_grad_()
            for s in shapes]


def overhead_rows(device: str, min_run_time: float, rounds: int, only: str | None = None) -> list[dict]:
    """Each tiny case without a gradient, its forward with one, and forward + backward, in µs,
    torch's and torchcnn's interleaved (bench_conv.interleaved_ms)."""
    from bench_conv import interleaved_ms

    def no_grad(fn, inputs):
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run

    def forward_backward(fn, inputs):
        leaves = [t for t in inputs if t.requires_grad]
        grad = torch.ones_like(fn(*inputs))
        return lambda: torch.autograd.grad(fn(*inputs), leaves, grad)

    rows = []
    for name, ours, theirs, shapes in overhead_cases():
        if only is not None and only not in name:
            continue
        inputs = make_inputs(shapes, device)
        for pass_, make in (("no_grad", no_grad), ("forward", lambda fn, ins: lambda: fn(*ins)),
                            ("fwd + bwd", forward_backward)):
            us = interleaved_ms({"torch": make(theirs, inputs), "torchcnn": make(ours, inputs)}, device, rounds,
                                min_run_time)
            rows.append({"case": name, "pass": pass_, "torch_us": us["torch"] * 1e3,
                         "torchcnn_us": us["torchcnn"] * 1e3, "ratio": us["ratio"]})
    return rows


def overhead_table(rows: list[dict]) -> str:
    lines = ["| case | pass | torch µs | torchcnn µs | ratio |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['pass']} | {r['torch_us']:.1f} | {r['torchcnn_us']:.1f} | {r['ratio']:.2f}× |"
              for r in rows]
    return "\n".join(lines)


CUDA_ROUTES = ("direct", "tiled", "gemm")


def on_route(route: str, fn):
    """fn with the CUDA forward forced onto `route` ("" the rule) for the call: the knob is set and
    reset around each call, so each route's figure includes two knob calls (a few µs), the rule's
    too (the plain torchcnn figure and its ratio have none)."""
    knob = torch.ops.torchcnn._cuda_conv2d_force_route

    def run():
        previous = knob(route)
        try:
            return fn()
        finally:
            knob(previous)
    return run


def route_applies(route: str, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the CUDA forward of conv2d(x, w) takes `route` when it is forced (the direct kernel
    wants one input channel per group, the tiled one a patch that fits in shared memory)."""
    knob = torch.ops.torchcnn._cuda_conv2d_force_route
    previous = knob(route)
    try:
        return torch.ops.torchcnn._cuda_conv2d_route(x, w, [1, 1], [0, 0], [1, 1], 1).startswith(route)
    finally:
        knob(previous)


def run(device: str, batches: list[int], min_run_time: float, rounds: int = 5, only: str | None = None,
        routes: bool = False) -> list[dict]:
    """Each case's forward, then its backward, torch's and torchcnn's interleaved round by round
    (bench_conv.interleaved_ms): the times are medians, the ratios medians of paired ratios. `only`:
    the cases whose name contains it. `routes` (CUDA): each convolution's forward also on every
    forced route of csrc/cuda (conv2d_tiled.cu's forward_route), in the same rounds."""
    from bench_conv import interleaved_ms

    rows = []
    for batch in batches:
        for name, ours, theirs, shapes in cases(batch):
            if only is not None and only not in name:
                continue
            inputs = make_inputs(shapes, device)
            leaves = [t for t in inputs if t.requires_grad]
            row = {"case": name, "batch": batch}
            forward = {"torch": lambda fn=theirs: fn(*inputs), "torchcnn": lambda fn=ours: fn(*inputs)}
            if routes and name.startswith("conv"):  # the rule's pick, and each route that applies
                forward["rule"] = on_route("", forward["torchcnn"])
                for route in CUDA_ROUTES:
                    if route_applies(route, *inputs[:2]):
                        forward[route] = on_route(route, forward["torchcnn"])
            backward = {}
            for which, fn in (("torch", theirs), ("torchcnn", ours)):
                out = fn(*inputs)
                grad = torch.randn_like(out)
                backward[which] = lambda out=out, grad=grad: torch.autograd.grad(out, leaves, grad, retain_graph=True)
            for pass_, fns in (("fwd", forward), ("bwd", backward)):
                ms = interleaved_ms(fns, device, rounds, min_run_time)
                row.update({f"torch_{pass_}": ms["torch"], f"torchcnn_{pass_}": ms["torchcnn"],
                            f"ratio_{pass_}": ms["ratio"]})
                if pass_ == "fwd" and "rule" in fns:
                    row["routes_fwd"] = {route: ms[route] for route in ("rule", *CUDA_ROUTES) if route in ms}
            rows.append(row)
    return rows


def set_tf32(mode: str) -> None:
    """float32 precision on the GPU: "off" (both libraries' products in full float32, a
    like-for-like comparison), "on" (TF32 allowed for both), or "torch" (torch's defaults: TF32
    allowed for convolutions, which torchcnn's GEMM route follows too, not for matmuls)."""
    torch.backends.cudnn.allow_tf32 = mode in ("on", "torch")
    torch.backends.cuda.matmul.allow_tf32 = mode == "on"


def describe(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()})"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__}, oneDNN {torch.backends.mkldnn.is_available()}; "
            f"{capability.check(capability.requested(sys.argv[1:]))})")


def table(rows: list[dict]) -> str:
    lines = ["| case | batch | pass | torch ms | torchcnn ms | ratio |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        for pass_ in ("fwd", "bwd"):
            t, c = r[f"torch_{pass_}"], r[f"torchcnn_{pass_}"]
            lines.append(f"| {r['case']} | {r['batch']} | {pass_} | {t:.3f} | {c:.3f} | {r[f'ratio_{pass_}']:.2f}× |")
    return "\n".join(lines)


def routes_table(rows: list[dict]) -> str:
    """The forward of each convolution on the rule's route and on each route that applies, in ms,
    with torch's: all timed with the route knob around each call."""
    columns = ("rule", *CUDA_ROUTES)
    lines = ["| case | batch | torch | " + " | ".join(columns) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
    for r in rows:
        if "routes_fwd" in r:
            cells = [f"{r['routes_fwd'][c]:.3f}" if c in r["routes_fwd"] else "—" for c in columns]
            lines.append(f"| {r['case']} | {r['batch']} | {r['torch_fwd']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setup(description: str, batch_sizes: bool = True, more_arguments=None) -> argparse.Namespace:
    """The options every benchmark here takes, parsed and applied (threads, TF32);
    ``more_arguments(parser)`` adds a benchmark's own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    if batch_sizes:
        parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per figure")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--tf32", nargs="?", const="on", default="off", choices=["off", "on", "torch"],
                        help="TF32 for float32 on the GPU: off for both (default, a like-for-like comparison), on "
                             "for both (--tf32), or torch's defaults (--tf32 torch: convolutions yes, matmuls no)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    capability.add_argument(parser)
    if more_arguments:
        more_arguments(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_tf32(args.tf32)
    return args


def main() -> None:
    def more_arguments(parser):
        parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per figure")
        parser.add_argument("--only", default=None, help="only the cases whose name contains this, e.g. cross-entropy")
        parser.add_argument("--overhead", action="store_true", help="the per-call cost: each op on tiny tensors")
        parser.add_argument("--cuda-routes", action="store_true",
                            help="also each convolution's forward on every route of the CUDA kernels (--device cuda)")

    args = setup(__doc__, more_arguments=more_arguments)
    if args.cuda_routes and args.device != "cuda":
        raise SystemExit("bench_ops.py: --cuda-routes times the CUDA kernels: it needs --device cuda")
    if args.overhead:
        rows = overhead_rows(args.device, args.min_run_time, args.rounds, args.only)
    else:
        rows = run(args.device, args.batch_sizes, args.min_run_time, args.rounds, args.only, args.cuda_routes)
    if not rows:
        raise SystemExit(f"bench_ops.py: no case's name contains {args.only!r}")
    print(f"device: {describe(args.device)}")
    print(overhead_table(rows) if args.overhead else table(rows))
    if args.cuda_routes:
        print("\nforward by CUDA route, ms (rule: the route conv2d_tiled.cu's rule picks; —: does not apply):")
        print(routes_table(rows))
    worst = max(r["ratio"] for r in rows) if args.overhead else max(max(r["ratio_fwd"], r["ratio_bwd"]) for r in rows)
    print(f"worst ratio: {worst:.2f}×")
    if args.json:
        args.json.write_text(json.dumps({"device": describe(args.device), "rows": rows, "worst_ratio": worst}, indent=1))


if __name__ == "__main__":
    main()
