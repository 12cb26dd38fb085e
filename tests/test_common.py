"""common.py: dataset loaders on data the tests make, and the metric helpers against direct loops."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common


def test_synthetic_is_fixed_uint8_and_labelled():
    a = common.load_dataset("synthetic", "unused")
    b = common.load_dataset("synthetic", "unused")
    assert a.pretrain_x.dtype == torch.uint8 and a.pretrain_x.shape == (512, 3, 32, 32)
    assert a.train_y.dtype == torch.int64 and a.test_x.shape == (256, 3, 32, 32)
    assert torch.equal(a.pretrain_x, b.pretrain_x) and torch.equal(a.test_y, b.test_y)
    assert set(a.train_y.tolist()) == set(range(10)) and len(a.classes) == 10
    assert a.pretrain_x.float().std() > 20  # not a constant image
    assert all(0 < m < 1 for m in a.mean) and all(0 < s < 1 for s in a.std)


def test_num_samples_and_resize():
    d = common.load_dataset("synthetic", "unused", image_size=16, num_samples=100)
    assert d.pretrain_x.shape == (100, 3, 16, 16) and d.train_x.shape == (100, 3, 16, 16)
    assert d.test_x.shape == (256, 3, 16, 16) and d.pretrain_x.dtype == torch.uint8
    with pytest.raises(common.UsageError, match="positive"):
        common.load_dataset("synthetic", "unused", num_samples=0)


def test_unknown_dataset():
    with pytest.raises(common.UsageError, match="unknown dataset"):
        common.load_dataset("imagenet22k", "unused")


def _fake_cifar10(root, n_train=50, n_test=20):
    """The on-disk layout of cifar-10-python.tar.gz, with random pixels."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in batches.items():
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return entry


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    last = _fake_cifar10(str(tmp_path))
    # our files carry no valid md5; everything else is torchvision's real reading code
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d = common.load_dataset("cifar10", str(tmp_path), download=False)
    assert d.train_x.shape == (50, 3, 32, 32) and d.test_x.shape == (20, 3, 32, 32)
    assert d.classes == [f"c{i}" for i in range(10)]
    # pixel layout: CIFAR rows are 1024 R, then G, then B values, row-major
    assert torch.equal(d.test_x[0], torch.from_numpy(last["data"][0].reshape(3, 32, 32)))
    assert d.test_y.tolist() == [int(v) for v in last["labels"]]


def test_missing_data_with_no_download(tmp_path):
    with pytest.raises(common.UsageError, match="not found.*no-download"):
        common.load_dataset("cifar10", str(tmp_path), download=False)


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    # an address that refuses at once: the same path as a machine without network
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(common.UsageError, match="could not download cifar10") as e:
        common.load_dataset("cifar10", str(tmp_path), download=True)
    assert "\n" not in str(e.value)


def _png(path, size, colour):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(str(tmp_path / split / c / f"{i}.png"), (40 + 10 * i, 30), colour)
    d = common.load_dataset("imagefolder", str(tmp_path), image_size=24)
    assert d.train_x.shape == (6, 3, 24, 24) and d.test_x.shape == (4, 3, 24, 24)
    assert d.classes == ["cat", "dog"] and d.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.train_x[0, 0].min() == 255 and d.train_x[0, 2].max() == 0  # red stays red
    assert d.train_x[5, 2].min() == 255 and d.train_x[5, 0].max() == 0
    assert common.load_dataset("imagefolder", str(tmp_path)).train_x.shape[-1] == 32  # default size


def test_image_folder_errors(tmp_path):
    with pytest.raises(common.UsageError, match="does not exist"):
        common.load_dataset("imagefolder", str(tmp_path / "nowhere"))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(common.UsageError, match="no images"):
        common.load_dataset("imagefolder", str(tmp_path))
    _png(str(tmp_path / "train" / "cat" / "0.png"), (8, 8), (0, 0, 0))
    _png(str(tmp_path / "test" / "cat" / "0.png"), (8, 8), (0, 0, 0))
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(common.UsageError, match="cannot read image"):
        common.load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "train" / "cat" / "1.png").unlink()
    _png(str(tmp_path / "test" / "dog" / "0.png"), (8, 8), (0, 0, 0))
    with pytest.raises(common.UsageError, match="different class folders"):
        common.load_dataset("imagefolder", str(tmp_path))


def _two_classes(root):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            _png(str(root / split / c / "0.png"), (8, 8), (0, 0, 0))


