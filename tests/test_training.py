"""Training runs end to end (train.py on the real MNIST files, briefly): accuracy, outputs, the two
backends, evaluation, stopping by signal and resuming where the run stopped."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from mnist_support import MNIST_DIR, ROOT, TINY, metrics, needs_mnist, run_train, short_run, train_command

from torchcnn.mnist import checkpoint, data, engine, plots, run
from torchcnn.mnist.model import MnistNet, loss_function


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return short_run(tmp_path_factory)


@needs_mnist
def test_short_real_run_reaches_96_percent(trained):
    m = metrics(trained)
    # About 96 % (95.95 % with the loss op, 96.05 % with the loss composed of torch ops: rounding
    # differences that a short run carries to the second decimal).
    assert m["test_accuracy"] >= 0.955, m["test_accuracy"]
    assert m["history"][0]["train_images"] == 12000 and m["backend"] == "torchcnn" and m["stopped"] is None
    assert m["world_size"] == 1 and m["seed"] == 1 and m["args"]["limit_test"] == 2000
    for name in ("last.pt", "best.pt", "curves.png", "confusion.png", "filters.png", "mistakes.png"):
        assert (trained / name).stat().st_size > 0, name
    assert not list(trained.glob(".*.tmp"))
    saved = checkpoint.load(trained / "last.pt")
    assert saved["backend"] == "torchcnn" and saved["recipe"]["lr"] == 5e-3 and saved["recipe"]["world_size"] == 1


@needs_mnist
@pytest.mark.parametrize("backend", ["torchcnn", "torch"])
def test_eval_reports_the_checkpoints_accuracy(trained, backend, capsys):
    """On either backend: their weights are interchangeable."""
    assert run_train(["--eval", trained / "last.pt", "--limit-test", 2000, "--backend", backend]) == 0
    printed = capsys.readouterr().out
    assert f"test accuracy {100 * metrics(trained)['test_accuracy']:.2f}%" in printed


def test_backends_give_the_same_losses():
    """The same seed and batches through torchcnn's layers and torch.nn's: the same first steps."""
    labels = torch.randint(0, 10, (256,))
    images = torch.randint(0, 64, (256, 28, 28), dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):  # learnable: a bright bar whose row is the label
        images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 255
    losses = {}
    for backend in ("torchcnn", "torch"):
        torch.manual_seed(0)
        model = MnistNet(backend)
        optimizer = engine.make_optimizer("momentum", model.parameters(), lr=0.05)
        schedule = engine.make_schedule("none", optimizer, lr=0.05, epochs=1, steps_per_epoch=8)
        batches = data.Batches(images, labels, 32, torch.Generator().manual_seed(0), max_shift=2)
        steps = []
        for i in range(len(batches)):
            totals, _ = engine.train_epoch(model, loss_function(backend), optimizer, schedule, batches,
                                           start=i, stop=lambda step: True)
            steps.append(totals.mean_loss)
        losses[backend] = torch.tensor(steps)
    assert losses["torch"][-1] < losses["torch"][0]  # it learns something
    torch.testing.assert_close(losses["torchcnn"], losses["torch"], rtol=1e-4, atol=1e-5)


def test_evaluation_counts_every_test_image_once():
    torch.manual_seed(0)
    model = MnistNet("torch")
    images, labels = torch.randint(0, 255, (25, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (25,))
    totals = engine.evaluate(model, loss_function("torch"), data.Batches(images, labels, 10))
    with torch.no_grad():
        logits = model.eval()(data.normalize(images))
    assert totals.count == 25 and totals.correct.item() == (logits.argmax(1) == labels).sum().item()
    torch.testing.assert_close(totals.mean_loss, torch.nn.functional.cross_entropy(logits, labels).item())
    assert torch.equal(engine.predict(model, data.Batches(images, labels, 10)), logits.argmax(1))


def test_curves_mark_whole_epochs(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.append(fig))
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1 / e, "train_accuracy": 0.9, "test_accuracy": 0.9}
               for e in (1, 2, 3)]
    plots.curves(history, tmp_path / "curves.png")
    for ax in figures[0].axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def stop_on(monkeypatch, method: str, call: int, signum=signal.SIGTERM):
    """Send ``signum`` to this process when StopRequest.``method`` is called the ``call``-th time:
    __call__ is asked after every step, agreed() before every epoch."""
    calls, original = {"n": 0}, getattr(engine.StopRequest, method)

    def check(self, *args):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signum)
        return original(self, *args)

    monkeypatch.setattr(engine.StopRequest, method, check)


@needs_mnist
def test_resume_after_a_stop_equals_a_run_never_stopped(tmp_path, monkeypatch, capsys):
    args = [*TINY, "--schedule", "step"]
    assert run_train([*args, "--no-plots", "--out", tmp_path / "straight"]) == 0

    # Stopped by SIGTERM in the middle of epoch 2 (step 27 of 40): interrupted.pt, and the outputs
    # of epoch 1, pictures included, with the model as epoch 1 left it.
    with monkeypatch.context() as m:
        stop_on(m, "__call__", 27)
        assert run_train([*args, "--out", tmp_path / "cut"]) == 143
    printed = capsys.readouterr().out
    cut = tmp_path / "cut"
    assert f"SIGTERM in epoch 2 at step 7/20: saved {cut / 'interrupted.pt'}" in printed
    assert (f"metrics.json, curves.png, confusion.png, filters.png and mistakes.png of epochs 1-1 are in {cut}"
            in printed)
    assert f"continue with: python train.py --resume {cut / 'interrupted.pt'}" in printed
    assert "| cpu |" in printed.splitlines()[0]
    stopped = metrics(cut)
    assert stopped["stopped"] == {"signal": "SIGTERM", "epoch": 2, "step": 7} and len(stopped["history"]) == 1
    assert stopped["test_accuracy"] == stopped["history"][0]["test_accuracy"]
    for name in ("curves.png", "confusion.png", "filters.png", "mistakes.png", "last.pt", "best.pt"):
        assert (cut / name).is_file(), name

    partial = checkpoint.load(cut / "interrupted.pt")["epoch_train_seconds"]
    assert partial > 0
    assert run_train(["--resume", cut / "interrupted.pt", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "s of it in this session" in printed
    assert not (cut / "interrupted.pt").exists()  # last.pt of epoch 2 supersedes it
    straight = checkpoint.load(tmp_path / "straight" / "last.pt")
    resumed = checkpoint.load(cut / "last.pt")
    assert resumed["history"][1]["train_seconds"] > partial  # epoch 2's training time, both sessions
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name

    def without_times(history):
        return [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in history]

    assert without_times(straight["history"]) == without_times(resumed["history"])
    assert [row["lr"] for row in straight["history"]] == pytest.approx([5e-3, 5e-3 * 0.7])  # each epoch's own
    assert metrics(cut)["test_accuracy"] == metrics(tmp_path / "straight")["test_accuracy"]
    assert metrics(cut)["stopped"] is None


@needs_mnist
def test_a_stop_between_epochs_keeps_last_pt(tmp_path, monkeypatch, capsys):
    stop_on(monkeypatch, "agreed", 2, signal.SIGINT)  # asked before epoch 2
    seen, agreed = [], engine.StopRequest.agreed

    def look(self):  # metrics.json is there after every epoch, before any stop or end
        seen.append(metrics(tmp_path)["history"] if (tmp_path / "metrics.json").is_file() else None)
        return agreed(self)

    monkeypatch.setattr(engine.StopRequest, "agreed", look)
    assert run_train([*TINY, "--no-plots", "--out", tmp_path]) == 130
    assert seen[0] is None and [row["epoch"] for row in seen[1]] == [1]
    printed = capsys.readouterr().out
    assert f"SIGINT after epoch 1: {tmp_path / 'last.pt'} holds it" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "metrics.json"]
    assert metrics(tmp_path)["stopped"] == {"signal": "SIGINT", "epoch": 2, "step": 0}


def sigterm_while_loading(monkeypatch):
    load = data.load

    def load_and_get_sigterm(*args, **kwargs):  # the signal arrives while the data is being read
        signal.raise_signal(signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(data, "load", load_and_get_sigterm)


@needs_mnist
def test_a_stop_before_the_first_step_leaves_no_folder(tmp_path, monkeypatch, capsys):
    sigterm_while_loading(monkeypatch)
    assert run_train([*TINY, "--out", tmp_path / "run"]) == 143
    assert "SIGTERM before the first step: nothing saved" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@needs_mnist
def test_a_stop_before_the_first_step_leaves_no_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sigterm_while_loading(monkeypatch)
    assert run_train(TINY) == 143
    assert "SIGTERM before the first step: nothing saved" in capsys.readouterr().out
    assert list((tmp_path / "runs").iterdir()) == []


@needs_mnist
def test_an_error_before_anything_is_written_leaves_no_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("a step failed")

    monkeypatch.setattr(engine, "train_epoch", broken)
    with pytest.raises(RuntimeError, match="a step failed"):
        run_train(TINY)
    assert list((tmp_path / "runs").iterdir()) == []


@needs_mnist
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_kernels_are_loaded_before_any_clock_starts(mode, trained, tmp_path, monkeypatch):
    """A first run in a fresh checkout builds the kernels: that must not count as training or
    evaluation time. The load comes before the first timed stage (and builds nothing when done)."""
    events = []
    monkeypatch.setattr(run, "load", lambda: events.append("load"))
    for name in ("train_epoch", "evaluate"):
        monkeypatch.setattr(engine, name, record(events, name, getattr(engine, name)))
    argv = ["--eval", trained / "best.pt", "--limit-test", 100] if mode == "eval" else \
        ["--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--no-plots", "--out", tmp_path / "run"]
    assert run_train(argv) == 0
    assert events[0] == "load" and events[1:] and "load" not in events[1:], events


def record(events, name, function):
    def recorded(*args, **kwargs):
        events.append(name)
        return function(*args, **kwargs)
    return recorded


@needs_mnist
def test_signal_handlers_are_restored_when_main_returns(tmp_path, capsys):
    def mine(signum, frame):
        pass

    previous = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert run_train(["--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--no-plots",
                          "--out", tmp_path / "run"]) == 0
        assert all(signal.getsignal(s) is mine for s in previous)
        with pytest.raises(SystemExit):  # an error inside the run: missing data
            run_train(["--epochs", 1, "--out", tmp_path / "other"], data_dir=tmp_path / "nowhere")
        assert all(signal.getsignal(s) is mine for s in previous)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@needs_mnist
def test_a_stop_in_the_first_epoch_leaves_interrupted_pt_alone(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        stop_on(m, "__call__", 3)
        assert run_train([*TINY, "--out", tmp_path]) == 143
    assert [p.name for p in tmp_path.iterdir()] == ["interrupted.pt"]
    assert f"saved {tmp_path / 'interrupted.pt'}" in capsys.readouterr().out
    saved = (tmp_path / "interrupted.pt").read_bytes()
    assert checkpoint.load(tmp_path / "interrupted.pt")["step"] == 3

    sigterm_while_loading(monkeypatch)  # resumed, and stopped again before a step
    assert run_train(["--resume", tmp_path / "interrupted.pt"]) == 143
    printed = capsys.readouterr().out
    assert f"SIGTERM before the first step: nothing saved; {tmp_path / 'interrupted.pt'} is as it was" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["interrupted.pt"]
    assert (tmp_path / "interrupted.pt").read_bytes() == saved


@needs_mnist
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_resumable_checkpoint(signum, code, built, tmp_path, capsys):
    """A real process and a real signal (Ctrl-C, or kill/SLURM's SIGTERM); then resume it."""
    proc = subprocess.Popen(train_command("--epochs", 50, "--schedule", "step", "--limit-train", 3000,
                                          "--limit-test", 100, "--no-plots", "--out", tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    header = proc.stdout.readline()  # printed once the data and model are ready
    assert "output" in header, header + proc.stderr.read()
    first = proc.stdout.readline()  # the first epoch's line: there is something to save, however slow the run
    assert first.startswith("epoch  1/50"), header + first + proc.stderr.read()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, out + err
    saved = next(p for p in (tmp_path / "interrupted.pt", tmp_path / "last.pt") if p.is_file())
    assert f"continue with: python train.py --resume {saved}" in out
    if signum == signal.SIGTERM:  # resumable: end the run with the epoch it was in (a step schedule allows it)
        epochs = checkpoint.load(saved)["epoch"] + 1
        capsys.readouterr()
        assert run_train(["--resume", saved, "--epochs", epochs, "--no-plots"]) == 0
        assert f"--epochs {epochs}: the run ends at epoch {epochs} instead of 50" in capsys.readouterr().out
        assert len(metrics(tmp_path)["history"]) == epochs


@needs_mnist
def test_time_to_accuracy_reports_the_seconds_to_its_target(built, tmp_path):
    """benchmarks/time_to_accuracy.py, with a target a few steps reach: its JSON report."""
    out = tmp_path / "tta.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--data-dir",
                           str(MNIST_DIR), "--target", "0.8", "--eval-every", "0.05", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["reached"] and result["target"] == 0.8 and result["test_accuracy"] >= 0.8
    assert result["backend"] == "torchcnn" and result["recipe"] == "fast" and result["seconds_to_target"] > 0
    assert result["seconds_to_target"] == pytest.approx(result["history"][-1]["seconds"], abs=0.01)
    assert result["history"][-1]["test_accuracy"] == result["test_accuracy"]
