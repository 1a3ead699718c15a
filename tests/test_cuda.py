"""What only a GPU can show: streams, CUDA graphs, torch.compile's reduce-overhead mode, devices other
than cuda:0, determinism and int64 indexing past 2^31 elements. The op-by-op sweeps against torch's
CUDA built-ins (values, half types, gradcheck, non-contiguous inputs) run in the other test files,
parametrized over every available device. Everything here is skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as TF

import torchcnn
import torchcnn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mnist_model(nn):
    return torch.nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        torch.nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def _forward_backward(x, w1, b1, w2):
    y = F.max_pool2d(F.relu(F.conv2d(x, w1, b1, padding=1)), 2)
    y = F.max_pool2d(F.conv2d(y, w2, stride=1, padding=1), 2)
    return (y, *torch.autograd.grad(y.square().sum(), (x, w1, b1, w2)))


def _conv_pool_args(batch=16, device="cuda"):
    x = torch.randn(batch, 3, 28, 28, device=device, requires_grad=True)
    w1 = torch.randn(8, 3, 3, 3, device=device, requires_grad=True)
    b1 = torch.randn(8, device=device, requires_grad=True)
    w2 = torch.randn(16, 8, 3, 3, device=device, requires_grad=True)
    return x, w1, b1, w2


def test_side_stream_gives_the_same_results():
    """The kernels and GEMMs run on the current stream, so work queued on a side stream stays ordered."""
    args = _conv_pool_args()
    expected = _forward_backward(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy: a kernel on the default stream would overtake
        x = args[0].detach().mul(1).requires_grad_()  # made on the side stream
        got = _forward_backward(x, *args[1:])
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graph_capture_and_replay_with_new_inputs():
    args = [a.detach() for a in _conv_pool_args()]
    static = [a.clone().requires_grad_() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (cuBLAS handles, allocator) off the default stream
        for _ in range(2):
            _forward_backward(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _forward_backward(*static)
    for _ in range(3):
        fresh = [torch.randn_like(a) for a in args]
        with torch.no_grad():
            for s, f in zip(static, fresh):
                s.copy_(f)
        graph.replay()
        expected = _forward_backward(*[f.requires_grad_() for f in fresh])
        for a, b in zip(outputs, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [True, False])
def test_a_training_step_never_synchronizes_with_the_host(fuse):
    """Forward, loss and backward of the MNIST model, fused and not: no op reads anything back to
    the host (torch raises on any synchronizing call in this mode), so a step can overlap the next
    and a CUDA graph can capture it."""
    from torchcnn.mnist.model import MnistNet

    model = MnistNet("torchcnn", fuse=fuse).cuda()
    loss_fn = torchcnn.nn.CrossEntropyLoss()
    x = torch.randn(32, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    loss_fn(model(x), y).backward()  # the first call loads the kernels, which may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(model(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


DEVICE_CHECKS = {
    "pool indices": """
