"""common.py's data path: Tiny-ImageNet, the parallel decoder and its cache, num_samples subsets,
and place()/batch() for data kept on the host."""

import functools
import hashlib
import http.server
import json
import os
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import METHODS, run_cli, run_dir_of
from benchmark_data import sequential_decode  # the old loop, the benchmark's baseline

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(common, "_warned", set())  # each test sees its own warnings


def _folder(root, n=(3, 2), size=(12, 10)):
    """root/{train,test}/<class>/*.png in solid colours: class c is COLOURS[c]."""
    for split, count in zip(("train", "test"), n):
        for c, colour in zip(("a", "b"), COLOURS):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(count):
                Image.new("RGB", size, colour).save(root / split / c / f"{i}.png")


def _cache_files(root):
    return sorted(os.listdir(root / ".cache")) if (root / ".cache").exists() else []


# ----------------------------------------------------------------------------- num_samples


def test_balanced_subset_proportional_seeded_and_sorted():
    y = torch.arange(10).repeat_interleave(1000)  # class-sorted, as an image folder is
    idx = common.balanced_subset(y, 2048, seed=0)
    counts = torch.bincount(y[idx], minlength=10)
    assert len(idx) == 2048 and set(counts.tolist()) <= {204, 205} and counts.sum() == 2048
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 2048
    assert torch.equal(idx, common.balanced_subset(y, 2048, seed=0))
    assert not torch.equal(idx, common.balanced_subset(y, 2048, seed=1))
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)  # 7 of 10: 3.5, 2.1, 1.4 -> 4, 2, 1
    assert torch.bincount(y[common.balanced_subset(y, 7)]).tolist() == [4, 2, 1]
    y = torch.tensor([2] * 600 + [0] * 300 + [1] * 100)
    assert torch.bincount(y[common.balanced_subset(y, 100)]).tolist() == [30, 10, 60]
    assert torch.equal(common.balanced_subset(y, 5000), torch.arange(1000))  # N >= size: all


def test_num_samples_keeps_every_class_of_a_sorted_folder(tmp_path):
    _folder(tmp_path, n=(6, 1))
    d = common.load_dataset("imagefolder", str(tmp_path), image_size=8, num_samples=4)
    assert d.train_y.tolist() == [0, 0, 1, 1] and d.pretrain_x.shape == (4, 3, 8, 8)
    a = common.load_dataset("synthetic", "unused", num_samples=50, seed=0)
    b = common.load_dataset("synthetic", "unused", num_samples=50, seed=1)
    assert set(a.train_y.tolist()) == set(range(10)) and not torch.equal(a.train_x, b.train_x)


# ----------------------------------------------------------------------------- decoder and cache


def test_parallel_decoder_gives_the_sequential_pixels(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, ext) in enumerate([("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("P", "png"),
                                     ("RGB", "jpg"), ("I;16", "png")] * 4):
        w, h = rng.integers(5, 40, 2)
        top, channels = (65535, 1) if mode == "I;16" else (255, 3 if mode == "RGB" else 1)
        pixels = rng.integers(0, top, (h, w, channels))
        if mode == "I;16":
            img = Image.fromarray(pixels[..., 0].astype(np.uint16))
        else:
            img = Image.fromarray(pixels.astype(np.uint8).squeeze()).convert(mode)
        paths.append(str(tmp_path / f"{i}.{ext}"))
        img.save(paths[-1])
    for size in (8, 17):
        assert torch.equal(common._decode(paths, size, chunk=5), sequential_decode(paths, size))


def test_unreadable_image_is_one_line_naming_the_file(tmp_path):
    _folder(tmp_path, n=(40, 1))
    bad = tmp_path / "train" / "b" / "17.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(common.UsageError, match="cannot read image") as e:
        common.load_dataset("imagefolder", str(tmp_path))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert _cache_files(tmp_path) == []


def test_cache_hit_is_identical_and_does_not_decode(tmp_path, monkeypatch):
    _folder(tmp_path)
    a = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert [f.split("-")[:2] for f in _cache_files(tmp_path)] == [["test", "8"], ["train", "8"]]

    def no_decode(*args, **kw):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(common, "_decode", no_decode)
    b = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert torch.equal(a.pretrain_x, b.pretrain_x) and torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.train_y, b.train_y) and a.classes == b.classes


