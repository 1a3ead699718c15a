"""predict.py and torchcnn.mnist.digits: reading a user's pictures of digits."""

from pathlib import Path

import pytest
import torch
from mnist_support import MNIST_DIR, help_blocks, needs_mnist, short_run

import predict
from torchcnn.mnist import data
from torchcnn.mnist.digits import prepare_digit
from torchcnn.mnist.model import MnistNet


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return short_run(tmp_path_factory)


def render(digit: torch.Tensor, path: Path, mode: str):
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
def test_predict_reads_rendered_digits(trained, tmp_path, capsys):
    mnist = data.load(MNIST_DIR, download=False)
    images, labels = [], []
    for i, mode in enumerate(["dark-on-light-rgb", "light-on-transparent"] * 3):
        path = tmp_path / f"digit{i}.{'jpg' if i == 0 else 'png'}"
        render(mnist.test_images[i], path, mode)
        images.append(str(path))
        labels.append(mnist.test_labels[i].item())
    assert predict.main([*images, "--checkpoint", str(trained / "best.pt")]) == 0
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
    prepared = prepare_digit(image)
    assert prepared.shape == (28, 28) and prepared.max() == 1
    rows = (prepared > 0.5).any(1).nonzero().flatten()
    assert rows.numel() == 20  # fitted into 20 pixels
    ys = torch.arange(28.0)
    assert abs((prepared.sum(1) * ys).sum() / prepared.sum() - 13.5) <= 0.5  # centred by mass


def test_prepare_digit_refuses_a_blank_picture():
    from PIL import Image

    with pytest.raises(ValueError, match="the image is blank"):
        prepare_digit(Image.new("L", (40, 40), 255))


@needs_mnist
def test_predict_rejects_a_non_image(trained, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    assert predict.main([str(text), "--checkpoint", str(trained / "best.pt")]) == 2
    assert f"predict.py: error: {text}: not an image PIL can read" in capsys.readouterr().err


def test_predict_names_a_bad_device(capsys):
    with pytest.raises(SystemExit):
        predict.main(["digit.png", "--checkpoint", "x.pt", "--device", "gpu"])
    assert "argument --device: 'gpu' is not a device" in capsys.readouterr().err


def test_predict_refuses_a_pickled_model_without_torchs_unsafe_advice(tmp_path, capsys):
    pickled = tmp_path / "model.pt"
    torch.save(MnistNet("torch"), pickled)
    assert predict.main(["digit.png", "--checkpoint", str(pickled)]) == 2
    err = capsys.readouterr().err
    assert f"predict.py: error: checkpoint '{pickled}' cannot be read: it holds Python objects" in err
    assert "weights_only" not in err and "Traceback" not in err


def test_every_argument_has_help(capsys):
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    blocks = help_blocks(capsys.readouterr().out)
    assert set(blocks) == {"-h, --help", "IMAGE", "--checkpoint CHECKPOINT", "--device DEVICE"}
    assert all(blocks.values()), blocks
    assert "(default: cpu)" in blocks["--device DEVICE"]
