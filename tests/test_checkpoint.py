"""torchcnn.mnist.checkpoint: what a checkpoint holds (TrainingState), atomic writes, clear errors
for files that are not checkpoints, and checkpoints of format 1 (a real one, fixtures/format1_last.pt)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mnist_support import ROOT, needs_mnist, run_train

from torchcnn.mnist import checkpoint, data, engine
from torchcnn.mnist.checkpoint import CheckpointError, TrainingState
from torchcnn.mnist.cli import RECIPES
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
    """A process killed in the middle of writing a checkpoint: its third save writes half of the
    real bytes, says so, and waits to be killed (SIGKILL: no handler runs, the temporary file is
    left as it was). The file on disk is the second save, whole."""
    path = tmp_path / "last.pt"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import io, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
from torchcnn.mnist import checkpoint
real_save = torch.save

def save_half_then_wait(obj, f):
    whole = io.BytesIO()
    real_save(obj, whole)
    f.write(whole.getvalue()[: whole.tell() // 2])
    f.flush()
    print("in the middle of save 3", flush=True)
    time.sleep(600)

for i in (1, 2, 3):
    if i == 3:
        torch.save = save_half_then_wait
    checkpoint.save({{"backend": "torch", "model": {{"w": torch.full((1_000_000,), float(i))}}}}, {str(path)!r})
    print("saved", i, flush=True)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = [writer.stdout.readline() for _ in range(3)]
        partial = tmp_path / f".last.pt.{writer.pid}.tmp"
        inside = partial.is_file() and partial.stat().st_size > 0  # the kill lands inside a write
    finally:
        writer.kill()
        _, err = writer.communicate()
    assert said == ["saved 1\n", "saved 2\n", "in the middle of save 3\n"], said + [err]
    assert inside
    w = checkpoint.load(path)["model"]["w"]
    assert torch.equal(w, torch.full((1_000_000,), 2.0))


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


# The last.pt of a format-1 run (one epoch of two, Adam, one-cycle, 640 images, a small model),
# written with that format's layout by fixtures/make_format1.py.
FORMAT_1 = Path(__file__).parent / "fixtures" / "format1_last.pt"


def test_format_1_checkpoints_are_read_in_the_current_form():
    raw = torch.load(FORMAT_1, weights_only=True)
    assert raw["version"] == 1 and "args" in raw and "backend" not in raw and "recipe" not in raw
    loaded = checkpoint.load(FORMAT_1)
    assert loaded["version"] == 2 and loaded["backend"] == "torchcnn" and "args" not in loaded
    recipe = loaded["recipe"]
    assert recipe["lr"] == 5e-3  # format 1's --lr None: the default for adam
    assert (recipe["epochs"], recipe["batch_size"], recipe["limit_train"]) == (2, 32, 640)
    assert not {"device", "out", "resume", "data_dir"} & recipe.keys()
    assert recipe["world_size"] == 1  # the one-cycle schedule's 40 steps: 2 epochs of 20, one process alone
    model = checkpoint.load_model(loaded)
    assert model.backend == "torchcnn" and model.config == {"channels": [4, 8], "hidden": 16, "dropout": 0.25}
    torch.manual_seed(0)
    small = MnistNet("torch", channels=(4, 8), hidden=16)
    optimizer = engine.make_optimizer("adam", small.parameters(), lr=5e-3)
    schedule = engine.make_schedule("onecycle", optimizer, lr=5e-3, epochs=2, steps_per_epoch=20)
    restored = TrainingState(small, optimizer, schedule, torch.Generator(), recipe={})
    restored.load_state_dict(loaded)
    assert restored.epoch == 1 and restored.step == 0 and restored.history == raw["history"]
    assert restored.recipe == recipe and schedule.scheduler.last_epoch == 20


def test_format_1_process_count_is_inferred_where_one_count_fits():
    recipe = {"epochs": 2, "batch_size": 32, "limit_train": 640}
    infer = checkpoint._v1_world_size
    assert infer({"scheduler": {"total_steps": 40}}, recipe) == 1  # 20 steps per epoch: 640 images / 1
    assert infer({"scheduler": {"total_steps": 20}}, recipe) == 2  # 10: 320 images per process
    assert infer({"scheduler": {"total_steps": 8}}, recipe) is None  # 4: 5 processes (128 each) or 6 (106)
    adam = {"state": {0: {"step": torch.tensor(60.0)}, 1: {"step": torch.tensor(60.0)}}}
    assert infer({"scheduler": {"step_size": 1}, "optimizer": adam, "epoch": 3, "step": 0}, recipe) == 1
    sgd = {"state": {}}  # plain SGD under a step schedule keeps no count of steps
    assert infer({"scheduler": {"step_size": 1}, "optimizer": sgd, "epoch": 3, "step": 0}, recipe) is None


@needs_mnist
def test_a_run_saved_in_format_1_resumes(tmp_path, monkeypatch, capsys):
    shutil.copy(FORMAT_1, tmp_path / "last.pt")
    # Where the count cannot be inferred, this run's is assumed, and said so.
    monkeypatch.setattr(checkpoint, "_v1_world_size", lambda saved, recipe: None)
    assert run_train(["--resume", tmp_path / "last.pt", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert (f"{tmp_path / 'last.pt'} does not record how many processes trained it (format 1); assuming 1, "
            "as in this run") in printed
    assert "resuming" in printed and "epoch  2/2" in printed
    resumed = checkpoint.load(tmp_path / "last.pt")
    assert resumed["version"] == 2 and resumed["epoch"] == 2 and resumed["backend"] == "torchcnn"
    assert resumed["recipe"]["epochs"] == 2 and resumed["recipe"]["world_size"] == 1
    assert resumed["model_config"] == {"channels": [4, 8], "hidden": 16, "dropout": 0.25}


def test_a_new_folder_is_never_shared(tmp_path):
    assert checkpoint.new_folder(tmp_path / "runs" / "t") == tmp_path / "runs" / "t"
    assert checkpoint.new_folder(tmp_path / "runs" / "t") == tmp_path / "runs" / "t-2"
    assert checkpoint.new_folder(tmp_path / "runs" / "t") == tmp_path / "runs" / "t-3"


def test_a_stale_interrupted_pt_is_removed_once_superseded(tmp_path):
    state = make_state(0)
    state.step = 3
    checkpoint.save(state.state_dict(), tmp_path / "interrupted.pt")  # in epoch 1
    checkpoint.remove_superseded(tmp_path / "interrupted.pt", 0)
    assert (tmp_path / "interrupted.pt").is_file()  # not behind a last.pt of no epochs
    checkpoint.remove_superseded(tmp_path / "interrupted.pt", 1)
    assert not (tmp_path / "interrupted.pt").exists()  # behind a last.pt of epoch 1


def test_the_fast_recipes_model_keeps_its_filters_in_its_config(tmp_path):
    """MnistNet's filter sizes and padding (the fast recipe's unpadded 5×5 and 3×3, 28 → 24 → 12 →
    10 → 5) live in its config, so a checkpoint rebuilds the same model on either backend; a
    config without them means the 3×3 padded filters they were before."""
    fast = RECIPES["fast"].model
    torch.manual_seed(0)
    net = MnistNet("torchcnn", **fast, dropout=0.0)
    assert net.config == {"channels": [24, 32], "hidden": 256, "dropout": 0.0, "kernels": [5, 3], "padding": [0, 0]}
    assert net.classifier[2].weight.shape == (256, 32 * 5 * 5)
    torch.manual_seed(0)
    twin = MnistNet.from_config("torch", net.config)
    images = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(twin(images), net(images), rtol=1e-5, atol=1e-5)
    assert MnistNet("torch").config == {"channels": [32, 64], "hidden": 128, "dropout": 0.25}
    for kernels, padding in [((5, 3), (3, 0)), ((0, 3), (0, 0)), ((13, 13), (0, 0)), ((5,), (0,))]:
        with pytest.raises(ValueError, match="MnistNet: "):
            MnistNet("torch", kernels=kernels, padding=padding)