def test_image_folder_refuses_links_back_into_itself_and_special_files(tmp_path):
    _two_classes(tmp_path)
    (tmp_path / "train" / "cat" / "up").symlink_to("..")  # a loop: would repeat every class as "cat"
    with pytest.raises(common.UsageError, match="leads back into the folder"):
        common.load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "train" / "cat" / "up").unlink()
    (tmp_path / "train" / "cat" / "dogs").symlink_to(tmp_path / "train" / "dog")  # mislabelled copies
    with pytest.raises(common.UsageError, match="leads back into the folder"):
        common.load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "train" / "cat" / "dogs").unlink()
    outside = tmp_path / "elsewhere" / "cats"  # a class folder linked from outside is fine
    _png(str(outside / "1.png"), (8, 8), (0, 0, 0))
    (tmp_path / "train" / "cat" / "more").symlink_to(outside)
    assert len(common.load_dataset("imagefolder", str(tmp_path)).train_x) == 3
    os.mkfifo(tmp_path / "train" / "dog" / "pipe.png")  # reading it would block forever
    with pytest.raises(common.UsageError, match="not a regular file"):
        common.load_dataset("imagefolder", str(tmp_path))
    os.unlink(tmp_path / "train" / "dog" / "pipe.png")
    (tmp_path / "train" / "dog" / "dir.png").mkdir()  # a directory named like an image: not an image
    assert len(common.load_dataset("imagefolder", str(tmp_path)).train_x) == 3


def test_image_folder_decodes_16_bit_grey_and_refuses_decompression_bombs(tmp_path, monkeypatch):
    _two_classes(tmp_path)
    grey16 = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "train" / "cat" / "0.png")  # 16-bit grey PNG
    assert Image.open(tmp_path / "train" / "cat" / "0.png").mode.startswith("I")
    x = common.load_dataset("imagefolder", str(tmp_path), image_size=8).train_x[0]
    assert (x == 128).all()  # 32768 / 65535 of white: mid-grey, not white
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # an 8x8 image is now "too large"
    with pytest.raises(common.UsageError, match="too large"):
        common.load_dataset("imagefolder", str(tmp_path))


def test_knn_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(40, 5, generator=g), torch.randn(15, 5, generator=g)
    train_y, test_y = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (15,), generator=g)
    k, t = 7, 0.1
    correct = 0
    for f, y in zip(test_f, test_y):
        sims = [float(torch.dot(f / f.norm(), tf / tf.norm())) for tf in train_f]
        top = sorted(range(40), key=lambda j: -sims[j])[:k]
        votes = [sum(np.exp(sims[j] / t) for j in top if train_y[j] == c) for c in range(3)]
        correct += int(np.argmax(votes) == y)
    assert common.knn_accuracy(train_f, train_y, test_f, test_y, 3, k=k, t=t, chunk=4) == correct / 15
    # k larger than the bank is clipped; a bank identical to the queries is classified perfectly
    assert common.knn_accuracy(train_f, train_y, train_f, train_y, 3, k=1000) >= 0
    assert common.knn_accuracy(train_f, train_y, train_f, train_y, 3, k=1) == 1.0


def test_knn_vote_does_not_overflow_at_small_temperatures():
    """exp(sim / t) overflows float32 for t < ~0.0113; the vote must still be the float64 one."""
    g = torch.Generator().manual_seed(2)
    train_f, train_y = torch.randn(60, 4, generator=g), torch.randint(0, 4, (60,), generator=g)
    test_f, test_y = train_f[:30] + 0.3 * torch.randn(30, 4, generator=g), train_y[:30]  # near their class
    bank = torch.nn.functional.normalize(train_f.double(), dim=1)
    queries = torch.nn.functional.normalize(test_f.double(), dim=1)
    for t in (0.01, 0.005):
        correct = 0
        for f, y in zip(queries, test_y):
            sims = (bank @ f).tolist()
            top = sorted(range(60), key=lambda j: -sims[j])[:20]
            votes = [sum(math.exp(sims[j] / t) for j in top if train_y[j] == c) for c in range(4)]  # float64
            correct += int(np.argmax(votes) == y)
        assert common.knn_accuracy(train_f, train_y, test_f, test_y, 4, k=20, t=t) == correct / 30
        assert correct / 30 > 0.5  # the overflowing vote gave every query to class 0


def test_same_class_mass_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    A = torch.rand(2, 9, 9, generator=g)
    A = A / A.sum(-1, keepdim=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 1])
    mass, chance = common.same_class_mass(A, y)
    for l in range(2):
        direct = np.mean([sum(A[l, i, j].item() for j in range(9) if j != i and y[j] == y[i]) for i in range(9)])
        assert abs(mass[l].item() - direct) < 1e-6
    assert abs(chance - np.mean([(sum(int(v == w) for v in y) - 1) / 8 for w in y])) < 1e-6
    # a block-diagonal A puts all its mass on the same class
    same = (y[:, None] == y[None]).float().fill_diagonal_(0)
    assert abs(common.same_class_mass(same / same.sum(1, keepdim=True), y)[0].item() - 1) < 1e-6


def test_save_maps_writes_a_png(tmp_path):
    y = torch.tensor([0, 0, 1, 1, 2])
    common.save_maps(str(tmp_path / "f" / "m.png"), torch.rand(3, 5, 5), y)
    with Image.open(tmp_path / "f" / "m.png") as img:
        assert img.mode == "RGB" and img.width > 3 * 5 * 2
    y = torch.tensor([2, 0, 1, 0, 0, 2, 1, 0])
    assert common.class_sorted(y, 6).tolist() == [1, 3, 2, 6, 0, 5]  # two of each class, by class
    assert common.class_sorted(y, 2).tolist() == [1, 2, 0]  # at least one of each
