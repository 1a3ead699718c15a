"""torchcnn.nn.convert and revert: torch.nn models in one call, torchvision's among them, with
torch's outputs and gradients (float64), state_dicts that move both ways, and fusion exactly where
it is safe."""

import copy

import pytest
import torch

import torchcnn
from torchcnn.nn import Conv2dReLU, Conv2dReLUMaxPool2d, Folded, convert, revert

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.no_emulation

CONVERTED = (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.ReLU, torch.nn.Linear, torch.nn.CrossEntropyLoss)


def _torchvision(name):
    """A torchvision classifier with 10 classes (VGG's and AlexNet's 4096-wide dense layers kept)."""
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


def _kinds(model):
    return {type(m) for m in model.modules()}


def _step(model, x, y):
    """Output and parameter gradients of one training step (dropout drawn from the same seed)."""
    torch.manual_seed(1)
    out = model(x)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), list(model.parameters()))
    return out, grads


# Each model brings something of its own: ResNet's stride-2 7×7 stem, 3×3 stride-2 padded pool and
# 1×1 stride-2 downsample; SqueezeNet's ceil_mode pools and fire modules; GoogLeNet's ceil_mode pools
# with padding and 5×5 branches; MobileNet v3's depthwise convs; RegNet's grouped convs; AlexNet's
# 11×11 stride-4 conv and overlapping 3×3 pools, fused conv → ReLU in its Sequentials (SqueezeNet too);
# DenseNet's concatenations and 1×1 bottlenecks; ShuffleNet's channel shuffles; EfficientNet's and
# MnasNet's 5×5 depthwise convs.
MODELS = {"resnet18": 64, "squeezenet1_1": 64, "googlenet": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64,
          "regnet_x_400mf": 64, "alexnet": 96, "densenet121": 64, "shufflenet_v2_x0_5": 64, "efficientnet_b0": 64,
          "mnasnet0_5": 64}
FUSED = {"alexnet": 5, "squeezenet1_1": 2}


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_models_convert_with_torchs_outputs_and_gradients(name):
    original = _torchvision(name).double()
    converted = convert(original)
    assert _kinds(original) & set(CONVERTED)
    assert not _kinds(converted) & set(CONVERTED), "a torch.nn layer was left unconverted"
    assert sum(type(m) in (Conv2dReLU, Conv2dReLUMaxPool2d) for m in converted.modules()) == FUSED.get(name, 0)
    x = torch.randn(2, 3, MODELS[name], MODELS[name], dtype=torch.float64)
    y = torch.tensor([3, 7])
    out, grads = _step(converted, x, y)
    expected_out, expected_grads = _step(original, x, y)
    torch.testing.assert_close(out, expected_out)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected)
    reverted = revert(converted)
    assert _kinds(reverted) == _kinds(original)
    torch.testing.assert_close(_step(reverted, x, y)[0], expected_out, rtol=0, atol=0)


def test_vgg_features_fuse_every_conv_relu_run():
    """VGG-11's features: 8 conv → ReLU runs, 5 of them followed by a 2×2 pool."""
    original = torchvision.models.vgg11().features.double()
    converted = convert(original)
    assert sum(type(m) is Conv2dReLUMaxPool2d for m in converted.modules()) == 5
    assert sum(type(m) is Conv2dReLU for m in converted.modules()) == 3
    assert sum(type(m) is Folded for m in converted.modules()) == 13
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    out = converted(x)
    torch.testing.assert_close(out, original(x))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(original(x).square().sum(), x)[0])
    assert list(converted.state_dict()) == list(original.state_dict())
    unfused = convert(original, fuse=False)
    assert not {Conv2dReLU, Conv2dReLUMaxPool2d, Folded} & _kinds(unfused)
    reverted = revert(converted)
    assert str(reverted) == str(original) and list(reverted.state_dict()) == list(original.state_dict())


