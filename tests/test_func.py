"""torch.func: vmap (batched inputs, batched weights, per-sample gradients), forward-mode AD
(jvp, jacfwd) and their compositions, against the same transforms of torch's built-ins."""

import pytest
import torch
import torch.nn.functional as TF
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import torchcnn.functional as F
from models import ResNetBlock, SmallCNN, twins

KW = dict(stride=(2, 1), padding=1, dilation=(1, 2))


def _t(*shape, device):
    return torch.randn(*shape, dtype=torch.float64, device=device)


@pytest.mark.parametrize("in_dims", [(0, None, None), (None, 0, None), (None, 0, 0), (1, 0, None), (0, 0, 0)])
@pytest.mark.parametrize("groups", [1, 2])
def test_vmap_conv2d(device, in_dims, groups):
    batch = 3
    shapes = [(2, 4, 7, 6), (6, 4 // groups, 3, 2), (6,)]
    args = [_t(*((batch, *s) if d == 0 else (s[0], batch, *s[1:]) if d == 1 else s), device=device)
            for s, d in zip(shapes, in_dims)]
    ours = vmap(lambda x, w, b: F.conv2d(x, w, b, groups=groups, **KW), in_dims=in_dims)(*args)
    theirs = vmap(lambda x, w, b: TF.conv2d(x, w, b, groups=groups, **KW), in_dims=in_dims)(*args)
    torch.testing.assert_close(ours, theirs)


def test_vmap_unbatched_conv2d_and_pool(device):
    x, w = _t(5, 3, 8, 8, device=device), _t(4, 3, 3, 3, device=device)  # vmap over (C, H, W) images
    ours = vmap(lambda t: F.max_pool2d(F.conv2d(t, w, padding=1), 3, 2, 1, return_indices=True))(x)
    theirs = vmap(lambda t: TF.max_pool2d(TF.conv2d(t, w, padding=1), 3, 2, 1, return_indices=True))(x)
    torch.testing.assert_close(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])


def test_nested_vmap(device):
    x, w = _t(2, 3, 1, 2, 6, 6, device=device), _t(3, 4, 2, 3, 3, device=device)
    inner = (0, 0)  # over the 3: images and weights together
    ours = vmap(vmap(lambda a, b: F.max_pool2d(F.conv2d(a, b), 2), in_dims=inner), in_dims=(0, None))(x, w)
    theirs = vmap(vmap(lambda a, b: TF.max_pool2d(TF.conv2d(a, b), 2), in_dims=inner), in_dims=(0, None))(x, w)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("model_class", [SmallCNN, ResNetBlock])
def test_per_sample_gradients(device, model_class):
    """The Opacus pattern: vmap(grad(loss)) over the samples, the parameters shared."""
    ours, theirs = twins(model_class, device)
    channels = 1 if model_class is SmallCNN else 3
    x, y = _t(4, channels, 10, 10, device=device), torch.randint(0, 5, (4,), device=device)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return TF.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, expected = per_sample(ours), per_sample(theirs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=lambda m: f"{name}: {m}")
    # and they are per-sample: their mean is the batch gradient
    loss = TF.cross_entropy(ours(x), y)
    for (name, p), g in zip(ours.named_parameters(), torch.autograd.grad(loss, list(ours.parameters()))):
        torch.testing.assert_close(got[name].mean(0), g, msg=lambda m: f"{name}: {m}")


def test_jvp_conv2d_and_pool(device):
    x, w, b = _t(2, 3, 9, 8, device=device), _t(4, 3, 3, 3, device=device), _t(4, device=device)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))

    def net(lib):
        return lambda x, w, b: lib.max_pool2d(lib.conv2d(x, w, b, **KW), 2, ceil_mode=True)

    ours = jvp(net(F), (x, w, b), tangents)
    theirs = jvp(net(TF), (x, w, b), tangents)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


def test_jacfwd_matches_jacrev_and_torch(device):
    x, w = _t(1, 2, 5, 5, device=device), _t(3, 2, 2, 2, device=device)

    def net(lib):
        return lambda x, w: lib.max_pool2d(lib.conv2d(x, w, padding=1), 2, stride=1, dilation=2).square()

    expected = jacrev(net(TF), argnums=(0, 1))(x, w)
    for transform in (jacfwd, jacrev):
        for a, e in zip(transform(net(F), argnums=(0, 1))(x, w), expected):
            torch.testing.assert_close(a, e)


def test_hessian_forward_over_reverse(device):
    x, w = _t(1, 2, 4, 4, device=device), _t(2, 2, 3, 3, device=device)

    def loss(lib):
        return lambda w: lib.max_pool2d(lib.conv2d(x, w, padding=1), 2).pow(3).sum()

    torch.testing.assert_close(torch.func.hessian(loss(F))(w), torch.func.hessian(loss(TF))(w))


