"""train.py and predict.py end to end, and the package pieces they are built from.

The real-data tests find MNIST through $TORCHCNN_DATA_DIR (CI points it at ../shared/data/mnist), or
../shared/data/mnist beside the checkout; they are skipped, saying so, only when neither holds it.
"""

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchcnn import checkpoint, mnist
from torchcnn.models import MnistNet, loss_function
from torchcnn.training import make_optimizer, make_schedule, train_epoch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import predict  # noqa: E402
import train  # noqa: E402


def _mnist_dir():
    for candidate in (os.environ.get(mnist.ENV_VAR), ROOT.parent / "shared" / "data" / "mnist"):
        if candidate and mnist.find_files(candidate):
            return Path(candidate)
    return None


MNIST_DIR = _mnist_dir()
needs_mnist = pytest.mark.skipif(
    MNIST_DIR is None, reason=f"MNIST files not found: set {mnist.ENV_VAR} to the folder that holds them")
QUICK = ["--no-download", "--quiet", "--device", "cpu"]


def run_train(argv, data_dir=MNIST_DIR):
    return train.main([*QUICK, "--data-dir", str(data_dir), *map(str, argv)])


def metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The README's promise, measured: 1 epoch on 12,000 images reaches 96% in about a minute."""
    if MNIST_DIR is None:
        pytest.skip(f"MNIST files not found: set {mnist.ENV_VAR}")
    out = tmp_path_factory.mktemp("short_run")
    started = time.perf_counter()
    assert run_train(["--epochs", 1, "--limit-train", 12000, "--limit-test", 2000, "--out", out]) == 0
    return out, time.perf_counter() - started