def test_state_dicts_move_both_ways():
    original = _torchvision("resnet18")
    converted = convert(original)
    fresh = convert(_torchvision("resnet18"))
    fresh.load_state_dict(original.state_dict())  # torch.nn's weights into a converted model
    plain = _torchvision("resnet18")
    plain.load_state_dict(converted.state_dict())  # and back
    for a, b, c in zip(original.state_dict().values(), fresh.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_convert_keeps_hooks_mode_parameters_and_the_original():
    calls = []
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 3 * 3, 2)).eval()
    model[0].register_forward_hook(lambda module, args, out: calls.append(type(module)))
    before = copy.deepcopy(model.state_dict())
    converted = convert(model)
    assert type(model[0]) is torch.nn.Conv2d  # inplace=False leaves the original alone
    assert type(converted[0]) is torchcnn.nn.Conv2d and not converted.training
    assert type(converted[1]) is torchcnn.nn.ReLU  # a hooked conv is not fused: the hook sees the conv's output
    converted(torch.randn(2, 1, 8, 8))
    assert calls == [torchcnn.nn.Conv2d]
    same = convert(model, inplace=True)
    assert same is model and type(model[4]) is torchcnn.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_convert_keeps_the_optimizers_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    convert(model, inplace=True)
    assert type(model[0]) is Conv2dReLUMaxPool2d and all(p is q for p, q in zip(model.parameters(), params))
    model(torch.randn(1, 1, 6, 6)).sum().backward()
    optimizer.step()
    assert all(p.grad is not None for p in params)


def test_only_safe_runs_fuse():
    shared = torch.nn.Conv2d(2, 2, 3, padding=1)

    class Custom(torch.nn.Module):  # a forward of its own: no fusion (conv's output is used twice)
        def __init__(self):
            super().__init__()
            self.conv, self.relu = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.relu(y) + y

    class Conv(torch.nn.Conv2d):  # a subclass: not converted
        pass

    model = torch.nn.Sequential(
        shared, torch.nn.ReLU(), shared,  # a conv used twice
        Custom(),
        torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2),  # not a 2×2 pool
        torch.nn.Conv2d(2, 2, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2, return_indices=False, ceil_mode=True),
        Conv(2, 2, 1))
    converted = convert(model)
    kinds = [type(m) for m in converted]
    assert kinds == [torchcnn.nn.Conv2d, torchcnn.nn.ReLU, torchcnn.nn.Conv2d, Custom, Conv2dReLU, Folded,
                     torchcnn.nn.MaxPool2d, Conv2dReLUMaxPool2d, Folded, Folded, Conv]
    assert converted[3].conv.__class__ is torchcnn.nn.Conv2d and converted[7].ceil_mode
    x = torch.randn(1, 2, 13, 13)
    torch.testing.assert_close(converted(x), model(x))
    assert [type(m) for m in revert(converted)] == [type(m) for m in model]


def test_revert_unfolds_fused_layers_built_directly():
    model = torch.nn.Sequential(Conv2dReLUMaxPool2d(1, 2, 3, ceil_mode=True), Conv2dReLU(2, 2, 1))
    reverted = revert(model)
    assert str(reverted[0]) == str(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
                                                        torch.nn.MaxPool2d(2, 2, ceil_mode=True)))
    assert type(reverted[1][0]) is torch.nn.Conv2d and type(reverted[1][1]) is torch.nn.ReLU
    assert type(model[0]) is Conv2dReLUMaxPool2d  # inplace=False
    x = torch.randn(2, 1, 9, 9)
    torch.testing.assert_close(reverted(x), model(x))
    assert list(reverted.state_dict()) == ["0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias"]
    alone = revert(Conv2dReLU(1, 2, 3))
    assert [type(m) for m in alone] == [torch.nn.Conv2d, torch.nn.ReLU]
    orphan = revert(torch.nn.Sequential(Folded(torchcnn.nn.ReLU())))
    assert type(orphan[0]) is torch.nn.Identity  # what it computed


@pytest.mark.parametrize("fn", [convert, revert])
def test_a_non_module_is_refused(fn):
    with pytest.raises(TypeError, match=f"{fn.__name__}: expected module to be a torch.nn.Module but got dict"):
        fn({})


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed in this build")
def test_fsdp2_trains_a_converted_model_as_the_torch_nn_one(built, tmp_path):
    """fully_shard over every conv and dense layer (two of them fused), two CPU processes (gloo): the
    converted model's losses and final parameters are the torch.nn model's."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2 in this torch")
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(here, "fsdp_check.py")], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["unconverted"] == [] and report["fused"] == 2
    torch.testing.assert_close(report["ours"], report["theirs"])
    assert report["ours"][-1] < report["ours"][0]  # it trains
    assert report["difference"] < 1e-12