x = torch.randn(1, 2, 4, 4, device="cuda")
out, idx = torch.ops.torchcnn.max_pool2d_with_indices(x, [2, 2], [2, 2])
idx[0, 1, 1, 1] = 0  # another window's pixel
torch.ops.torchcnn.max_pool2d_backward(out, x, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
""",
    "loss targets": """
torchcnn.functional.cross_entropy(torch.randn(3, 4, device="cuda"), torch.tensor([0, 4, 1], device="cuda"))
""",
}


@pytest.mark.parametrize("case", DEVICE_CHECKS)
def test_bad_indices_and_targets_stop_on_the_device(case):
    """Checked on the device, without a host synchronisation: a device-side assert, reported at
    the next synchronisation (as torch's own index checks). It poisons the CUDA context, hence a
    process of its own."""
    import os
    import subprocess
    import sys

    code = "import torch, torchcnn\ntorchcnn.load()\n" + DEVICE_CHECKS[case] + "torch.cuda.synchronize()\n"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode != 0 and "device-side assert" in done.stderr, done.stderr[-2000:]


def test_compile_reduce_overhead_matches_eager():
    torch.manual_seed(0)
    model = _mnist_model(torchcnn.nn).cuda()
    loss_fn = torchcnn.nn.CrossEntropyLoss()

    def step(m, x, y):
        loss = loss_fn(m(x), y)
        return loss.detach(), torch.autograd.grad(loss, list(m.parameters()))

    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # the first calls record, later ones replay the CUDA graph
        x = torch.randn(32, 1, 28, 28, device="cuda")
        y = torch.randint(0, 10, (32,), device="cuda")
        loss_c, grads_c = step(compiled, x, y)
        loss_e, grads_e = step(model, x, y)
        torch.testing.assert_close(loss_c, loss_e)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_tensors_on_a_second_gpu():
    args = _conv_pool_args(device="cuda:1")
    with torch.cuda.device(0):  # the current device is not the tensors'
        got = _forward_backward(*args)
    assert all(t.device == torch.device("cuda:1") for t in got)
    expected = _forward_backward(*[a.detach().cuda(0).requires_grad_() for a in args])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cuda(0), b, rtol=0, atol=0)


def test_inputs_on_different_devices_are_refused():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="weight to be on the same device as input"):
        torch.ops.torchcnn.conv2d(x, w)
    with pytest.raises(ValueError, match="bias to be on the same device as input"):
        torch.ops.torchcnn.conv2d(x, w.cuda(), torch.randn(4))
    out, idx = torch.ops.torchcnn.max_pool2d_with_indices(x, [2, 2], [2, 2])
    with pytest.raises(ValueError, match="indices to be on the same device as input"):
        torch.ops.torchcnn.max_pool2d_backward(out, x, idx.cpu(), [2, 2], [2, 2], [0, 0], [1, 1], False)


def test_gradients_are_bitwise_reproducible():
    args = _conv_pool_args(batch=64)
    first = _forward_backward(*args)
    for _ in range(3):
        for a, b in zip(_forward_backward(*args), first):
            assert torch.equal(a, b)


def test_deterministic_mode_is_deterministic_or_says_why():
    """Under torch.use_deterministic_algorithms(True) the gradients either repeat bit for bit or the
    op raises torch's own error (cuBLAS wants CUBLAS_WORKSPACE_CONFIG set)."""
    args = _conv_pool_args(batch=8)
    torch.use_deterministic_algorithms(True)
    try:
        first = _forward_backward(*args)
    except RuntimeError as error:
        assert "CUBLAS_WORKSPACE_CONFIG" in str(error)
    else:
        for a, b in zip(_forward_backward(*args), first):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


def needs_free_memory(gib):
    free = torch.cuda.mem_get_info()[0] / 2 ** 30 if torch.cuda.is_available() else 0.0
    return pytest.mark.skipif(torch.cuda.is_available() and free < gib, reason=f"needs {gib} GiB of free GPU memory")


@needs_free_memory(24)
def test_max_pool_indexes_past_2_to_the_31_elements():
    """2·32768·32800 > 2^31 input elements: an int32 offset would wrap and read the wrong plane."""
    x = torch.empty(1, 2, 32768, 32800, dtype=torch.float16, device="cuda").uniform_()
    assert x.numel() > 2 ** 31
    x[0, 1, -2:, -2:] = torch.tensor([[3.0, 7.0], [5.0, 1.0]], dtype=torch.float16)
    x.requires_grad_()
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    assert out[0, 1, -1, -1].item() == 7.0 and idx[0, 1, -1, -1].item() == 32766 * 32800 + 32799
    tail = x.detach()[:, :, -64:, -64:]
    torch.testing.assert_close(out[:, :, -32:, -32:], TF.max_pool2d(tail, 2), rtol=0, atol=0)
    grad = torch.zeros_like(out)
    grad[0, 1, -1, -1] = 2.0
    (gx,) = torch.autograd.grad(out, x, grad)
    assert gx[0, 1, -2, -1].item() == 2.0 and gx.sum().item() == 2.0
    del x, out, idx, grad, gx
    torch.cuda.empty_cache()


@needs_free_memory(16)
def test_conv_indexes_past_2_to_the_31_elements():
    """A conv whose input passes 2^31 elements matches torch on its last image."""
    x = torch.randn(42, 4, 3600, 3600, dtype=torch.float16, device="cuda")
    assert x.numel() > 2 ** 31
    w = torch.randn(2, 4, 3, 3, dtype=torch.float16, device="cuda")
    ours = F.conv2d(x, w, padding=1)
    theirs = TF.conv2d(x[-1:], w, padding=1)
    torch.testing.assert_close(ours[-1:], theirs, rtol=2e-3, atol=2e-2)
    del x, ours, theirs
    torch.cuda.empty_cache()