def test_changed_folder_rebuilds_the_cache(tmp_path):
    _folder(tmp_path)
    common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    before = _cache_files(tmp_path)
    Image.new("RGB", (12, 10), (9, 9, 9)).save(tmp_path / "train" / "a" / "0.png")  # same size
    t = time.time() + 5
    os.utime(tmp_path / "train" / "a" / "0.png", (t, t))
    d = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert (d.train_x[0] == 9).all()  # the new pixels, not the cached ones
    after = _cache_files(tmp_path)
    assert after[0] == before[0] and after[1] != before[1] and len(after) == 2  # old key removed
    Image.new("RGB", (12, 10), (0, 0, 0)).save(tmp_path / "train" / "b" / "new.png")
    assert len(common.load_dataset("imagefolder", str(tmp_path), image_size=8).train_x) == 7
    (tmp_path / "train" / "b" / "new.png").unlink()
    assert len(common.load_dataset("imagefolder", str(tmp_path), image_size=8).train_x) == 6


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "two bytes", "shape", "dtype",
                                    "version", "key", "pixels"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, capsys, damage):
    _folder(tmp_path)
    good = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    path = tmp_path / ".cache" / next(f for f in _cache_files(tmp_path) if f.startswith("train"))
    saved = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x02 not a cache")
    elif damage in ("empty", "two bytes"):  # a crash or a full disk; torch.load's error is empty
        path.write_bytes(b"PK"[: 2 * (damage == "two bytes")])
    elif damage == "pixels":  # bytes flipped inside the stored pixels: torch.load does not notice
        data = bytearray(path.read_bytes())
        at = data.find(saved["x"].numpy().tobytes()[:64])
        assert at > 0
        for i in range(at + 5, at + 45, 7):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        assert not torch.equal(torch.load(path, weights_only=True)["x"], saved["x"])
    else:
        saved |= {"shape": {"x": saved["x"][:2]}, "dtype": {"x": saved["x"].float()},
                  "version": {"version": -1}, "key": {"key": "0" * 64}}[damage]
        torch.save(saved, path)
    capsys.readouterr()
    d = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert torch.equal(d.train_x, good.train_x)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unusable" in err and "rebuilding" in err
    assert torch.equal(torch.load(path, weights_only=True)["x"], good.train_x)  # rewritten


