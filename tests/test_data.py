"""torchcnn.mnist.data: finding, verifying and loading the MNIST files; batches for training and
evaluation; the shift augmentation."""

import gzip

import pytest
import torch
from mnist_support import MNIST_DIR, needs_mnist, write_idx

from torchcnn.mnist import data


def test_corrupt_files_are_reported_not_trained_on(tmp_path):
    write_idx(tmp_path, torch.zeros(28, 28, dtype=torch.uint8), torch.zeros((), dtype=torch.uint8), gz=True)
    with pytest.raises(data.MNISTCorruptError, match="MD5"):
        data.load(tmp_path, download=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(data.MNISTCorruptError, match="train-images-idx3-ubyte.gz: cannot be read"):
        data.load(tmp_path, download=False)


def test_missing_files_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(data.MNISTNotFoundError) as error:
        data.load(tmp_path / "nowhere", download=False)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message and data.ENV_VAR in message
    assert "download disabled" in message


@needs_mnist
def test_torchvision_layout_and_plain_files_load_the_same(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, path in data.find_files(MNIST_DIR).items():
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as src:
            (raw / name).write_bytes(src.read())
    ours, theirs = data.load(MNIST_DIR, download=False), data.load(tmp_path, download=False)
    assert theirs.source == str(raw)
    assert torch.equal(ours.test_images, theirs.test_images) and torch.equal(ours.train_labels, theirs.train_labels)
    assert ours.train_images.shape == (60000, 28, 28) and ours.test_labels.shape == (10000,)
    assert int(ours.train_labels.bincount().min()) > 5000  # ten classes, all present
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.datasets.MNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(reference.data, ours.test_images) and torch.equal(reference.targets, ours.test_labels)


def test_limit_takes_the_first_images_and_refuses_none():
    images, labels = torch.arange(5 * 28 * 28, dtype=torch.uint8).view(5, 28, 28), torch.arange(5)
    mnist = data.MNIST(images, labels, images[:3], labels[:3], source="memory")
    limited = mnist.limit(2, 1)
    assert torch.equal(limited.train_labels, torch.tensor([0, 1])) and torch.equal(limited.test_images, images[:1])
    with pytest.raises(ValueError, match="limit_train must be a positive number of images, got 0"):
        mnist.limit(0, None)


def test_random_shift_moves_each_image_by_its_own_offset():
    images = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5) + 1
    gen = torch.Generator().manual_seed(3)
    shifted = data.random_shift(images, 1, gen)
    dy, dx = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(3)) - 1
    for i in range(2):
        expected = torch.zeros(7, 7)
        expected[1:6, 1:6] = images[i]
        top, left = 1 + dy[i].item(), 1 + dx[i].item()
        assert torch.equal(shifted[i], expected[top:top + 5, left:left + 5])


def test_training_batches_shard_the_same_permutation_across_ranks():
    images, labels = torch.zeros(10, 28, 28, dtype=torch.uint8), torch.arange(10)
    shards = [data.Batches(images, labels, 4, torch.Generator().manual_seed(0), rank=r, world_size=3)
              for r in range(3)]
    seen = torch.cat([torch.cat([s.batch(i)[1] for i in range(len(s))]) for s in shards])
    assert len({len(s) for s in shards}) == 1 and seen.numel() == 9 and seen.unique().numel() == 9


def test_a_training_batch_is_the_same_whichever_batch_comes_first():
    images, labels = torch.randint(0, 255, (50, 28, 28), dtype=torch.uint8), torch.arange(50)
    first = data.Batches(images, labels, 8, torch.Generator().manual_seed(5), max_shift=2)
    again = data.Batches(images, labels, 8, torch.Generator().manual_seed(5), max_shift=2)
    for i in reversed(range(len(again))):  # the other order: what a resumed epoch does
        again_images, again_labels = again.batch(i)
        assert torch.equal(again_images, first.batch(i)[0]) and torch.equal(again_labels, first.batch(i)[1])


def test_evaluation_batches_cover_every_example_once_normalised():
    images, labels = torch.randint(0, 255, (11, 28, 28), dtype=torch.uint8), torch.arange(11)
    alone = list(data.Batches(images, labels, 4))
    assert [y.tolist() for _, y in alone] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    torch.testing.assert_close(torch.cat([x for x, _ in alone]), data.normalize(images))
    assert alone[0][0].shape == (4, 1, 28, 28) and alone[0][0].dtype == torch.float32
    ranks = [torch.cat([y for _, y in data.Batches(images, labels, 2, rank=r, world_size=3)]) for r in range(3)]
    assert sorted(torch.cat(ranks).tolist()) == list(range(11))  # no example trimmed, none twice
    with pytest.raises(ValueError, match="generator"):
        data.Batches(images, labels, 4, max_shift=2)
