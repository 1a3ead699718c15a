"""torchcnn.mnist.checkpoint: what a checkpoint holds (TrainingState), atomic writes, clear errors
for files that are not checkpoints, and the checkpoints of torchcnn 0.1.0 (format version 1)."""

import subprocess
import sys
import time

import pytest
import torch
from mnist_support import ROOT, TINY, needs_mnist, run_train

from torchcnn.mnist import checkpoint, data, engine
from torchcnn.mnist.checkpoint import CheckpointError, TrainingState
from torchcnn.mnist.model import MnistNet, loss_function


def make_state(seed: int, backend: str = "torch") -> TrainingState:
    torch.manual_seed(seed)
    model = MnistNet(backend, channels=(4, 8), hidden=16)
    optimizer = engine.make_optimizer("adam", model.parameters(), lr=1e-3)
    schedule = engine.make_schedule("onecycle", optimizer, lr=1e-3, epochs=2, steps_per_epoch=4)
    return TrainingState(model, optimizer, schedule, torch.Generator().manual_seed(seed),
                         recipe={"epochs": 2, "lr": 1e-3, "seed": seed})


def assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_training_state_round_trips_through_a_file(tmp_path):
    state = make_state(0)
    images, labels = torch.randint(0, 255, (32, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (32,))
    state.begin_epoch()
    batches = data.Batches(images, labels, 8, state.data_rng, max_shift=1)
    state.totals, state.step = engine.train_epoch(state.model, loss_function("torch"), state.optimizer,
                                                  state.schedule, batches, stop=lambda step: step == 3)
    state.history.append({"epoch": 0, "test_accuracy": 0.5})
    state.train_seconds, state.best_accuracy = 1.5, 0.5
    saved = state.state_dict()
    checkpoint.save(saved, tmp_path / "interrupted.pt")

    restored = make_state(1)  # other weights, other generators
    restored.load_state_dict(checkpoint.load(tmp_path / "interrupted.pt"))
    again = restored.state_dict()
    assert_same(again, saved)
    assert saved["step"] == 3 and saved["totals"]["count"] == 24 and saved["backend"] == "torch"
    # Mid-epoch, the data generator is kept as the epoch found it: the epoch's batches come again.
    assert torch.equal(saved["data_rng"], state.epoch_rng) and not torch.equal(saved["data_rng"],
                                                                              state.data_rng.get_state())
    redrawn = data.Batches(images, labels, 8, restored.data_rng, max_shift=1)
    assert torch.equal(redrawn.batch(3)[0], batches.batch(3)[0])


def test_a_finished_epoch_keeps_the_generator_as_it_is(tmp_path):
    state = make_state(0)
    state.begin_epoch()
    torch.randperm(10, generator=state.data_rng)
    state.end_epoch({"epoch": 1})
    saved = state.state_dict()
    assert saved["epoch"] == 1 and saved["step"] == 0 and saved["totals"] is None
    assert torch.equal(saved["data_rng"], state.data_rng.get_state())


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"backend": "torch", "model": {"w": torch.ones(3)}}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"backend": "torch", "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_killed_writer_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from torchcnn.mnist import checkpoint
for i in range(10**6):
    checkpoint.save({{"backend": "torch", "model": {{"w": torch.full((4_000_000,), float(i))}}}}, {str(path)!r})
    print(i, flush=True)
"""], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let a few saves complete, then kill it in the middle of another one
        writer.stdout.readline()
    time.sleep(0.05)
    writer.kill()
    writer.wait()
    w = checkpoint.load(path)["model"]["w"]
    assert torch.equal(w, torch.full_like(w, w[0].item()))  # one whole version, not a mixture


def test_bad_checkpoints_get_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    model = MnistNet("torch")
    checkpoint.save({"backend": "torch", "model": model.state_dict(), "model_config": model.config}, good)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a torch.save"):
        checkpoint.load(truncated)

    # Text and random bytes: the unpickler fails in many ways (IndexError for this one), all reported alike.
    for name, content in (("notes.txt", b"not a checkpoint"), ("passwd", b"root:x:0:0:root:/root:/bin/bash\n"),
                          ("noise.pt", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot be read"):
            checkpoint.load(tmp_path / name)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match="not a torchcnn training checkpoint"):
        checkpoint.load(foreign)

    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")

    future = tmp_path / "future.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 99}, future)
    with pytest.raises(CheckpointError, match="format version 99; this torchcnn reads versions 1 and 2"):
        checkpoint.load(future)

    wider = MnistNet("torch", channels=(16, 64))
    with pytest.raises(CheckpointError, match="configuration"):
        checkpoint.load_model_state(wider, checkpoint.load(good))
    other = torch.nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match="another architecture"):
        checkpoint.load_model_state(other, checkpoint.load(good))
    with pytest.raises(CheckpointError, match="can be evaluated, not resumed"):
        make_state(0).load_state_dict(checkpoint.load(good))


def test_a_pickled_object_is_refused_without_torchs_unsafe_advice(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save(MnistNet("torch"), pickled)  # the whole module, pickled: not something to unpickle blindly
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(pickled)
    message = str(error.value)
    assert "holds Python objects other than tensors and plain values" in message
    assert "weights_only" not in message and "arbitrary code" not in message


def as_version_1(saved: dict, **args) -> dict:
    """A checkpoint as torchcnn 0.1.0 wrote it: every argument under "args", the backend among them."""
    old = {k: v for k, v in saved.items() if k not in ("backend", "recipe")}
    recipe = {k: v for k, v in saved["recipe"].items() if k != "world_size"}
    v1_args = {"device": "cpu", "backend": saved["backend"], "data_dir": "./data", "no_download": True,
               "test_batch_size": 1000, "out": None, "resume": None, "eval": None, "no_plots": True,
               "quiet": True, **recipe, **args}
    return {**old, "version": 1, "args": v1_args, "torchcnn": "0.1.0"}


def test_version_1_checkpoints_are_read_in_the_current_form(tmp_path):
    state = make_state(0, backend="torch")
    state.end_epoch({"epoch": 1, "test_accuracy": 0.9})
    old = as_version_1({"format": checkpoint.FORMAT, **state.state_dict()}, lr=None, optimizer="adam")
    torch.save(old, tmp_path / "v1.pt")
    loaded = checkpoint.load(tmp_path / "v1.pt")
    assert loaded["version"] == 2 and loaded["backend"] == "torch" and "args" not in loaded
    assert loaded["recipe"]["lr"] == 5e-3  # 0.1.0's default for adam, when --lr was not given
    assert loaded["recipe"]["epochs"] == 2 and "device" not in loaded["recipe"]
    model = checkpoint.load_model(loaded)
    assert model.backend == "torch" and model.config == state.model.config
    restored = make_state(1)
    restored.load_state_dict(loaded)
    assert restored.epoch == 1 and restored.history == [{"epoch": 1, "test_accuracy": 0.9}]


@needs_mnist
def test_a_run_saved_by_version_1_resumes(tmp_path, capsys):
    assert run_train([*TINY, "--epochs", 1, "--schedule", "step", "--no-plots", "--out", tmp_path]) == 0
    saved = checkpoint.load(tmp_path / "last.pt")
    torch.save(as_version_1({"format": checkpoint.FORMAT, **saved}, epochs=2), tmp_path / "v1.pt")
    capsys.readouterr()
    assert run_train(["--resume", tmp_path / "v1.pt", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "epoch  2/2" in printed
    resumed = checkpoint.load(tmp_path / "last.pt")
    assert resumed["epoch"] == 2 and resumed["recipe"]["epochs"] == 2 and resumed["backend"] == "torchcnn"
