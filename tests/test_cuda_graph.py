"""train.py --cuda-graphs: torchcnn/mnist/cuda_graph.py's GraphedTrainStep.

On the CPU a stand-in graph whose replay calls the captured function again holds the class's
bookkeeping (static inputs, hyperparameters a schedule changes, eager fallbacks, refusals) to
eager training; on a GPU the real CUDA graph is held to eager training too."""

import contextlib
import copy

import pytest
import torch
from mnist_support import TINY, metrics, needs_mnist, run_train

from torchcnn.mnist import checkpoint, data, engine
from torchcnn.mnist.cuda_graph import GraphedTrainStep
from torchcnn.mnist.model import MnistNet, loss_function

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class ReplayByCalling:
    """CudaGraph's interface on the CPU: capture keeps the function, each replay calls it. Exactly
    what a CUDA graph does, provided the function only reads the tensors it was captured with."""

    def __init__(self):
        self.fn, self.captures = None, 0

    def warmup(self):
        return contextlib.nullcontext()

    def capture(self, fn):
        self.fn, self.captures = fn, self.captures + 1

    def replay(self):
        return self.fn()


def digits(n=200, seed=0):
    """Learnable fake digits: a bright bar whose row is the label."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = torch.randint(0, 64, (n, 28, 28), dtype=torch.uint8, generator=gen)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 255
    return images, labels


def train(graphed: bool, *, epochs=2, optimizer="adam", schedule="onecycle", graph=None, batch_size=32):
    """``epochs`` epochs of the fast recipe's model under a one-cycle schedule (which changes the
    learning rate and Adam's β₁ every step); returns the model, the totals and the step."""
    torch.manual_seed(0)
    model = MnistNet("torchcnn", channels=(8, 16), hidden=32, dropout=0.1)
    loss_fn = loss_function("torchcnn")
    opt = engine.make_optimizer(optimizer, model.parameters(), lr=1e-2)
    images, labels = digits()
    steps_per_epoch = data.Batches.per_epoch(len(labels), batch_size)  # 200 / 32: the last batch is short
    schedule = engine.make_schedule(schedule, opt, lr=1e-2, epochs=epochs, steps_per_epoch=steps_per_epoch)
    # The reference steps eagerly with the same device hyperparameters (never capturing): float32
    # learning rates step differently from Python's, and a few steps of Adam amplify any difference.
    step = GraphedTrainStep(model, loss_fn, opt, graph=graph or ReplayByCalling(), warmup=3 if graphed else 10**9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(epochs):
        batches = data.Batches(images, labels, batch_size, gen, max_shift=1)
        totals, _ = engine.train_epoch(model, loss_fn, opt, schedule, batches, step=step)
        losses.append(totals.mean_loss)
    return model, opt, losses, step


def assert_same_training(eager, graphed, **tolerances):
    (m1, _, losses1, _), (m2, _, losses2, _) = eager, graphed
    assert losses1[-1] < losses1[0]  # it learns
    torch.testing.assert_close(losses2, losses1, **tolerances)
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(b, a, **tolerances, msg=name)


def test_replayed_steps_train_as_eager_steps():
    """Every batch reaches the captured inputs, the schedule's learning rate and β₁ reach the
    captured update, and the short last batch of each epoch steps eagerly."""
    graph = ReplayByCalling()
    graphed = train(True, graph=graph)
    assert_same_training(train(False), graphed, rtol=0, atol=0)
    step = graphed[3]
    assert graph.captures == 1 and step.replays == 2 * 6 - 3 and step.eager_steps == 3 + 2
    assert all(p.grad is not None for p in graphed[0].parameters())


def test_adadelta_is_captured_too():
    """With a schedule that changes the learning rate once an epoch (OneCycleLR needs a β₁)."""
    graphed = train(True, optimizer="adadelta", schedule="step")
    assert_same_training(train(False, optimizer="adadelta", schedule="step"), graphed, rtol=0, atol=0)
    assert graphed[3].replays == 2 * 6 - 3


def small_step(optimizer="adam", warmup=1):
    torch.manual_seed(0)
    model = MnistNet("torchcnn", channels=(4, 8), hidden=16)
    opt = engine.make_optimizer(optimizer, model.parameters(), lr=1e-3)
    step = GraphedTrainStep(model, loss_function("torchcnn"), opt, graph=ReplayByCalling(), warmup=warmup)
    images, labels = digits(8)
    return model, opt, step, data.normalize(images), labels


def test_the_schedules_beta1_and_lr_reach_the_update():
    """OneCycleLR assigns a new β₁ (a number) and fills the tensor learning rate every step: both
    are in the device tensors the captured update reads when the next step runs."""
    model, opt, step, images, labels = small_step()
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    for _ in range(6):
        beta1, lr = float(opt.param_groups[0]["betas"][0]), float(opt.param_groups[0]["lr"])
        step(images, labels)
        assert opt.param_groups[0]["betas"][0].item() == pytest.approx(beta1)
        assert opt.param_groups[0]["lr"].item() == pytest.approx(lr)
        assert isinstance(opt.param_groups[0]["betas"][1], float) and opt.param_groups[0]["foreach"] is False
        schedule.step()
    assert step.replays == 5
    state = checkpoint.plain_numbers(schedule.state_dict())
    assert all(isinstance(lr, float) for lr in state["_last_lr"])


def test_the_graph_is_not_captured_on_a_short_batch():
    """Warm-up over, a short batch steps eagerly, and the capture waits for two alike in a row."""
    _, _, step, images, labels = small_step(warmup=2)
    for n in (8, 8, 5, 8, 8, 5, 8):
        step(images[:n], labels[:n])
    assert (step.eager_steps, step.replays) == (5, 2)


def test_a_model_in_another_mode_steps_eagerly():
    model, _, step, images, labels = small_step()
    step(images, labels)
    step(images, labels)
    assert (step.eager_steps, step.replays) == (1, 1)
    model.eval()
    step(images, labels)
    assert (step.eager_steps, step.replays) == (2, 1)
    model.train()
    step(images, labels)
    assert (step.eager_steps, step.replays) == (2, 2)


def test_a_hyperparameter_changed_after_capture_is_refused():
    _, opt, step, images, labels = small_step()
    step(images, labels)
    step(images, labels)
    opt.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(RuntimeError, match="weight_decay changed from 0.0 to 0.1 after the step was captured"):
        step(images, labels)


def test_replaced_optimizer_state_is_refused():
    model, opt, step, images, labels = small_step()
    step(images, labels)
    step(images, labels)
    opt.load_state_dict(copy.deepcopy(checkpoint.portable_optimizer_state(opt)))  # new state tensors
    with pytest.raises(RuntimeError, match="optimizer state tensor was replaced after the step was captured"):
        step(images, labels)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_optimizers_that_cannot_be_captured_are_refused(optimizer):
    with pytest.raises(ValueError, match="optimizer SGD cannot be captured in a CUDA graph"):
        small_step(optimizer)


def test_refusals_name_what_was_expected():
    model = MnistNet("torchcnn", channels=(4, 8), hidden=16)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, not cpu"):
        GraphedTrainStep(model, loss_function("torchcnn"), opt)
    with pytest.raises(ValueError, match="expected warmup to be at least 1 but got 0"):
        GraphedTrainStep(model, loss_function("torchcnn"), opt, warmup=0, graph=ReplayByCalling())


def test_a_checkpoint_holds_plain_hyperparameters():
    """The device tensors a graphed step keeps its learning rate and β in are saved as numbers, so a
    plain optimizer (another run, without --cuda-graphs) loads them and steps alike."""
    model, opt, step, images, labels = small_step()
    for _ in range(3):
        step(images, labels)
    assert torch.is_tensor(opt.param_groups[0]["lr"])
    saved = checkpoint.portable_optimizer_state(opt)
    group = saved["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3) and group["betas"] == pytest.approx((0.9, 0.999))
    assert isinstance(group["lr"], float) and all(isinstance(b, float) for b in group["betas"])
    assert group["capturable"] is False
    plain = torch.optim.Adam(model.parameters(), lr=0.5)
    plain.load_state_dict(saved)
    torch.testing.assert_close(plain.state[next(model.parameters())]["exp_avg"],
                               opt.state[next(model.parameters())]["exp_avg"])


def test_cli_refuses_cuda_graphs_where_they_cannot_run(capsys):
    with pytest.raises(SystemExit) as stopped:
        run_train(["--cuda-graphs", "--optimizer", "sgd"])
    assert stopped.value.code == 2
    assert "argument --cuda-graphs: sgd's update reads its learning rate on the host" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        run_train(["--cuda-graphs", "--device", "cpu", "--data-dir", "/nonexistent"])
    assert stopped.value.code == 2
    assert "argument --cuda-graphs: needs a CUDA device, and this run is on cpu" in capsys.readouterr().err


@needs_cuda
def test_cuda_graph_trains_as_eager_steps():
    """The real capture: the same training as kernel-by-kernel steps on the GPU (dropout draws
    differ between a graph and eager steps, so without dropout), replayed most of the time."""
    def run(graphed):
        torch.manual_seed(0)
        model = MnistNet("torchcnn", channels=(8, 16), hidden=32, dropout=0.0).cuda()
        loss_fn = loss_function("torchcnn")
        opt = engine.make_optimizer("adam", model.parameters(), lr=1e-2)
        images, labels = digits()
        schedule = engine.make_schedule("onecycle", opt, lr=1e-2, epochs=2, steps_per_epoch=7)
        step = None
        if graphed:
            graphed_step = GraphedTrainStep(model, loss_fn, opt)

            def step(images, labels):  # a replay and its bookkeeping never wait for the GPU
                # (a host read inside the capture fails the capture itself)
                torch.cuda.set_sync_debug_mode("error" if graphed_step.replays else "default")
                try:
                    return graphed_step(images, labels)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            step.replays = lambda: graphed_step.replays
        gen, losses = torch.Generator().manual_seed(1), []
        for _ in range(2):
            batches = data.Batches(images.cuda(), labels.cuda(), 32, gen, max_shift=1)
            totals, _ = engine.train_epoch(model, loss_fn, opt, schedule, batches, step=step)
            losses.append(totals.mean_loss)
        return model, opt, losses, step

    eager, graphed = run(False), run(True)
    assert_same_training(eager, graphed, rtol=1e-3, atol=1e-4)
    assert graphed[3].replays() == 2 * 7 - 3 - 2


@needs_cuda
@needs_mnist
def test_train_py_with_cuda_graphs(tmp_path):
    """A short run of train.py --cuda-graphs; its checkpoint loads into a plain CPU optimizer."""
    out = tmp_path / "run"
    assert run_train([*TINY, "--device", "cuda", "--cuda-graphs", "--no-plots", "--out", out]) == 0
    m = metrics(out)
    assert m["args"]["cuda_graphs"] and m["test_accuracy"] > 0.5
    saved = checkpoint.load(out / "last.pt")
    group = saved["optimizer"]["param_groups"][0]
    assert isinstance(group["lr"], float) and group["capturable"] is False
    model = checkpoint.load_model(saved, out / "last.pt", backend="torchcnn")
    torch.optim.Adam(model.parameters()).load_state_dict(saved["optimizer"])
