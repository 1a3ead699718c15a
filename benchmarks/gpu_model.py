"""What the MNIST training step should cost on a GPU, worked out without one: the CUDA kernels run
emulated on the CPU (csrc/cuda/emulation.h), which counts every grid they launch. ESTIMATES, not
measurements: nothing here ran on a GPU.

    python benchmarks/gpu_model.py [--batch-sizes 64 256] [--json FILE]

For one step of train.py's model (forward, loss, backward; the optimizer is torch's on both sides
and left out), on the forward routes the rule picks and with every convolution forced through
im2col + cuBLAS (the CUDA path before the tiled kernel), it prints:

- kernel launches: the grids torchcnn's kernels launch (counted by the emulator), and the ATen ops
  that launch kernels of their own on a GPU (cuBLAS GEMMs, copies, fills, sums: each ATen op of the
  profile that is not a view or an allocation and calls no such op), inside torchcnn's ops or in
  torch's part of the step (autograd, dropout, the dense layers). The ATen count is read from a
  CPU profile, and the CPU splits some ops that CUDA runs as one kernel (dropout is bernoulli_,
  div_ and mul there, one fused kernel on CUDA): it errs high by a few launches;
- per torchcnn op: the floating-point operations, and the bytes its kernels read and write by
  design (each tensor argument read once, each result written once, plus the column buffers of the
  im2col routes, written and read back) against the tensors' own sizes;
- a roofline time for an H100 SXM (3.35 TB/s, 67 TFLOP/s FP32): per op max(FLOPs / peak, bytes /
  bandwidth), summed, and a launch floor of 2.5 µs per launch for a step run eagerly (CUDA graphs
  remove most of it). Perfect overlap and peak rates: a lower bound a real GPU does not reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing
import torchcnn.testing  # noqa: E402
from torchcnn.mnist.model import MnistNet, loss_function  # noqa: E402

H100 = {"device": "H100 SXM (datasheet)", "bandwidth": 3.35e12, "fp32_flops": 67e12, "launch_s": 2.5e-6}

# ATen ops that launch no kernel on a GPU: views, allocations, metadata.
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_reshape_alias", "aten::reshape",
    "aten::as_strided", "aten::narrow", "aten::slice", "aten::select", "aten::expand", "aten::t", "aten::transpose",
    "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::detach", "aten::alias", "aten::lift_fresh",
    "aten::resize_", "aten::set_", "aten::_unsafe_view", "aten::result_type", "aten::flatten", "aten::contiguous",
    "aten::numpy_T", "aten::expand_as", "aten::view_as", "aten::squeeze_", "aten::unsqueeze_", "aten::_to_copy",
    "aten::to", "aten::detach_", "aten::is_nonzero", "aten::resolve_conj", "aten::resolve_neg", "aten::new_empty",
    "aten::new_empty_strided", "aten::empty_permuted",
}
CONV_OPS = ("conv2d", "conv2d_relu", "conv2d_relu_max_pool2d", "conv2d_backward_input", "conv2d_backward_weight")


class OpLaunches(TorchDispatchMode):
    """Records each torchcnn op a step calls, with the grids its kernels launched and its tensors."""

    def __init__(self, emulated):
        super().__init__()
        self.emulated = emulated
        self.calls = []

    def turned_route(self, grad_output, x, w, stride, padding, dilation, groups) -> str | None:
        """The route of ∂X's own convolution (∂Y with the filters turned around), which a stride-1
        convolution may take (csrc/cuda/conv2d_tiled.cu's conv2d_tiled_grad_input); None: columns."""
        reach = [dilation[i] * (w.shape[2 + i] - 1) for i in range(2)]
        if list(stride) != [1, 1] or any(padding[i] > reach[i] for i in range(2)):
            return None
        turned = w.new_empty(x.shape[1], w.shape[0] // groups, *w.shape[2:])
        route = self.emulated._cuda_conv2d_route(grad_output, turned, [1, 1], [reach[0] - padding[0],
                                                 reach[1] - padding[1]], dilation, groups)
        return route if route.startswith("tiled") else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "torchcnn":
            return func(*args, **kwargs)
        name = func._opname
        # The dispatcher leaves out trailing arguments that equal their defaults: put them back.
        args = list(args) + [kwargs.get(a.name, a.default_value) for a in func._schema.arguments[len(args):]]
        kwargs = {}
        route = None
        if name in ("conv2d", "conv2d_relu", "conv2d_relu_max_pool2d"):
            route = self.emulated._cuda_conv2d_route(*args[:2], *args[3:7])
        elif name == "conv2d_backward_weight":  # the forward's route: tiled, or columns
            route = self.emulated._cuda_conv2d_route(*args[1:7])
        elif name == "conv2d_backward_input":
            route = self.turned_route(*args)
        before = self.emulated._emulated_launches()
        out = func(*args, **kwargs)
        launched = self.emulated._emulated_launches() - before
        self.calls.append({"op": name, "launches": launched, "args": args, "out": out, "route": route})
        return out


def launches_kernel(event) -> bool:
    """Whether an ATen op of the profile launches a kernel of its own on a GPU: it is not a view or
    an allocation, and none of the ops it calls does (those are counted instead)."""
    def calls_kernel(e):
        return any(launches_kernel(c) or calls_kernel(c) for c in e.cpu_children)
    return event.name.startswith("aten::") and event.name not in NO_KERNEL and not calls_kernel(event)


def owner(event) -> str:
    """The torchcnn op an ATen op ran inside, or "torch" (autograd, dropout, the dense layers)."""
    while event is not None:
        if event.name.startswith(("torchcnn_emulated::", "torchcnn::")):
            return event.name.split("::")[1]
        event = event.cpu_parent
    return "torch"


def tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(value))


def conv_cost(op: str, args, route: str | None) -> tuple[float, int]:
    """FLOPs and the bytes of one convolution op's intermediate buffers, written and read back: the
    column buffers of ∂X (GEMM, then col2im) unless it takes the tiled kernel (stride 1, padding at
    most d·(KH−1)), and of ∂W (im2col, then per-image products summed) unless it takes the tiled
    kernel; on the forward's GEMM route its columns, and Y (the
    bias copied in, read and written by the GEMM, read by the ReLU/pool kernel); a pointwise conv
    (1×1, stride 1, unpadded) reads its input as columns."""
    if op.startswith("conv2d_backward"):
        grad_output, x, w = args[:3]
        out_hw = list(grad_output.shape[2:])
    else:
        x, w = args[:2]
        stride, padding, dilation = args[3], args[4], args[5]
        out_hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
                  for i in range(2)]
    n, c, k, groups = x.shape[0], x.shape[1], w.shape[0], args[6]
    taps, plane = w.shape[2] * w.shape[3], out_hw[0] * out_hw[1]
    flops = 2.0 * n * k * (c // groups) * taps * plane
    stride, padding = args[3], args[4]
    pointwise = taps == 1 and list(stride) == [1, 1] and list(padding) == [0, 0]
    columns = 0 if pointwise else n * c * taps * plane * 4  # float32 columns, written and read back
    if op == "conv2d_backward_input":  # tiled: a convolution of ∂Y, no columns
        return flops, 0 if route in ("tiled", "tiled64") else 2 * columns
    if op == "conv2d_backward_weight":
        if route in ("tiled", "tiled64"):  # no columns; its slices' partial sums (a few MB) left out
            return flops, 0
        return flops, 2 * columns + 2 * n * k * (c // groups) * taps * 4  # + the per-image ∂W, summed
    if route != "gemm":
        return flops, 0
    y = n * k * plane * x.element_size()
    has_bias = args[2] is not None
    # conv2d's result is Y itself (counted as its output); the fused ops write Y and read it back.
    through_y = (2 * y if op != "conv2d" else 0) + (2 * y if has_bias else 0)
    return flops, 2 * columns + through_y


def step_profile(batch: int, route: str) -> dict:
    emulated = torchcnn.testing.emulated_cuda_ops()
    torch.manual_seed(0)
    model = MnistNet("torchcnn")
    loss_fn = loss_function("torchcnn")
    images, labels = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    previous = emulated._cuda_conv2d_force_route(route)
    # TF32 off: the emulator rounds a GEMM's operands to TF32 with a dozen ATen ops, which a GPU does
    # inside the GEMM. With it off each GEMM counts as the one launch it is.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torchcnn.testing.emulated_cuda():
            loss_fn(model(images), labels).backward()  # warm-up: first-call work out of the count
            model.zero_grad(set_to_none=True)
            recorder = OpLaunches(emulated)
            with torch.profiler.profile() as prof, recorder:
                loss_fn(model(images), labels).backward()
    finally:
        emulated._cuda_conv2d_force_route(previous)
        torch.backends.cudnn.allow_tf32 = tf32
    aten = Counter(f"{e.name} ({owner(e)})" for e in prof.events() if launches_kernel(e))
    ours = sum(c["launches"] for c in recorder.calls)
    ops = []
    for call in recorder.calls:
        flops, extra = conv_cost(call["op"], call["args"], call["route"]) if call["op"] in CONV_OPS else (0.0, 0)
        moved = nbytes(call["args"]) + nbytes(call["out"]) + extra
        seconds = max(flops / H100["fp32_flops"], moved / H100["bandwidth"])
        ops.append({"op": call["op"], "route": call["route"], "launches": call["launches"], "flops": flops,
                    "bytes": moved, "roofline_us": seconds * 1e6})
    launches = ours + sum(aten.values())
    compute = sum(o["roofline_us"] for o in ops)
    return {"batch": batch, "route": route or "rule", "torchcnn_launches": ours, "aten_launches": dict(aten),
            "launches": launches, "ops": ops, "roofline_us": compute,
            "launch_floor_us": launches * H100["launch_s"] * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    results = [step_profile(batch, route) for batch in args.batch_sizes for route in ("", "gemm")]
    print(f"ESTIMATES for an {H100['device']}, from the emulated CUDA kernels (no GPU ran this)")
    print("\n| batch | forward routes | launches: torchcnn's | ATen's | total | roofline µs | launch floor µs |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {r['route']} | {r['torchcnn_launches']} | {sum(r['aten_launches'].values())} | "
              f"{r['launches']} | {r['roofline_us']:.1f} | {r['launch_floor_us']:.0f} |")
    for r in results:
        print(f"\nbatch {r['batch']}, {r['route']}: ATen kernels (inside which op) "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(r['aten_launches'].items()))}")
        print("| torchcnn op | route | launches | GFLOP | MB moved | roofline µs |\n|---|---|---:|---:|---:|---:|")
        for o in r["ops"]:
            print(f"| {o['op']} | {o['route'] or ''} | {o['launches']} | {o['flops'] / 1e9:.3f} | "
                  f"{o['bytes'] / 1e6:.2f} | {o['roofline_us']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"estimate_for": H100, "steps": results}, indent=1))


if __name__ == "__main__":
    main()