@needs_mnist
def test_short_real_run_reaches_96_percent(short_run):
    out, seconds = short_run
    m = metrics(out)
    assert m["test_accuracy"] >= 0.96, m["test_accuracy"]
    assert seconds < 90, f"took {seconds:.0f} s"
    assert m["history"][0]["train_images"] == 12000 and m["backend"] == "torchcnn"
    assert m["world_size"] == 1 and m["seed"] == 1 and m["args"]["limit_test"] == 2000
    for name in ("last.pt", "best.pt", "curves.png", "confusion.png", "filters.png", "mistakes.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))


@needs_mnist
def test_eval_reports_the_checkpoints_accuracy(short_run, capsys):
    out, _ = short_run
    assert run_train(["--eval", out / "last.pt", "--limit-test", 2000]) == 0
    printed = capsys.readouterr().out
    assert f"test accuracy {100 * metrics(out)['test_accuracy']:.2f}%" in printed


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
        optimizer = make_optimizer("momentum", model.parameters(), lr=0.05)
        schedule = make_schedule("none", optimizer, lr=0.05, epochs=1, steps_per_epoch=8)
        batches = mnist.Batches(images, labels, 32, torch.Generator().manual_seed(0), max_shift=2)
        steps = []
        for i in range(len(batches)):
            totals, _ = train_epoch(model, loss_function(backend), optimizer, schedule, batches,
                                    start=i, stop=lambda step: True)
            steps.append(totals.mean_loss)
        losses[backend] = torch.tensor(steps)
    assert losses["torch"][-1] < losses["torch"][0]  # it learns something
    torch.testing.assert_close(losses["torchcnn"], losses["torch"], rtol=1e-4, atol=1e-5)


@needs_mnist
def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    args = ["--epochs", 2, "--limit-train", 640, "--limit-test", 200, "--batch-size", 32, "--no-plots"]
    assert run_train([*args, "--out", tmp_path / "straight"]) == 0

    # Stop in the middle of epoch 2 (as Ctrl-C does), then resume twice-removed from the start.
    calls = {"n": 0}

    def stop_at_step_27(self, step):
        calls["n"] += 1
        return calls["n"] == 27

    with monkeypatch.context() as m:
        m.setattr(train.StopRequest, "__call__", stop_at_step_27)
        assert run_train([*args, "--out", tmp_path / "cut"]) == 130
    assert (tmp_path / "cut" / "interrupted.pt").is_file()
    assert run_train(["--resume", tmp_path / "cut" / "interrupted.pt"]) == 0

    straight = checkpoint.load(tmp_path / "straight" / "last.pt")
    resumed = checkpoint.load(tmp_path / "cut" / "last.pt")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    def without_times(history):
        return [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in history]

    assert without_times(straight["history"]) == without_times(resumed["history"])
    assert metrics(tmp_path / "cut")["test_accuracy"] == metrics(tmp_path / "straight")["test_accuracy"]


@needs_mnist
def test_ctrl_c_saves_and_exits_130(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *QUICK, "--data-dir", str(MNIST_DIR), "--epochs", "50",
         "--limit-train", "3000", "--limit-test", "100", "--no-plots", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    header = proc.stdout.readline()  # printed once the data and model are ready
    assert "output" in header, header + proc.stderr.read()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    saved = [p for p in (tmp_path / "interrupted.pt", tmp_path / "last.pt") if p.is_file()]
    assert saved and str(saved[0]) in out
    checkpoint.load(saved[0])


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_killed_writer_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from torchcnn import checkpoint
for i in range(10**6):
    checkpoint.save({{"model": {{"w": torch.full((4_000_000,), float(i))}}}}, {str(path)!r})
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
    model = MnistNet()
    checkpoint.save({"model": model.state_dict(), "model_config": model.config}, good)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated, corrupt or not a torch.save"):
        checkpoint.load(truncated)

    # Text and random bytes: the unpickler fails in many ways (IndexError for this one), all reported alike.
    for name, content in (("notes.txt", b"not a checkpoint"), ("passwd", b"root:x:0:0:root:/root:/bin/bash\n"),
                          ("noise.pt", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
            checkpoint.load(tmp_path / name)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not a torchcnn training checkpoint"):
        checkpoint.load(foreign)

    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")

    wider = MnistNet(channels=(16, 64))
    with pytest.raises(checkpoint.CheckpointError, match="configuration"):
        checkpoint.load_model_state(wider, checkpoint.load(good))
    other = torch.nn.Linear(3, 4)
    with pytest.raises(checkpoint.CheckpointError, match="another architecture"):
        checkpoint.load_model_state(other, checkpoint.load(good))


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--limit-train", "0"], "--limit-train must be a positive number of images"),
    (["--limit-test", "-5"], "--limit-test must be a positive number of images"),
    (["--dropout", "1.5"], "--dropout in \\[0, 1\\)"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--device", "cuda:99"], "--device 'cuda:99'"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@needs_mnist
def test_an_output_folder_that_cannot_be_made_is_named(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--out", blocker / "run"])
    assert exit_info.value.code == 2
    assert f"--out {blocker / 'run'}: cannot create the output folder" in capsys.readouterr().err


def test_predict_names_a_bad_device(capsys):
    with pytest.raises(SystemExit):
        predict.main(["digit.png", "--checkpoint", "x.pt", "--device", "gpu"])
    assert "--device 'gpu' is not a device" in capsys.readouterr().err


def test_train_reports_a_bad_checkpoint_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--eval", str(bad)])
    assert exit_info.value.code == 2
    assert "train.py: error: checkpoint" in capsys.readouterr().err


def test_missing_data_folder_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--epochs", 1], data_dir=tmp_path / "nowhere")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and str(tmp_path / "nowhere") in err and mnist.ENV_VAR in err
    assert "Traceback" not in err


def _write_idx(folder: Path, images: torch.Tensor, labels: torch.Tensor, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60000), ("t10k", 10000)):
        for kind, tensor, dims in (("images", images, 3), ("labels", labels, 1)):
            shape = (n, 28, 28) if dims == 3 else (n,)
            body = tensor.expand(*shape).contiguous().numpy().tobytes()
            header = bytes([0, 0, 8, dims]) + b"".join(d.to_bytes(4, "big") for d in shape)
            name = f"{split}-{kind}-idx{dims}-ubyte"
            data = header + body
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)


def test_corrupt_files_are_reported_not_trained_on(tmp_path):
    _write_idx(tmp_path, torch.zeros(28, 28, dtype=torch.uint8), torch.zeros((), dtype=torch.uint8), gz=True)
    with pytest.raises(mnist.MNISTCorruptError, match="MD5"):
        mnist.load(tmp_path, download=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(mnist.MNISTCorruptError, match="train-images-idx3-ubyte.gz: cannot be read"):
        mnist.load(tmp_path, download=False)


@needs_mnist
def test_torchvision_layout_and_plain_files_load_the_same(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, path in mnist.find_files(MNIST_DIR).items():
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as src:
            (raw / name).write_bytes(src.read())
    ours, theirs = mnist.load(MNIST_DIR, download=False), mnist.load(tmp_path, download=False)
    assert theirs.source == str(raw)
    assert torch.equal(ours.test_images, theirs.test_images) and torch.equal(ours.train_labels, theirs.train_labels)
    assert ours.train_images.shape == (60000, 28, 28) and ours.test_labels.shape == (10000,)
    assert int(ours.train_labels.bincount().min()) > 5000  # ten classes, all present
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.datasets.MNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(reference.data, ours.test_images) and torch.equal(reference.targets, ours.test_labels)


def test_random_shift_moves_each_image_by_its_own_offset():
    images = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5) + 1
    gen = torch.Generator().manual_seed(3)
    shifted = mnist.random_shift(images, 1, gen)
    dy, dx = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(3)) - 1
    for i in range(2):
        expected = torch.zeros(7, 7)
        expected[1:6, 1:6] = images[i]
        top, left = 1 + dy[i].item(), 1 + dx[i].item()
        assert torch.equal(shifted[i], expected[top:top + 5, left:left + 5])


def test_batches_shard_the_same_permutation_across_ranks():
    images, labels = torch.zeros(10, 28, 28, dtype=torch.uint8), torch.arange(10)
    shards = [mnist.Batches(images, labels, 4, torch.Generator().manual_seed(0), rank=r, world_size=3)
              for r in range(3)]
    seen = torch.cat([torch.cat([s.batch(i)[1] for i in range(len(s))]) for s in shards])
    assert len({len(s) for s in shards}) == 1 and seen.numel() == 9 and seen.unique().numel() == 9


@needs_mnist
def test_torchrun_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), *QUICK, "--data-dir", str(MNIST_DIR), "--epochs", "1",
         "--limit-train", "1024", "--limit-test", "256", "--batch-size", "32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    m = metrics(tmp_path)
    assert m["world_size"] == 2 and m["history"][0]["train_images"] == 1024
    assert 0 < m["test_accuracy"] <= 1
    assert result.stdout.count("test accuracy") == 1  # rank 0 alone prints


def _render(digit: torch.Tensor, path: Path, mode: str):
    """Draw an MNIST digit as a user's picture: bigger, off-centre, in another mode and polarity."""
    from PIL import Image

    big = torch.nn.functional.interpolate(digit[None, None].float(), size=(96, 80), mode="bilinear")[0, 0]
    canvas = torch.zeros(150, 130)
    canvas[30:126, 10:90] = big
    ink = canvas.clamp(0, 255).to(torch.uint8)
    if mode == "dark-on-light-rgb":
        image = Image.fromarray((255 - ink).numpy()).convert("RGB")
    else:  # light ink on a transparent background whose stored colour is white
        rgba = torch.stack([torch.full_like(ink, 255)] * 3 + [ink], dim=-1)
        image = Image.fromarray(rgba.numpy())
    image.save(path)


@needs_mnist
def test_predict_reads_rendered_digits(short_run, tmp_path, capsys):
    out, _ = short_run
    data = mnist.load(MNIST_DIR, download=False)
    images, labels = [], []
    for i, mode in enumerate(["dark-on-light-rgb", "light-on-transparent"] * 3):
        path = tmp_path / f"digit{i}.{'jpg' if i == 0 else 'png'}"
        _render(data.test_images[i], path, mode)
        images.append(str(path))
        labels.append(data.test_labels[i].item())
    assert predict.main([*images, "--checkpoint", str(out / "best.pt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    predicted = [int(line.split(": ")[1].split()[0]) for line in lines]
    assert sum(p == t for p, t in zip(predicted, labels)) >= 5, (lines, labels)
    assert all(line.count(": ") == 4 for line in lines)  # the digit and three probabilities


def test_prepare_digit_matches_mnist_preparation():
    """An MNIST-like digit drawn large and dark-on-light comes back as it was."""
    from PIL import Image

    digit = torch.zeros(28, 28)
    digit[6:22, 12:16] = 1.0  # a "1": 16 rows of ink, centred
    big = torch.nn.functional.interpolate(digit[None, None], scale_factor=5, mode="nearest")[0, 0]
    image = Image.fromarray(((1 - big) * 255).to(torch.uint8).numpy())
    prepared = mnist.prepare_digit(image)
    assert prepared.shape == (28, 28) and prepared.max() == 1
    rows = (prepared > 0.5).any(1).nonzero().flatten()
    assert rows.numel() == 20  # fitted into 20 pixels
    ys = torch.arange(28.0)
    assert abs((prepared.sum(1) * ys).sum() / prepared.sum() - 13.5) <= 0.5  # centred by mass


@needs_mnist
def test_predict_rejects_a_non_image(short_run, tmp_path, capsys):
    out, _ = short_run
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    assert predict.main([str(text), "--checkpoint", str(out / "best.pt")]) == 2
    assert "not an image" in capsys.readouterr().err