def test_raw_ops_under_torch_func_name_the_route_that_works(device):
    """torch.func's differentiating transforms cannot take a Function from inside a dispatcher
    kernel: the ops called directly under them say so (rather than lose a tangent), naming the
    route that works."""
    x, w = _t(1, 2, 5, 5, device=device), _t(3, 2, 3, 3, device=device)
    with pytest.raises(NotImplementedError, match="through torchcnn.functional"):
        jvp(lambda t: torch.ops.torchcnn.conv2d(t, w), (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="Function .torchcnn._ops.MaxPool2dFunction"):
        jvp(lambda t: torch.ops.torchcnn.max_pool2d_with_indices(t, [2, 2], [2, 2])[0], (x,), (torch.ones_like(x),))


def test_raw_ops_take_dual_tensors(device):
    """torch.autograd.forward_ad's dual tensors go through the ops called directly, gradient ops
    included: the tangents are the Functions' jvp."""
    x, w = _t(1, 2, 5, 5, device=device), _t(3, 2, 3, 3, device=device)
    g, tx = torch.randn(1, 3, 3, 3, dtype=x.dtype, device=device), torch.randn_like(x)
    expected = jvp(lambda t: TF.conv2d(t, w), (x,), (tx,))
    expected_weight_grad = jvp(lambda t: torch.ops.aten.convolution_backward(
        g, t, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1], (x,), (tx,))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tx)
        y = torch.autograd.forward_ad.unpack_dual(torch.ops.torchcnn.conv2d(dual, w))
        grad = torch.autograd.forward_ad.unpack_dual(
            torch.ops.torchcnn.conv2d_backward_weight(g, dual, w, [1, 1], [0, 0], [1, 1], 1))
    torch.testing.assert_close((y.primal, y.tangent), expected)
    torch.testing.assert_close((grad.primal, grad.tangent), expected_weight_grad)


def test_bias_tangent_alone(device):
    x, w, b = _t(2, 3, 6, 6, device=device), _t(4, 3, 3, 3, device=device), _t(4, device=device)
    tb = torch.randn_like(b)
    ours = jvp(lambda b: F.conv2d(x, w, b, padding=1), (b,), (tb,))
    theirs = jvp(lambda b: TF.conv2d(x, w, b, padding=1), (b,), (tb,))
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(jacfwd(lambda b: F.conv2d(x, w, b), argnums=0)(b),
                               jacfwd(lambda b: TF.conv2d(x, w, b), argnums=0)(b))


@pytest.mark.parametrize("case", ["conv", "pool", "network"])
def test_hessian_where_the_gradient_does_not_depend_on_the_variable(device, case):
    """Forward-over-reverse through a gradient op whose tangent comes only through its shape-only
    argument (a loss linear after the layer): the tangent is zero, as torch's."""
    x = _t(1, 1, 6, 6, device=device)
    w = _t(2, 1, 3, 3, device=device)
    ours, theirs = twins(SmallCNN, device)
    image = _t(1, 1, 10, 10, device=device)
    fns = {
        "conv": (lambda t: F.conv2d(t, w).sum(), lambda t: TF.conv2d(t, w).sum()),
        "pool": (lambda t: F.max_pool2d(t, 2).sum(), lambda t: TF.max_pool2d(t, 2).sum()),
        "network": (lambda t: ours(image + t.mean())[0, 3], lambda t: theirs(image + t.mean())[0, 3]),
    }[case]
    torch.testing.assert_close(torch.func.hessian(fns[0])(x), torch.func.hessian(fns[1])(x))


def test_vmap_over_an_empty_batch(device):
    x, w = _t(3, 0, 2, 6, 6, device=device), _t(4, 2, 3, 3, device=device)
    for lib in (F, TF):
        y = vmap(lambda t: lib.max_pool2d(lib.conv2d(t, w, padding=1), 2))(x)
        assert y.shape == (3, 0, 4, 3, 3)
    ws = _t(3, 4, 2, 3, 3, device=device)
    assert vmap(lambda t, v: F.conv2d(t, v))(x, ws).shape == (3, 0, 4, 4, 4)


def test_forward_ad_dual_tensors(device):
    """torch.autograd.forward_ad (dual tensors), the non-functorch route to forward mode."""
    fwd = torch.autograd.forward_ad
    x, w = _t(2, 3, 7, 7, device=device), _t(4, 3, 3, 3, device=device)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    results = []
    for lib in (F, TF):
        with fwd.dual_level():
            y = lib.max_pool2d(lib.conv2d(fwd.make_dual(x, tx), fwd.make_dual(w, tw), padding=1), 3, 2, 1)
            primal, tangent = fwd.unpack_dual(y)
            results.append((primal.clone(), tangent.clone()))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e)