def test_an_edited_file_with_its_size_and_mtime_kept_rebuilds_the_cache(tmp_path):
    """cp -p or rsync -a of an edited image: the same byte size and mtime, other pixels."""
    for split in ("train", "test"):
        for c, colour in zip(("a", "b"), COLOURS):
            os.makedirs(tmp_path / split / c)
            Image.new("RGB", (12, 10), colour).save(tmp_path / split / c / "0.bmp")
    first = common.load_dataset("imagefolder", str(tmp_path), image_size=8).train_x
    path = tmp_path / "train" / "a" / "0.bmp"
    st = os.stat(path)
    edited = tmp_path / "edited.bmp"
    Image.new("RGB", (12, 10), (7, 7, 7)).save(edited)
    assert os.path.getsize(edited) == st.st_size
    path.write_bytes(edited.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p leaves it
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.path.getsize(path) == st.st_size
    again = common.load_dataset("imagefolder", str(tmp_path), image_size=8).train_x
    assert (again[0] == 7).all() and torch.equal(again[1], first[1])  # the new pixels


def test_dangling_links_are_one_line_and_odd_names_are_read(tmp_path):
    _folder(tmp_path)
    odd = os.fsdecode(b"\xff\xfe-not-utf8.png")  # a name that is not valid UTF-8
    Image.new("RGB", (12, 10), COLOURS[1]).save(os.path.join(tmp_path, "train", "b", odd))
    d = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert len(d.train_x) == 7 and d.train_y.tolist().count(1) == 4  # read, cached, labelled
    assert len(common.load_dataset("imagefolder", str(tmp_path), image_size=8).train_x) == 7
    (tmp_path / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(common.UsageError, match="target is missing") as e:
        common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert "gone.png" in str(e.value) and "\n" not in str(e.value)


def test_other_size_other_cache_file(tmp_path):
    _folder(tmp_path)
    a = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    b = common.load_dataset("imagefolder", str(tmp_path), image_size=6)
    assert a.train_x.shape[-1] == 8 and b.train_x.shape[-1] == 6
    assert len(_cache_files(tmp_path)) == 4


def test_no_cache_neither_reads_nor_writes(tmp_path, capsys):
    _folder(tmp_path)
    d = common.load_dataset("imagefolder", str(tmp_path), image_size=8, cache=False)
    assert d.train_x.shape == (6, 3, 8, 8) and not (tmp_path / ".cache").exists()
    common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    for f in _cache_files(tmp_path):
        (tmp_path / ".cache" / f).write_bytes(b"garbage")
    capsys.readouterr()
    assert torch.equal(common.load_dataset("imagefolder", str(tmp_path), image_size=8,
                                           cache=False).train_x, d.train_x)
    assert capsys.readouterr().err == ""  # the damaged cache was never opened


@pytest.mark.parametrize("how", ["cache is a file", "no permission"])
def test_unwritable_cache_warns_once_and_runs(tmp_path, capsys, monkeypatch, how):
    _folder(tmp_path)
    if how == "cache is a file":
        (tmp_path / ".cache").write_text("")
    else:  # chmod does not stop root, which the tests may run as: refuse the write itself
        def refuse(*args, **kw):
            raise PermissionError(13, "Permission denied", str(tmp_path / ".cache" / ".x.tmp"))
        monkeypatch.setattr(common.tempfile, "NamedTemporaryFile", refuse)
    d = common.load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert d.train_x.shape == (6, 3, 8, 8) and d.test_x.shape == (4, 3, 8, 8)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the image cache" in err
    assert "Traceback" not in err
    if how == "no permission":
        assert os.listdir(tmp_path / ".cache") == []


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".cache").mkdir()
    stale, young = tmp_path / ".cache" / ".train-8-dead.tmp", tmp_path / ".cache" / ".test-8-x.tmp"
    stale.write_bytes(b"half a cache from a killed run")
    young.write_bytes(b"another run writing now")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    _folder(tmp_path)
    assert common.load_dataset("imagefolder", str(tmp_path), image_size=8).train_x.shape[0] == 6
    assert not stale.exists() and young.exists()


# ----------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n03", "n01", "n02"]  # listed unsorted; the classes are the sorted wnids


def _fake_tiny_imagenet(tmp_path):
    """tiny-imagenet-200.zip with the real layout: 3 wnids, 4 train images each, 6 val images.
    Class n0k is COLOURS[k - 1]. Returns (zip path, its md5, the val wnids in file order)."""
    top = tmp_path / "build" / "tiny-imagenet-200"
    for w in WNIDS:
        (top / "train" / w / "images").mkdir(parents=True)
        (top / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(4):
            Image.new("RGB", (64, 64), COLOURS[int(w[-1]) - 1]).save(
                top / "train" / w / "images" / f"{w}_{i}.JPEG")
    (top / "val" / "images").mkdir(parents=True)
    (top / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(top / "test" / "images" / "test_0.JPEG")  # unlabelled: ignored
    val = ["n02", "n03", "n01", "n01", "n03", "n02"]
    lines = []
    for i, w in enumerate(val):
        colour = COLOURS[int(w[-1]) - 1]
        Image.new("RGB", (64, 64), colour).save(top / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n")
    (top / "val" / "val_annotations.txt").write_text("".join(lines))
    (top / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    archive = tmp_path / "src" / "tiny-imagenet-200.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(top.parent.rglob("*")):
            z.write(path, path.relative_to(top.parent))
    return archive, hashlib.md5(archive.read_bytes()).hexdigest(), val


@pytest.fixture
def serve():
    """serve(folder) -> the http:// address of a local server of that folder (torchvision's
    downloader cannot read file:// addresses; this is its real HTTP path, without the network)."""
    servers = []

    def start(folder):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_tiny_imagenet_download_verify_extract_and_load(tmp_path, monkeypatch, serve):
    archive, md5, val = _fake_tiny_imagenet(tmp_path)
    monkeypatch.setattr(common, "TINY_IMAGENET_URL", f"{serve(archive.parent)}/{archive.name}")
    monkeypatch.setattr(common, "TINY_IMAGENET_MD5", md5)
    data = tmp_path / "data"
    d = common.load_dataset("tinyimagenet", str(data))
    assert d.classes == ["n01", "n02", "n03"]
    assert d.train_x.shape == (12, 3, 64, 64) and d.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert d.test_x.shape == (6, 3, 64, 64) and d.test_y.tolist() == [int(w[-1]) - 1 for w in val]
    colour = lambda x: x.float().mean((-1, -2)).round()  # JPEG: near the colour, not exact
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        assert all(abs(colour(xi) - torch.tensor(COLOURS[yi])).max() < 8 for xi, yi in zip(x, y))
    assert sorted(os.listdir(data)) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]
    # the second start: no download (the URL is gone), the decoded images come from the cache
    monkeypatch.setattr(common, "TINY_IMAGENET_URL", "http://127.0.0.1:9/tiny-imagenet-200.zip")
    monkeypatch.setattr(common, "_decode", None)
    again = common.load_dataset("tinyimagenet", str(data), download=False)
    assert torch.equal(again.train_x, d.train_x) and torch.equal(again.test_y, d.test_y)


def test_tiny_imagenet_wrong_checksum_missing_and_offline(tmp_path, monkeypatch, serve):
    archive, md5, _ = _fake_tiny_imagenet(tmp_path)
    monkeypatch.setattr(common, "TINY_IMAGENET_URL", f"{serve(archive.parent)}/{archive.name}")
    monkeypatch.setattr(common, "TINY_IMAGENET_MD5", "0" * 32)
    with pytest.raises(common.UsageError, match="tinyimagenet not found or corrupted.*has MD5 " + md5) as e:
        common.load_dataset("tinyimagenet", str(tmp_path / "data"))
    assert "\n" not in str(e.value) and not (tmp_path / "data" / "tiny-imagenet-200").exists()
    with pytest.raises(common.UsageError, match="not found.*no-download"):
        common.load_dataset("tinyimagenet", str(tmp_path / "empty"), download=False)
    monkeypatch.setattr(common, "TINY_IMAGENET_URL", "http://127.0.0.1:9/tiny-imagenet-200.zip")
    with pytest.raises(common.UsageError, match="could not download tinyimagenet") as e:
        common.load_dataset("tinyimagenet", str(tmp_path / "offline"))
    assert "\n" not in str(e.value)


def _unpacked_tiny_imagenet(tmp_path):
    """The extracted layout, as a finished download leaves it, in tmp_path/data."""
    archive, _, _ = _fake_tiny_imagenet(tmp_path)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "data")
    return tmp_path / "data" / "tiny-imagenet-200" / "val" / "val_annotations.txt"


def test_tiny_imagenet_annotations_two_columns_crlf_missing_and_empty(tmp_path):
    annotations = _unpacked_tiny_imagenet(tmp_path)
    rows = [line.split("\t")[:2] for line in annotations.read_text().splitlines()]
    annotations.write_bytes("".join(f"{n}\t{w}\r\n" for n, w in rows).encode())  # 2 columns, CRLF
    d = common.load_dataset("tinyimagenet", str(tmp_path / "data"), download=False, cache=False)
    assert d.test_y.tolist() == [int(w[-1]) - 1 for _, w in rows]
    annotations.write_text("".join(f"{n}\t{w}\n" for n, w in rows) + "val_99.JPEG\tn01\n")
    with pytest.raises(common.UsageError, match="1 image.s. that do not exist.*val_99") as e:
        common.load_dataset("tinyimagenet", str(tmp_path / "data"), download=False)
    assert "\n" not in str(e.value)
    annotations.write_text("")
    with pytest.raises(common.UsageError, match="lists no images"):
        common.load_dataset("tinyimagenet", str(tmp_path / "data"), download=False)


def test_a_tiny_imagenet_zip_with_another_checksum_is_named(tmp_path, monkeypatch):
    archive, md5, _ = _fake_tiny_imagenet(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / archive.name).write_bytes(archive.read_bytes()[:-100])  # cut short
    monkeypatch.setattr(common, "TINY_IMAGENET_URL", "http://127.0.0.1:9/tiny-imagenet-200.zip")
    with pytest.raises(common.UsageError, match="has MD5 [0-9a-f]{32}, not " + common.TINY_IMAGENET_MD5):
        common.load_dataset("tinyimagenet", str(tmp_path / "data"))


# ----------------------------------------------------------------------------- place and batch


def test_place_and_batch_on_cpu():
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    idx = torch.tensor([7, 3, 3, 49, 0])
    for where in ("device", "host", "auto"):
        placed, used = common.place(x, "cpu", where)
        assert used == ("device" if where == "auto" else where) and torch.equal(placed, x)
        assert torch.equal(common.batch(placed, idx, "cpu"), x[idx])
    with pytest.raises(ValueError, match="where"):
        common.place(x, "cpu", "disk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_place_and_batch_on_cuda():
    x = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    host, used = common.place(x, "cuda", "host")
    assert used == "host" and host.is_pinned() and host.device.type == "cpu"
    assert common.place(x, "cuda", "auto")[1] == "device"  # 57 kB fit
    outs = [(idx, common.batch(host, idx, "cuda"))
            for idx in (torch.randperm(300)[:64] for _ in range(20))]  # copies in flight together
    torch.cuda.synchronize()
    assert all(torch.equal(out.cpu(), x[idx]) for idx, out in outs)
    on_device = common.place(x, "cuda", "device")[0]
    assert torch.equal(common.batch(on_device, outs[0][0].cuda(), "cuda").cpu(), x[outs[0][0]])


# ----------------------------------------------------------------------------- the disk store


def _photos(root, n=(6, 2), split_names=("train", "test")):
    """Images of several sizes, modes and formats (JPEG and PNG; RGB, grey, palette, CMYK, 16-bit)."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "P", "CMYK", "I;16", "RGBA"]
    for split, count in zip(split_names, n):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(count):
                w, h = rng.integers(20, 60, 2)
                mode = modes[(i + (c == "b")) % len(modes)]
                if mode == "I;16":
                    img = Image.fromarray(rng.integers(0, 65535, (h, w)).astype(np.uint16))
                else:
                    img = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).convert(mode)
                ext = "jpg" if mode == "CMYK" or mode in ("RGB", "L") and i % 2 else "png"
                img.save(root / split / c / f"{i}.{ext}")


def _stores(root):
    return sorted(f for f in os.listdir(root / ".cache") if f.startswith("store-"))


def test_the_store_holds_the_pixels_of_memory_and_makes_the_same_views(tmp_path, capsys, monkeypatch):
    import deepfusion as df
    _photos(tmp_path, split_names=("train", "val"))  # DIR/val is the test split when there is no test
    mem = common.load_dataset("imagefolder", str(tmp_path), image_size=16, disk=False)
    disk = common.load_dataset("imagefolder", str(tmp_path), image_size=16, disk=True)
    assert isinstance(disk.pretrain_x, common.DiskImages) and isinstance(disk.test_x, common.DiskImages)
    assert "note: preparing train (12 images of 16 px" in capsys.readouterr().err
    assert disk.pretrain_x.shape == mem.pretrain_x.shape and len(disk.test_x) == 4
    idx = torch.tensor([5, 0, 11, 5])
    assert torch.equal(disk.pretrain_x[idx], mem.pretrain_x[idx])
    assert torch.equal(disk.test_x[0:4], mem.test_x) and torch.equal(disk.test_y, mem.test_y)
    assert np.allclose(disk.mean, mem.mean, atol=1e-6) and np.allclose(disk.std, mem.std, atol=1e-6)
    u = torch.rand(2, 4, df.NU, generator=torch.Generator().manual_seed(0))
    views = [df.views_of(common.batch(d.pretrain_x, idx, "cpu"), u, df.Args(), 16) for d in (mem, disk)]
    assert torch.equal(*views)  # the same views, whichever path delivered the pixels
    disk.pretrain_x.prefetch(idx[:2])  # a read ahead is what a direct read gives
    assert torch.equal(disk.pretrain_x[idx[:2]], mem.pretrain_x[idx[:2]])
    sub = common.load_dataset("imagefolder", str(tmp_path), image_size=16, disk=True, num_samples=6)
    ref = common.load_dataset("imagefolder", str(tmp_path), image_size=16, disk=False, num_samples=6)
    assert torch.equal(sub.pretrain_x[0:6], ref.pretrain_x) and torch.equal(sub.train_y, ref.train_y)
    assert len(_stores(tmp_path)) == 4  # train and val, .u8 and .json; prepared once
    monkeypatch.setattr(common, "_available_memory", lambda: 2 * 3 * 16 * 16 * 16 - 1)  # 16 images
    assert isinstance(common.load_dataset("imagefolder", str(tmp_path), image_size=16).pretrain_x,
                      common.DiskImages)  # "auto": to disk when they take over half the memory
    monkeypatch.setattr(common, "_available_memory", lambda: 2 * 3 * 16 * 16 * 16)
    assert isinstance(common.load_dataset("imagefolder", str(tmp_path), image_size=16).pretrain_x,
                      torch.Tensor)


def _losses(run):
    return [r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
            if r["event"] == "epoch"]


@pytest.mark.parametrize("script", ["deepfusion.py", "bam.py"])
def test_training_from_the_disk_takes_the_steps_of_training_from_memory(script, tmp_path):
    _photos(tmp_path / "data", n=(16, 4), split_names=("train", "val"))
    flags = ["--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--image-size", "16",
             "--batch-size", "8", "--epochs", "2", "--linear-epochs", "2", "--eval-every", "1",
             "--amp", "off", *METHODS[script]["fast"]]
    runs = {}
    for where in ("device", "disk"):
        p = run_cli(script, *flags, "--data-on", where, "--output-dir", tmp_path / where)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"32 images 16px on {where}" in p.stdout  # the run header says which path
        runs[where] = run_dir_of(tmp_path / where)
    assert _losses(runs["disk"]) == _losses(runs["device"]) and len(_losses(runs["disk"])) == 2
    summary = [json.load(open(os.path.join(r, "summary.json"))) for r in runs.values()]
    assert summary[0]["knn_acc"] == summary[1]["knn_acc"]  # evaluation reads the store too


def test_a_killed_or_truncated_preparation_continues_and_never_reads_half_a_store(tmp_path, monkeypatch,
                                                                                    capsys):
    _photos(tmp_path, n=(10, 2))
    ref = common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=False).pretrain_x
    monkeypatch.setattr(common._store, "__defaults__", (True, 4))  # chunks of 4 images
    decode, calls = common._decode, []

    def dies_on_the_third_chunk(paths, size, chunk=64):
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as kill -9, after two chunks were written and counted
        return decode(paths, size, chunk)
    monkeypatch.setattr(common, "_decode", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True)
    monkeypatch.setattr(common, "_decode", decode)
    meta = json.load(open(tmp_path / ".cache" / next(f for f in _stores(tmp_path) if f.endswith(".json"))))
    assert meta["done"] == 8 and meta["n"] == 20
    capsys.readouterr()
    x = common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True).pretrain_x
    assert "from image 8 on" in capsys.readouterr().err and torch.equal(x[0:20], ref)
    store = tmp_path / ".cache" / next(f for f in _stores(tmp_path) if f.startswith("store-train") and
                                       f.endswith(".u8"))
    store.write_bytes(store.read_bytes()[: 3 * 8 * 8 * 9 + 5])  # a crash cut the file in image 10
    x = common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True).pretrain_x
    assert "from image 9 on" in capsys.readouterr().err and torch.equal(x[0:20], ref)
    calls.clear()
    monkeypatch.setattr(common, "_decode", lambda paths, size, chunk=64: calls.append(1) or decode(paths, size))
    x = common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True).pretrain_x
    assert calls == [] and "preparing" not in capsys.readouterr().err  # complete: never decoded again
    assert torch.equal(x[0:20], ref)


def test_store_reads_subsets_slices_and_empty_batches_from_one_open_file(tmp_path):
    _photos(tmp_path)
    ref = common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=False).pretrain_x
    x = common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True).pretrain_x
    fds = len(os.listdir("/proc/self/fd"))
    subs = [x.take(torch.tensor([3, 1, 7])) for _ in range(50)]
    assert len(os.listdir("/proc/self/fd")) == fds  # a subset shares the file
    assert torch.equal(subs[0][0:3], ref[torch.tensor([3, 1, 7])]) and subs[0].shape == (3, 3, 8, 8)
    assert torch.equal(x[2:9:3], ref[2:9:3]) and x[5:5].shape == (0, 3, 8, 8)
    assert torch.equal(x[torch.tensor([], dtype=torch.long)], ref[:0])
    store = next(p for p in (tmp_path / ".cache").iterdir() if p.name.startswith("store-train") and p.suffix == ".u8")
    os.truncate(store, 3 * 8 * 8 * 5)  # cut under a running job: one line, not a traceback
    with pytest.raises(common.UsageError, match="shorter than it should be") as e:
        x[torch.tensor([2, 9])]
    assert "\n" not in str(e.value)


def test_a_read_only_folder_on_the_disk_path_is_one_line(tmp_path, monkeypatch):
    _photos(tmp_path)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(common.os, "makedirs", read_only)
    with pytest.raises(common.UsageError, match="Read-only file system.*writable copy") as e:
        common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True)
    assert "\n" not in str(e.value)


def test_a_changed_folder_gets_a_new_store_and_the_old_one_is_removed(tmp_path):
    _photos(tmp_path)
    common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True)
    before = _stores(tmp_path)
    Image.new("RGB", (30, 20), (9, 9, 9)).save(tmp_path / "train" / "a" / "new.png")
    x = common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True).pretrain_x
    after = _stores(tmp_path)
    assert len(x) == 13 and (x[torch.tensor([6])] == 9).all()  # the new image, in its place
    assert len(after) == 4 and [f for f in after if f.startswith("store-train")] != \
        [f for f in before if f.startswith("store-train")]


def test_a_disk_too_small_or_full_is_one_line(tmp_path, monkeypatch):
    _photos(tmp_path)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: shutil_usage(0, 0, 1000))
    with pytest.raises(common.UsageError, match=r"needs 0.0 GB .* which has 0.0 GB free") as e:
        common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True)
    assert "\n" not in str(e.value)
    monkeypatch.undo()

    def full(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.os, "pwrite", full)
    with pytest.raises(common.UsageError, match="No space left on device.*continues at image 0"):
        common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True)


def shutil_usage(total, used, free):
    import collections
    return collections.namedtuple("usage", "total used free")(total, used, free)


def test_unreadable_images_on_the_disk_path_are_one_line(tmp_path):
    _photos(tmp_path)
    (tmp_path / "train" / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(common.UsageError, match="cannot read image .*empty.png") as e:
        common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True)
    assert "\n" not in str(e.value)
    (tmp_path / "train" / "b" / "empty.png").write_bytes(open(tmp_path / "train" / "b" / "0.png", "rb").read()[:60])
    with pytest.raises(common.UsageError, match="cannot read image .*empty.png"):  # truncated
        common.load_dataset("imagefolder", str(tmp_path), image_size=8, disk=True)
    with pytest.raises(common.UsageError, match="--data-on disk reads image folders"):
        common.load_dataset("synthetic", "unused", disk=True)
