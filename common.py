"""Dataset, metric and run helpers of deepfusion.py, transfusion.py and bam.py.

Each method file holds its method whole (flags, head, target, loss, augmentation, backbone, the
training loop). This module holds what a training script needs around it, nothing of any method,
in three sections, as DINO's utils.py serves main_dino.py:
- data: datasets as whole uint8 tensors (N, 3, H, W) with int64 labels (torchvision's downloads,
  image folders with a decoded cache, Tiny-ImageNet, a synthetic set), class-balanced subsets,
  placement in device memory or in pinned host memory; image folders larger than memory as a
  store on disk (DiskImages) read batch by batch, the next batch read ahead;
- metrics: backbone features, weighted k-NN, the linear probe, same-class mass, figures;
- run: generic flags, argument checks, CLI parsing with resume, torchrun/device/AMP set-up, the
  run directory and its logs, atomic writes, checkpoints, the non-finite watch, Ctrl-C.
The run helpers live here so that a method file is short enough to read in one sitting. They are
functions and one small `Run` object that the method's loop calls; it decides when to evaluate,
checkpoint and stop, and nothing here calls into a method file.
"""

import atexit
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import time
import urllib.error
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from torch import Tensor

DATASETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder", "synthetic")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
CACHE_VERSION = 2  # bump when the decoded pixels or the cache file's contents change


class UsageError(Exception):
    """Bad input from the user: the scripts print it as one line on stderr, exit status 2."""


def first_line(e):
    """The first line of an exception's message, for one-line errors; its type if it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _env_rank():  # this process's torchrun rank, for who prints (0 when unset or malformed)
    with contextlib.suppress(ValueError):
        return int(os.environ.get("RANK", 0))
    return 0


_warned = set()


def warn(message, kind="warning", once=True):
    """One line on stderr from rank 0, once per message unless not `once` (not warnings.warn:
    PYTHONWARNINGS=ignore hides it). kind "note": a fact about the run the user may not expect."""
    if not (once and message in _warned) and _env_rank() == 0:
        _warned.add(message)
        print(f"{kind}: {message}", file=sys.stderr)


def note(message, once=True):
    warn(message, "note", once)


@dataclasses.dataclass
class Data:
    pretrain_x: Tensor  # (N, 3, H, W) uint8: every image used for self-supervised pretraining
    train_x: Tensor  # (n, 3, H, W) uint8: the labelled train split (a view of pretrain_x's first n)
    train_y: Tensor  # (n,) int64
    test_x: Tensor  # (m, 3, H, W) uint8
    test_y: Tensor  # (m,) int64
    classes: list
    mean: tuple  # per-channel mean of pretrain_x in [0, 1]; inputs are (x - mean) / std
    std: tuple


# ============================================================================================ data


def load_dataset(name, data_dir, download=True, image_size=None, num_samples=None, *, seed=0,
                 cache=True, disk="auto"):
    """Load a dataset into memory. Raises UsageError with a one-line reason on bad input.

    name: one of DATASETS. image_size: resize to this side (None: the native size; folders 32).
    num_samples: keep a class-balanced random subset of N training images (balanced_subset, drawn
    with `seed`), in their original order, for pretraining and the labelled train split.
    STL-10 pretrains on train + unlabeled (the usual choice; with num_samples, train only); its
    k-NN/linear split is train/test. cache: keep the decoded images of image folders and
    Tiny-ImageNet in DIR/.cache for a fast next start (False: neither read nor write it). disk:
    an image folder is read from a store on disk (DiskImages) instead of memory: True, False, or
    "auto" (when its decoded images would take more than half the host's available memory).
    """
    if name == "synthetic":
        train_x, train_y, test_x, test_y, classes = _synthetic(image_size or 32)
        extra_x = None
    elif name == "imagefolder":  # DIR/train/<class>/*, and DIR/test/<class>/* or DIR/val/<class>/*
        size, extra_x = image_size or 32, None
        test = "val" if os.path.isdir(os.path.join(data_dir, "val")) and not os.path.isdir(
            os.path.join(data_dir, "test")) else "test"
        (train_p, train_y, classes), (test_p, test_y, test_classes) = [
            _image_files(os.path.join(data_dir, split)) for split in ("train", test)]
        if test_classes != classes:
            raise UsageError(f"{data_dir}/train and {data_dir}/{test} have different class folders")
        if disk == "auto":  # the decoded images against the host memory that is free, shared by
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1)  # the processes of a node
            disk = 3 * size * size * (len(train_p) + len(test_p)) > _available_memory() / 2 / local
        read = _store if disk else _decode_cached
        train_x, test_x = [read(p, size, data_dir, split, cache)
                           for p, split in ((train_p, "train"), (test_p, test))]
        train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    elif name == "tinyimagenet":
        train_x, train_y, test_x, test_y, classes = _tiny_imagenet(data_dir, download,
                                                                   image_size or 64, cache)
        extra_x = None
    elif name in ("cifar10", "cifar100", "stl10"):
        train_x, train_y, test_x, test_y, extra_x, classes = _torchvision(name, data_dir, download)
    else:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if disk is True and name != "imagefolder":
        raise UsageError(f"--data-on disk reads image folders (--dataset imagefolder); {name} is "
                         "loaded into memory (--data-on auto, device or host)")

    if num_samples is not None:
        if num_samples < 1:
            raise UsageError(f"--num-samples must be positive, got {num_samples}")
        if num_samples > len(train_y):
            note(f"--num-samples {num_samples} is more than the {len(train_y)} training images; "
                 "using all of them")
        keep = balanced_subset(train_y, num_samples, seed)
        train_x = train_x.take(keep) if isinstance(train_x, DiskImages) else train_x[keep]
        train_y, extra_x = train_y[keep], None
    pretrain_x = train_x if extra_x is None else torch.cat([train_x, extra_x])
    if image_size is not None and pretrain_x.shape[-1] != image_size:
        pretrain_x, test_x = resize(pretrain_x, image_size), resize(test_x, image_size)
    train_x = pretrain_x if len(pretrain_x) == len(train_y) else pretrain_x[: len(train_y)]

    mean, std = channel_statistics(pretrain_x)
    return Data(pretrain_x, train_x, train_y, test_x, test_y, list(classes),
                tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist()))


def channel_statistics(x, n=10_000):
    """Per-channel mean and std in [0, 1] of the first n images of x (a uint8 tensor or
    DiskImages): exact integer sums over parts of ~4M pixels (32 MB), so the memory they take is
    bounded and the numbers are the same from memory and from disk."""
    n, sums = min(n, len(x)), torch.zeros(2, 3, dtype=torch.int64)
    part = max(1, 4_000_000 // math.prod(x.shape[1:]))
    for i in range(0, n, part):
        v = x[i:min(i + part, n)].long()
        sums += torch.stack([v.sum((0, 2, 3)), (v * v).sum((0, 2, 3))])
    count, sums = n * x.shape[2] * x.shape[3], sums.double() / torch.tensor([[255.0], [255.0 ** 2]])
    var = (sums[1] - sums[0] ** 2 / count) / max(count - 1, 1)
    return sums[0] / count, var.clamp_min(0).sqrt()


def load_on_ranks(rank, world, *args, **kwargs):
    """load_dataset(*args, **kwargs) under torchrun: rank 0 loads (and downloads) first, the others
    learn how that went, then read its files. Every rank raises rank 0's UsageError; a rank that
    fails alone (e.g. a --data-dir not shared between nodes) raises one with .own = True."""
    import torch.distributed as dist

    def load():
        try:
            return load_dataset(*args, **kwargs), None
        except UsageError as e:
            return None, e
    data, error = load() if rank == 0 else (None, None)
    if world > 1:  # and rank 0's choice of disk or memory ("auto"), so that every rank makes it
        shared = [None if error is None else str(error),
                  data is not None and isinstance(data.pretrain_x, DiskImages)]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise UsageError(shared[0])
        if kwargs.get("disk") == "auto":
            kwargs["disk"] = shared[1]
        if rank > 0:
            data, error = load()
            if error is not None:
                error = UsageError(f"rank {rank}: {error}")
                error.own = True
    if error is not None:
        raise error
    return data


def balanced_subset(y, n, seed=0):
    """Sorted indices of n of the labels y: each class gets floor(n * n_c / N) or one more, in
    proportion to its size (largest remainder), drawn at random within the class. n >= N: all."""
    if n >= len(y):
        return torch.arange(len(y))
    classes, counts = y.unique(return_counts=True)
    quota = counts * n // len(y)
    remainder = counts * n - quota * len(y)  # ties go to the lower class (a stable sort)
    quota[remainder.argsort(descending=True, stable=True)[: n - int(quota.sum())]] += 1
    g = torch.Generator().manual_seed(seed)
    picks = [(y == c).nonzero().flatten()[torch.randperm(int(m), generator=g)[:q]]
             for c, m, q in zip(classes, counts, quota.tolist())]
    return torch.cat(picks).sort().values


@contextlib.contextmanager
def _download_errors(name, root, download):
    """Turn the errors of torchvision's download and integrity checks into a one-line UsageError."""
    try:
        yield
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"could not download {name} into {root!r} ({reason}); "
                         "check the network, or download it by hand and pass --data-dir") from None
    except RuntimeError:  # torchvision: "Dataset not found or corrupted", or a wrong md5
        hint = "" if download else "; --no-download is set, drop it to download"
        raise UsageError(f"{name} not found or corrupted in {root!r}{hint}") from None
    except OSError as e:
        raise UsageError(f"cannot read or write {name} in {root!r}: {e}") from None


def _torchvision(name, root, download):
    """CIFAR-10/100 and STL-10 through torchvision's own classes (download and integrity checks)."""
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[name]

    def split(which):
        kw = {"split": which} if name == "stl10" else {"train": which == "train"}
        with _download_errors(name, root, download):
            ds = cls(root, download=download, **kw)
        if name == "stl10":  # (N, 3, 96, 96) already; unlabeled images carry label -1
            x, y = torch.from_numpy(ds.data), ds.labels
        else:  # (N, 32, 32, 3) -> (N, 3, 32, 32)
            x, y = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), ds.targets
        return x, torch.as_tensor(y, dtype=torch.int64), ds.classes

    train_x, train_y, classes = split("train")
    test_x, test_y, _ = split("test")
    extra_x = split("unlabeled")[0] if name == "stl10" else None
    return train_x, train_y, test_x, test_y, extra_x, classes


def _tiny_imagenet(data_dir, download, size, cache):
    """Tiny-ImageNet-200 (downloaded and md5-checked once into data_dir/tiny-imagenet-200): the
    train split, and the labelled val split as the test split; classes are the sorted wnids."""
    root = os.path.join(data_dir, "tiny-imagenet-200")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    layout = (os.path.join(root, "wnids.txt"), os.path.join(root, "train"), annotations)
    archive = os.path.join(data_dir, "tiny-imagenet-200.zip")

    def bad_archive():  # why a zip that is there is not the official one ("": it is, or none)
        if not os.path.exists(archive):
            return ""
        md5 = torchvision.datasets.utils.calculate_md5(archive)
        return "" if md5 == TINY_IMAGENET_MD5 else (
            f"{archive!r} has MD5 {md5}, not {TINY_IMAGENET_MD5} (a partial or another "
            "download): delete it to download it again")
    if not all(os.path.exists(p) for p in layout):
        if reason := bad_archive():
            raise UsageError(f"tinyimagenet: {reason}")
        try:
            with _download_errors("tinyimagenet", data_dir, download):
                if not download:
                    raise RuntimeError
                # extracted beside, then renamed: a killed extraction never looks complete
                partial = os.path.join(data_dir, ".tiny-imagenet-200.partial")
                shutil.rmtree(partial, ignore_errors=True)
                torchvision.datasets.utils.download_and_extract_archive(
                    TINY_IMAGENET_URL, data_dir, extract_root=partial, md5=TINY_IMAGENET_MD5)
                os.replace(os.path.join(partial, "tiny-imagenet-200"), root)
                shutil.rmtree(partial)
        except UsageError as e:  # a download that arrived with another checksum: say which
            reason = bad_archive()
            raise UsageError(f"{e}: {reason}" if reason else str(e)) from None
    try:
        with open(os.path.join(root, "wnids.txt")) as f:
            wnids = sorted(f.read().split())
        with open(annotations) as f:  # name<TAB>wnid[<TAB>box...], LF or CRLF
            val = [line.rstrip("\r\n").split("\t")[:2] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read Tiny-ImageNet in {root!r}: {e}") from None
    train_paths, train_y, classes = _image_files(os.path.join(root, "train"))
    if classes != wnids:
        raise UsageError(f"{root!r}: the class folders of train/ are not the wnids of wnids.txt")
    label = {w: i for i, w in enumerate(wnids)}
    if not val:
        raise UsageError(f"{annotations!r} lists no images")
    if any(len(v) < 2 or v[1] not in label for v in val):
        raise UsageError(f"{annotations!r}: a line without a known wnid in its second column")
    test_paths = [os.path.join(root, "val", "images", v[0]) for v in val]
    missing = [p for p in test_paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"{annotations!r} lists {len(missing)} image(s) that do not exist, "
                         f"e.g. {missing[0]!r}")
    train_x = _decode_cached(train_paths, size, root, "train", cache)
    test_x = _decode_cached(test_paths, size, root, "test", cache)
    test_y = torch.as_tensor([label[v[1]] for v in val], dtype=torch.int64)
    return train_x, torch.as_tensor(train_y, dtype=torch.int64), test_x, test_y, classes


def _image_files(root):
    """(paths, labels, classes) of root/<class>/**/<image> (torchvision's ImageFolder layout and
    file extensions, sorted). Symbolic links are followed, except those that lead back into root:
    a loop (e.g. a link to ..) or another class's images would multiply and mislabel the data;
    they are refused. Only regular files count as images (a named pipe would hang the reading)."""
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root!r} does not exist "
                         "(expected DIR/train/<class>/* and DIR/test/<class>/*)")
    real_root = os.path.realpath(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UsageError(f"no images in {root!r}: no class folders")
    paths, labels = [], []
    for label, c in enumerate(classes):
        found = []
        for top, dirs, files in os.walk(os.path.join(root, c), followlinks=True):
            for d in dirs:
                link = os.path.join(top, d)
                target = os.path.realpath(link)
                if os.path.islink(link) and (target == real_root
                                             or target.startswith(real_root + os.sep)):
                    raise UsageError(f"image folder {root!r}: the link {link!r} leads back into "
                                     "the folder (a loop, or images counted twice); remove it")
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS):
                    path = os.path.join(top, name)
                    try:
                        regular = stat.S_ISREG(os.stat(path).st_mode)
                    except OSError as e:  # a dangling link, or no permission
                        link = " (a symbolic link whose target is missing)" * os.path.islink(path)
                        raise UsageError(f"cannot read {path!r}{link}: {e.strerror}") from None
                    if not regular:
                        raise UsageError(f"{path!r} is not a regular file (a pipe or device?)")
                    found.append(path)
        if not found:
            raise UsageError(f"no images in {root!r}: class folder {c!r} has none")
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def _read_image(path):
    """An image file as an RGB PIL image; 16-bit and 32-bit integer greys are scaled to 8 bits
    (PIL's convert("RGB") clips them, so they came out white)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # > 89 MPixel: refuse
        img = Image.open(path)
        img.load()
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I": integer greys of up to 16 bits (PNG)
        scale = 255 / 65535 if img.mode.startswith("I;16") or np.asarray(img).max() > 255 else 1
        img = Image.fromarray((np.asarray(img, dtype=np.float64) * scale).round().astype(np.uint8))
    return img.convert("RGB")


def _decode(paths, size, chunk=64):
    """Image files -> uint8 (N, 3, size, size): shorter side resized to `size`, then centre-cropped.
    Threads share the work: PIL releases the GIL while it decodes and resizes."""
    from PIL import Image, UnidentifiedImageError

    resize_crop = torchvision.transforms.Compose([
        torchvision.transforms.Resize(size), torchvision.transforms.CenterCrop(size)])
    x = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def work(start):
        for i in range(start, min(start + chunk, len(paths))):
            try:
                img = resize_crop(_read_image(paths[i]))
                x[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise UsageError(f"image {paths[i]!r} is too large to decode safely: {e}") from None
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise UsageError(f"cannot read image {paths[i]!r}: {e}") from None

    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        for _ in pool.map(work, range(0, len(paths), chunk)):  # re-raises a task's error here
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, decode no further chunks
    return x


def _key(paths, size, home):
    """What decoded images of these files depend on, hashed (SHA-256): the format version, the
    size, the decoding libraries' versions, and each file's name relative to home, byte size,
    mtime, ctime and inode (see _decode_cached for what that detects)."""
    from PIL import __version__ as pil_version

    h = hashlib.sha256(f"{CACHE_VERSION} {size} {torchvision.__version__} {pil_version}".encode())
    for p in paths:
        try:
            s = os.stat(p)
        except OSError as e:  # gone since it was listed
            raise UsageError(f"cannot read image {p!r}: {e.strerror}") from None
        h.update(b"\0" + os.fsencode(os.path.relpath(p, home))  # any bytes, not only UTF-8
                 + f"\0{s.st_size}\0{s.st_mtime_ns}\0{s.st_ctime_ns}\0{s.st_ino}".encode())
    return h.hexdigest()


def _decode_cached(paths, size, home, split, cache):
    """_decode(paths, size), kept in home/.cache/<split>-<size>-<key>.pt between runs.

    The key (_key) hashes the format version, the size, the versions of the libraries that decode
    and resize, and each file's name (relative to home), byte size, mtime, ctime and inode: adding,
    removing, renaming or writing a file gives another key, so the cache is rebuilt (POSIX sets
    ctime on every write, and no tool sets it back: cp -p and rsync -a keep only the mtime). A
    torch.save file rather than .npy: it holds the key, a SHA-256 of the pixels and the tensor,
    and is read with weights_only=True, so a planted file runs no code. Version, key, dtype, shape
    and the pixels' SHA-256 are checked on every load; a file that fails a check is rebuilt.
    """
    if not cache:
        return _decode(paths, size)
    key = _key(paths, size, home)
    folder = os.path.join(home, ".cache")
    prefix = f"{split}-{size}-"
    path = os.path.join(folder, f"{prefix}{key[:16]}.pt")
    shape = (len(paths), 3, size, size)
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
            x = saved["x"]
            if saved["version"] != CACHE_VERSION or saved["key"] != key:
                raise ValueError("another version or key")
            if x.dtype != torch.uint8 or tuple(x.shape) != shape:
                raise ValueError(f"{x.dtype} {tuple(x.shape)}, expected uint8 {shape}")
            if _sha256(x) != saved["sha256"]:  # torch.load does not check the bytes it reads
                raise ValueError("its pixels do not match their SHA-256")
            return x
        except Exception as e:  # whatever is wrong with the file, decoding again is the answer
            warn(f"cache {path!r} is unusable ({first_line(e)[:200]}); rebuilding it")
    x = _decode(paths, size)
    try:
        os.makedirs(folder, exist_ok=True)
        write_atomic(path, lambda f: torch.save(
            {"version": CACHE_VERSION, "key": key, "sha256": _sha256(x), "x": x}, f))
    except (OSError, RuntimeError) as e:  # read-only or full disk: run on without the cache
        reason = getattr(e, "strerror", None) or e  # without the file name: one warning per folder
        warn(f"cannot write the image cache in {folder!r} ({reason}); continuing without it")
        return x
    for name in os.listdir(folder):  # older keys of this split and size; stale temp files of a
        old = os.path.join(folder, name)  # killed run (never read; removed after an hour)
        with contextlib.suppress(OSError):
            if old != path and (name.startswith(prefix) or name.startswith(".")
                                and os.path.getmtime(old) < time.time() - 3600):
                os.remove(old)
    return x


def write_atomic(path, write):
    """write(file) into a new hidden temporary file beside path, fsync, rename it to path, fsync
    the directory: readers (and a crash, or a power loss) see the old file or the whole new one,
    never a part. On failure (OSError; torch.save reports a full disk as RuntimeError) the
    temporary file is removed and the error raised."""
    folder, name = os.path.split(os.path.abspath(path))
    f = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", suffix=".tmp", delete=False)
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(f.name)
        raise
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _sha256(x):
    """SHA-256 of a uint8 tensor's bytes (about 1 GB/s: 0.14 s for 50,000 images of 32 px)."""
    return hashlib.sha256(x.contiguous().numpy().data).hexdigest()


def _available_memory():
    """Bytes of host memory available to this process (Linux: MemAvailable; else all of it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _store(paths, size, home, split, cache=True, chunk=1024):
    """The images at size x size in home/.cache/store-<split>-<size>-<key>.u8, one uint8 (3, size,
    size) record after another, read by DiskImages. Prepared once, in parallel (_decode), chunk by
    chunk: each chunk is flushed to disk before the .json beside it counts it done, so a killed or
    failed preparation continues where it stopped, and a store is read only when complete. The key
    is the cache's (_key): a changed folder gets a new store (the old one is removed once the new
    one is complete)."""
    folder, key = os.path.join(home, ".cache"), _key(paths, size, home)
    per, n = 3 * size ** 2, len(paths)
    base = os.path.join(folder, f"store-{split}-{size}-{key[:16]}")
    meta = {"version": CACHE_VERSION, "key": key, "n": n, "size": size, "done": 0}
    with contextlib.suppress(OSError, ValueError), open(base + ".json") as f:
        old = json.load(f)
        if all(old.get(k) == meta[k] for k in ("version", "key", "n", "size")):
            meta = old
    try:  # a crash or a full disk can leave the file shorter than the images counted done
        done = min(meta["done"], os.path.getsize(base + ".u8") // per, n)
    except OSError:
        done = 0
    if done < n:
        try:
            os.makedirs(folder, exist_ok=True)
            free = shutil.disk_usage(folder).free
            fd = os.open(base + ".u8", os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only data folder
            raise UsageError(f"cannot write the store of {home}/{split} in {folder!r} "
                             f"({e.strerror or e}): --data-on disk needs a writable copy of the "
                             "folder (or use --data-on host)") from None
        need = (n - done) * per
        if need > free:
            os.close(fd)
            raise UsageError(f"the store of {home}/{split} needs {need / 1e9:.1f} GB in "
                             f"{folder!r}, which has {free / 1e9:.1f} GB free; free space, or use "
                             "a copy of the folder on a larger disk")
        note(f"preparing {split} ({n} images of {size} px, {n * per / 1e9:.1f} GB) in {base}.u8"
             + (f", from image {done} on" if done else ""), once=False)
        t0, shown = time.time(), 0.0
        try:
            for start in range(done, n, chunk):
                x = _decode(paths[start:start + chunk], size)
                os.pwrite(fd, x.numpy().tobytes(), start * per)
                os.fsync(fd)  # the pixels on disk before the count that says so
                meta["done"] = start + len(x)
                write_atomic(base + ".json", lambda f: f.write(json.dumps(meta).encode()))
                if time.time() - shown > 10 or meta["done"] == n:  # progress, about every 10 s
                    rate, shown = (meta["done"] - done) / (time.time() - t0), time.time()
                    note(f"preparing {split}: {meta['done']} / {n} images, {rate:.0f} img/s, "
                         f"{(n - meta['done']) / rate / 60:.1f} min to go", once=False)
        except (OSError, RuntimeError) as e:  # a full disk: the chunks done so far are kept
            reason = getattr(e, "strerror", None) or e
            raise UsageError(f"cannot write the store {base}.u8 ({reason}); "
                             f"starting again continues at image {meta['done']}") from None
        finally:
            os.close(fd)
        for name in os.listdir(folder):  # the stores of earlier versions of the folder
            if name.startswith(f"store-{split}-{size}-") and not name.startswith(
                    os.path.basename(base)):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
    return DiskImages(base + ".u8", n, size)


class DiskImages:
    """uint8 images (N, 3, S, S) in a store on disk (_store), read by index: the host memory they
    take is the batch being read (and one read ahead), not the dataset. x[idx] (a LongTensor or a
    slice) -> a uint8 tensor; x.take(keep) -> a subset. prefetch(idx) starts reading the next batch
    in a thread while the device trains on this one (Run.batches calls it). Reads are preads in a
    pool of threads (they release the GIL); pinned buffers when the device is CUDA (pin)."""

    def __init__(self, path, n, size):
        self.path, self.size = path, size
        self.rows = torch.arange(n)  # records of the file, in order (a subset: some of them)
        self.shape, self.device, self.dtype = (n, 3, size, size), "cpu", torch.uint8
        self.nbytes, self.pin, self.ahead = math.prod(self.shape), False, None
        self.file = open(path, "rb", buffering=0)  # closed with the last subset that reads it
        self.readers, self.prefetcher = ThreadPoolExecutor(8), ThreadPoolExecutor(1)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        idx = torch.arange(*idx.indices(len(self))) if isinstance(idx, slice) else idx.cpu()
        if self.ahead is not None and torch.equal(self.ahead[0], idx):  # read already, or reading
            (_, future), self.ahead = self.ahead, None
            return future.result()
        return self._read(idx)

    def take(self, keep):  # the same file and threads
        sub = copy.copy(self)
        sub.rows, sub.ahead = self.rows[keep], None
        sub.shape = (len(sub.rows), *self.shape[1:])
        sub.nbytes = math.prod(sub.shape)
        return sub

    def prefetch(self, idx):
        self.ahead = (idx.cpu(), self.prefetcher.submit(self._read, idx.cpu()))

    def _read(self, idx):
        out = torch.empty((len(idx), 3, self.size, self.size), dtype=torch.uint8,
                          pin_memory=self.pin)
        if not len(idx):
            return out
        buf, per, rows = out.view(len(idx), -1).numpy(), 3 * self.size ** 2, self.rows[idx].tolist()

        def read(i):
            try:
                short = os.preadv(self.file.fileno(), [buf[i]], rows[i] * per) != per
            except OSError as e:  # EIO: a failing disk
                raise UsageError(f"cannot read the store {self.path}: {e.strerror or e}") from None
            if short:
                raise UsageError(f"the store {self.path} is shorter than it should be (cut while "
                                 "the run read it?); the next start prepares the rest again")
        for _ in self.readers.map(read, range(len(idx))):
            pass
        return out


def _synthetic(size, n_train=512, n_test=256, n_classes=10):
    """Offline stand-in data: each class is a smooth random colour pattern; every image adds its
    own smooth variation, a random brightness and pixel noise. Learnable, not trivial; fixed."""
    g = torch.Generator().manual_seed(0)
    low = lambda n: F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size),
                                  mode="bilinear", align_corners=False)
    templates = low(n_classes)  # (C, 3, S, S)
    y = torch.arange(n_train + n_test) % n_classes
    y = y[torch.randperm(len(y), generator=g)]
    n = len(y)
    x = (0.6 * templates[y] + 0.4 * low(n)) * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = [f"class{c}" for c in range(n_classes)]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes


def resize(x, size, chunk=4096):
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), antialiased bilinear."""
    out = torch.empty(len(x), 3, size, size, dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        y = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out[i:i + chunk] = y.round().clamp(0, 255).to(torch.uint8)
    return out


def place(x, device, where="auto", reserve=0.25, reserve_bytes=2 << 30):
    """(images to train from, "device" or "host"): x on `device`, or kept in host memory (pinned
    for CUDA) for batch() to copy from. "auto": on the device when x fits in the free CUDA memory
    less max(reserve of it, reserve_bytes) kept for the model; always on a non-CUDA device."""
    device = torch.device(device)
    if isinstance(x, DiskImages):  # read batch by batch (pinned for CUDA)
        x.pin = device.type == "cuda"
        return x, "disk"
    if where not in ("auto", "device", "host"):  # "disk" is a DiskImages (load_dataset's choice)
        raise ValueError(f"where must be 'auto', 'device' or 'host' for a tensor, got {where!r}")
    if where == "auto":
        where = "device"
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if x.nbytes > free - max(reserve * free, reserve_bytes):
                where = "host"
    if where == "device":
        return x.to(device), where
    x = x.cpu()
    return (x.pin_memory() if device.type == "cuda" else x), where  # pinning needs CUDA


def batch(x, idx, device):
    """The images x[idx] on `device`, from x on the device (an index) or on the host (a copy)."""
    device = torch.device(device)
    if isinstance(x, DiskImages):
        return x[idx].to(device, non_blocking=True)
    if x.device.type != "cpu" or device.type != "cuda":
        return x[idx.to(x.device)].to(device)
    # A fresh pinned buffer per call: PyTorch's pinned-memory allocator does not hand it out again
    # until the asynchronous copy from it has finished, so no batch overwrites one in flight.
    idx = idx.cpu()
    buf = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
    torch.index_select(x, 0, idx, out=buf)
    return buf.to(device, non_blocking=True)


# ========================================================================================= metrics


@torch.no_grad()
def extract(backbone, x, norm, device, amp_dtype=None, batch=512):
    """Backbone features (N, D) in fp32 of un-augmented uint8 images x (on the device or the host),
    normalised by norm, in eval mode; amp_dtype: autocast to bf16/fp16, None: fp32."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    for i in range(0, len(x), batch):
        with torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None):
            xb = norm(x[i:i + batch].to(device, non_blocking=True).float() / 255)
            feats.append(backbone(xb.contiguous(memory_format=torch.channels_last)).float())
    backbone.train(was_training)
    return torch.cat(feats)


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs, seed, batch=1024):
    """Top-1 test accuracy of a linear classifier trained on frozen, standardised features
    (Adam 1e-3, cosine; ours: a fast, robust choice for a probe on cached features). Its own RNG:
    the probe does not consume the training run's."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    g = torch.Generator(train_f.device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = torch.nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    steps = max(1, epochs * -(-len(train_f) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(train_f), device=train_f.device, generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (clf(test_f).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted k-NN top-1 accuracy (the protocol of lightly's CIFAR benchmarks).

    Cosine similarity on L2-normalised features; each of the k nearest train samples votes for its
    class with weight exp(sim / t). k is clipped to the size of the feature bank. The weights of a
    query are computed as exp((sim - max sim) / t), the same vote scaled by one positive factor, so
    they cannot overflow at small t (exp(1 / t) overflows float32 for t below about 0.0113).
    """
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)  # (c, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        # topk is sorted: column 0 is the largest similarity
        votes.scatter_add_(1, train_y[idx], ((sim - sim[:, :1]) / t).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_f)


@torch.no_grad()
def same_class_mass(A, y):
    """Mean over rows i of sum_{j != i, y_j = y_i} A_ij, for A of shape (..., n, n) with rows
    summing to (at most) 1. Returns (mass with shape A.shape[:-2], chance): chance is the mass a row
    would put on its own class if it spread its weight uniformly over the other n - 1 samples."""
    same = (y[:, None] == y[None, :]).float()
    same.fill_diagonal_(0)
    mass = (A.float() * same).sum(-1).mean(-1)
    chance = (same.sum(1) / (len(y) - 1)).mean().item()
    return mass, chance


def class_sorted(y, n):
    """Indices of a class-balanced labelled probe batch of about n samples, sorted by label (for
    block-structured figures): the first n // C samples of each of the C classes (at least one)."""
    classes = y.unique()
    per_class = max(1, n // len(classes))
    return torch.cat([(y == c).nonzero().flatten()[:per_class] for c in classes])


def save_maps(path, maps, y, cell=2):
    """Save (L, n, n) non-negative matrices side by side as one PNG, rows and columns sorted by
    the class labels y (n,) (stable: samples keep their order within a class). Each panel is
    scaled to its own maximum (square root for contrast); thin red lines mark the class
    boundaries, so mass inside the diagonal blocks is same-class mass."""
    order = torch.sort(y, stable=True).indices
    maps, y = maps.detach().float()[:, order][:, :, order].cpu(), y[order]
    maps = (maps / maps.amax((1, 2), keepdim=True).clamp_min(1e-12)).sqrt()
    img = maps[:, None].repeat(1, 3, 1, 1)  # (L, 3, n, n) grey
    edges = (y[1:] != y[:-1]).nonzero().flatten().cpu() + 1
    red = torch.tensor([1.0, 0.0, 0.0])[:, None]
    for e in edges.tolist():
        img[:, :, e, :] = red
        img[:, :, :, e] = red
    img = img.repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    _save_png(img, path, nrow=len(img), padding=4, pad_value=1.0)



def save_views(path, rows, size=96):
    """Save images as one PNG grid, one row of 8 per entry of rows (each (n, 3, s, s) in [0, 1]:
    e.g. originals, then their views); smaller crops centred on white, small images enlarged
    to about `size` px so a person can see what the augmentation does."""
    side = max(r.shape[-1] for r in rows)
    pad = lambda r, p: F.pad(r, [p, side - r.shape[-1] - p] * 2, value=1.0)
    grid = torch.cat([pad(r.float(), (side - r.shape[-1]) // 2) for r in rows])
    up = max(1, size // side)
    _save_png(grid.repeat_interleave(up, 2).repeat_interleave(up, 3), path, nrow=8)


def _save_png(images, path, **grid):
    """torchvision's save_image, atomically; a figure that cannot be written (disk full) is a
    warning, not the end of a run."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomic(path, lambda f: torchvision.utils.save_image(images, f, "png", **grid))
    except OSError as e:
        warn(f"could not write the figure {path}: {e.strerror or e}")


# ============================================================================================= run
# The training script's set-up and bookkeeping, called by its loop; nothing here trains, evaluates
# or decides on its own when to: the method file says when.


@dataclasses.dataclass
class RunArgs:
    """The generic flags of every method file; its Args extends this class (tyro reads both)."""

    dataset: Literal[DATASETS] = "cifar10"
    """dataset; imagefolder reads DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*"""
    data_dir: str = "data"
    """where datasets are downloaded to / read from"""
    download: bool = True
    """download torchvision datasets that are missing from --data-dir"""
    cache: bool = True
    """keep decoded image folders in a cache file beside them (rebuilt when the folder changes)"""
    data_on: Literal["auto", "device", "host", "disk"] = "auto"
    """where the uint8 images live: device memory, pinned host memory copied per batch, or (image
    folders) a store on disk read per batch (auto: disk beyond half the free host memory, else the
    device if they fit, else the host)"""
    image_size: Optional[int] = None
    """resize images to this side length (default: native size; 32 for image folders)"""
    backbone: Literal["resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base"] = "resnet18"
    """torchvision ResNet (images <= 64 px get the CIFAR stem: 3x3 conv, no max-pool), or a Vision
    Transformer: tiny (width 192, 3 heads), small (384, 6), base (768, 12), 12 blocks each"""
    patch_size: Optional[int] = None
    """ViT patch side (default 4 at <= 32 px, 8 at <= 64 px, else 16: for CIFAR pick 4 or 8)"""
    num_samples: Optional[int] = None
    """use a seeded, class-balanced subset of N training images (default: all)"""
    batch_size: int = 512
    """images per optimisation step, over all processes (each contributes several views)"""
    epochs: int = 200
    """training epochs (the learning-rate schedule spans all of them)"""
    seed: int = 1
    """random seed (initialisation, data order, augmentation)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: cuda when available"""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """mixed precision; auto: bf16 (or fp16 with loss scaling) on cuda, off on cpu"""
    compile: bool = False
    """torch.compile the model"""
    output_dir: str = "runs"
    """parent of the run directories"""
    resume: Optional[str] = None
    """checkpoint.pt, or its run directory, to continue from (flags given now override its own)"""
    eval_every: int = 10
    """k-NN evaluation every N epochs (0: only at the end)"""
    linear_epochs: int = 100
    """epochs of the linear probe on frozen features"""
    knn_k: int = 200
    """neighbours in the weighted k-NN evaluation"""
    knn_t: float = 0.1
    """temperature of the weighted k-NN vote"""
    log_every: int = 50
    """print (and sync) the loss every N steps"""
    stop_epoch: Optional[int] = None
    """stop after this epoch as if interrupted, keeping the checkpoint (for testing --resume)"""
    sync_bn: bool = False
    """under torchrun: backbone BatchNorm statistics over the global batch, not each rank's shard"""
    clip_grad: float = 0.0
    """clip the gradient's norm over all parameters to this (0: off; BAM's ViT recipe: 0.3)"""


# Every generic numeric flag's accepted range, both ends included (each method file passes its
# own table too). Upper bounds keep a typo from exhausting memory or overflowing.
LIMITS = {"image_size": (8, 1024), "patch_size": (1, 1024), "num_samples": (1, 10**9),
          "batch_size": (2, 1 << 16),
          "epochs": (1, 100_000), "seed": (0, 2**32 - 3), "eval_every": (0, 100_000),
          "linear_epochs": (1, 100_000), "knn_k": (1, 100_000), "knn_t": (1e-4, 100.0),
          "log_every": (1, 10**9), "stop_epoch": (1, 100_000), "clip_grad": (0.0, 1e6)}
CHECKPOINT_KEYS = {"method", "args", "model", "optimizer", "scaler", "epoch", "step", "history",
                   "rng"}


def fail(msg, status=2, every_rank=False):
    """One line on stderr and exit: 2 for bad input, 1 for a failed run, 130 / 143 for Ctrl-C /
    SIGTERM. Under torchrun every rank meets the same error and rank 0 prints it; every_rank: an
    error of this rank alone."""
    if every_rank or _env_rank() == 0:
        print("error: " + " ".join(str(msg).split()), file=sys.stderr)
    leave(status)


_status = []  # the status common.py ended this process with (Run._exit under torchrun)


def leave(status):
    _status.append(status)
    raise SystemExit(status)


def check_args(args, limits):
    """Every numeric flag finite and inside its range (LIMITS and the method's `limits`), (min, max)
    pairs ordered. Else exit 2."""
    for name, (lo, hi) in {**LIMITS, **limits}.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and not (math.isfinite(v) and lo <= v <= hi):
                fail(f"{flag} must be in [{lo}, {hi}], got {v}")
        if isinstance(value, tuple) and value[0] > value[1]:
            fail(f"{flag} must be (min, max) with min <= max, got {value[0]} {value[1]}")


def _command(Args, values):
    """The command line that starts a run of this script with these argument values again."""
    words, default = [os.path.basename(sys.argv[0])], Args()
    for f in dataclasses.fields(Args):
        v, flag = values.get(f.name), "--" + f.name.replace("_", "-")
        v = tuple(v) if isinstance(v, list) else v  # JSON keeps (min, max) pairs as lists
        if f.name == "resume" or v == getattr(default, f.name) or v is None:
            continue
        if isinstance(v, bool):
            words.append(flag if v else "--no-" + flag[2:])
        else:
            words += [flag, *map(str, v if isinstance(v, tuple) else [v])]
    return "python " + " ".join(shlex.quote(w) for w in words)


def parse_args(Args, method, limits):
    """The command line as an Args (a RunArgs dataclass), with tyro; its errors are one line. With
    --resume the checkpoint's arguments are the defaults, so only the flags given now change
    anything; a checkpoint of another method or version is refused. From here on Ctrl-C and
    SIGTERM end the script in one line. -> (args, checkpoint or None)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)

    def cli(default=None):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return tyro.cli(Args, default=default)
        except SystemExit as e:
            if e.code:  # tyro draws a box; keep its first sentence on one line
                text = " ".join(re.sub(r"[\u2500-\u257f]", " ", err.getvalue()).split())
                text = re.sub(r"^([\w ]+) (?=\1:)", "", text)  # its title, repeated: once
                fail(text.split(" For full helptext")[0])
            raise

    args, ckpt = cli(), None
    if args.resume is not None:
        path = args.resume
        if os.path.isdir(path):  # a run directory
            path = os.path.join(path, "checkpoint.pt")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            assert isinstance(ckpt, dict) and "args" in ckpt and "model" in ckpt
        except FileNotFoundError:
            run_dir = os.path.dirname(os.path.abspath(path))
            with contextlib.suppress(OSError, ValueError), \
                    open(os.path.join(run_dir, "args.json")) as f:  # a run killed in epoch 1
                fail(f"run directory {run_dir!r} has no checkpoint: the run stopped during its "
                     "first epoch, before one was written; start it again with: "
                     + _command(Args, json.load(f)))
            fail(f"checkpoint {path!r} does not exist")
        except Exception as e:
            fail(f"cannot read checkpoint {path!r} (truncated, or not written by this script): "
                 f"{type(e).__name__} {first_line(e)[:160]}")
        if ckpt.get("method") != method:
            fail(f"{path!r} is a checkpoint of {ckpt.get('method')!r}, not {method}")
        missing = sorted(CHECKPOINT_KEYS - set(ckpt))
        unknown = [f"--{u.replace('_', '-')}" for u in sorted(
            set(ckpt["args"]) - {f.name for f in dataclasses.fields(Args)})]
        if missing or unknown:
            fail(f"checkpoint {path!r} was written by another version of this script: "
                 + (f"it lacks {', '.join(missing)}" if missing else
                    f"unknown argument(s) {', '.join(unknown)}"))
        # one-off flags (--stop-epoch) are not inherited
        args = dataclasses.replace(cli(Args(**{**ckpt["args"], "stop_epoch": None})), resume=path)
        for name in ("dataset", "data_dir", "image_size", "num_samples", "batch_size"):
            if getattr(args, name) != ckpt["args"][name]:
                note(f"resuming with --{name.replace('_', '-')} {getattr(args, name)}; the run "
                     f"so far used {ckpt['args'][name]}")
    check_args(args, limits)
    return args, ckpt


def param_groups(module, weight_decay, **extra):
    """The optimiser's groups of a module's trainable parameters: the weights, with weight decay,
    and what weight decay should not shrink (biases and norms, ndim <= 1, and a ViT's class token)
    without; "decay" says which is which (for a schedule). extra: more keys for both groups."""
    groups = [{"params": [], "weight_decay": weight_decay, "decay": True, **extra},
              {"params": [], "weight_decay": 0.0, "decay": False, **extra}]
    for name, p in module.named_parameters():
        if p.requires_grad:  # a ViT's fixed sin-cos position table is not trained
            groups[p.ndim <= 1 or name.endswith("class_token")]["params"].append(p)
    return groups


def keep_freed_memory():
    """CPU with glibc: keep freed memory for reuse instead of returning it to the OS. By default
    glibc unmaps the few-MB tensors of a step when freed, and the next step page-faults them in
    again (measured: the batched augmentation ran at half speed on CPU)."""
    with contextlib.suppress(OSError):  # not glibc (macOS, Windows, musl): nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def save_atomic(path, write):
    """write_atomic(path, write); a failed write (disk full) ends the run in one line, exit 1,
    the previous file intact."""
    try:
        write_atomic(path, write)
    except (OSError, RuntimeError) as e:
        fail(f"could not write {path}: {e}; its previous version (if any) is intact", status=1)


UNDEFINED = ("not a finite number: undefined on this data (e.g. a statistic over fewer than two "
             "samples, as with a test split of one image) or over skipped fp16 steps")


def finite(record, reason):
    """record (a dict) with every non-finite number made None, and an "undefined" entry that
    names them with the reason: no NaN or inf reaches a result file (strict JSON has none)."""
    bad = lambda v: isinstance(v, float) and not math.isfinite(v)
    out = {k: [None if bad(u) else u for u in v] if isinstance(v, list) else None if bad(v) else v
           for k, v in record.items()}
    undefined = [k for k, v in record.items() if bad(v) or isinstance(v, list) and any(map(bad, v))]
    return {**out, "undefined": {k: reason for k in undefined}} if undefined else out


# torch 2.14 deprecates torch.distributed.nn.functional for a private module; it is still the
# public, autograd-aware form of the collectives (torch >= 2.4), so that warning is silenced
warnings.filterwarnings("ignore", "torch.distributed.nn.functional", FutureWarning)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the global batch's training statistics over all ranks (--sync-bn), through
    autograd-aware all_reduce: nn.SyncBatchNorm's job, which refuses CPU tensors (untestable here).
    Same state_dict as BatchNorm2d; in eval mode, or in one process, it is BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        sum_ = lambda t: torch.distributed.nn.functional.all_reduce(t.sum((0, 2, 3)))  # all ranks
        n, xf = x.numel() // x.shape[1] * dist.get_world_size(), x.float()
        mean = sum_(xf) / n
        var = sum_((xf - mean[:, None, None]) ** 2) / n  # two passes: as exact as one process's
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm2d
        scale = self.weight * (var + self.eps).rsqrt()
        return (xf * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


_active = None  # the Run whose loop is going, for the signal handler


def _on_signal(signum, frame):
    """Ctrl-C or SIGTERM: one line and exit 130 / 143. SIGTERM (timeout, Slurm, docker) during
    training first finishes the step and saves a checkpoint there (Run.step_done)."""
    name, status = ("Ctrl-C", 130) if signum == signal.SIGINT else ("SIGTERM", 143)
    if _active is not None and signum == signal.SIGTERM and _active.training:
        _active.stop = True
        return
    fail(f"interrupted ({name}); " + (_active.kept(resume=True) if _active is not None else
                                      "nothing was written"), status=status)


class Run:
    """One training run's state around its loop: torchrun, device, AMP, the data, the run directory,
    progress lines, metrics.jsonl, checkpoints and resume, the non-finite watch, signals. The loop
    calls it; only rank 0 writes, logs and evaluates. `method` names the run directories and the
    checkpoints (a checkpoint of another method is refused)."""

    def __init__(self, method, args, ckpt):
        self.method, self.args, self.ckpt, B = method, args, ckpt, args.batch_size
        # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK. --batch-size is the global batch: each rank
        # draws the global batch and its randomness, then augments and encodes its shard of b images
        self.rank, self.world = self._ranks()
        if B % self.world:
            fail(f"--batch-size {B} (the global batch) must be divisible by the {self.world} "
                 "processes")
        b = B // self.world
        self.shard = slice(self.rank * b, (self.rank + 1) * b)  # this rank's images of a batch
        cuda = torch.cuda.is_available()
        dev = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
        if dev.type == "cuda" and not cuda:
            fail("--device cuda but no CUDA device is available")
        if dev.type == "cpu":
            keep_freed_memory()
        self.ctrl, self.stop, self.training, self.solo = None, False, False, False
        self.upcoming = torch.zeros(0, dtype=torch.long)  # the next batch, to read ahead from disk
        if self.world > 1:  # NCCL on GPUs, gloo on CPU; 1 h: the others wait while rank 0 evaluates
            if dev.type == "cuda":
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(dev)
            try:
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(hours=1))
                # host-side agreement between ranks (a stop, a failure of rank 0) without a sync
                self.ctrl = dist.new_group(backend="gloo") if dev.type == "cuda" else None
            except (RuntimeError, ValueError) as e:
                fail(f"could not start torch.distributed: {first_line(e)}", status=1)
            atexit.register(self._exit)
        self.device = dev
        self.amp = {"auto": "off" if dev.type == "cpu" else
                    "bf16" if torch.cuda.is_bf16_supported() else "fp16"}.get(args.amp, args.amp)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[self.amp]
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == "fp16")  # fp16 only
        torch.manual_seed(args.seed)  # the same on every rank: initial weights, order, views
        self.g = torch.Generator(dev).manual_seed(args.seed)  # data order and augmentation
        try:  # rank 0 loads (downloads) first, then the others
            data = load_on_ranks(self.rank, self.world, args.dataset, args.data_dir,
                                 args.download, args.image_size, args.num_samples, seed=args.seed,
                                 cache=args.cache, disk={"disk": True, "auto": "auto"}.get(
                                     args.data_on, False))
        except UsageError as e:  # own: this rank alone failed (e.g. --data-dir not shared)
            fail(e, every_rank=getattr(e, "own", False))
        self.N, self.size, self.data = len(data.pretrain_x), data.pretrain_x.shape[-1], data
        if B > self.N:
            fail(f"--batch-size {B} is larger than the training set ({self.N} images)")
        if len(data.train_y.unique()) < 2:
            note(f"the labelled images are of one class ({data.classes[int(data.train_y[0])]!r}): "
                 "k-NN and linear accuracy are 1.0 by construction")
        self.steps_per_epoch = self.N // B  # the last partial batch is dropped
        self.x, self.data_on = place(data.pretrain_x, dev, args.data_on)  # uint8 images
        n = len(data.train_y)  # the labelled images: all of them, or the first n (STL-10)
        self.train_x, self.train_y = self.x if n == self.N else self.x[:n], data.train_y.to(dev)
        self.test_x = place(data.test_x, dev, self.data_on)[0]
        self.test_y = data.test_y.to(dev)
        data.pretrain_x = data.train_x = data.test_x = None  # placed above (pinning copies them)
        mean, std = [torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (data.mean, data.std)]
        self.norm = lambda v: (v - mean) / std

    @staticmethod
    def _ranks():
        """(rank, world) from torchrun's RANK and WORLD_SIZE; refused in one line when they are
        left over in the environment of a plain `python` run (not torchrun's: malformed, a rank
        outside [0, world), or no MASTER_ADDR / MASTER_PORT to meet at)."""
        env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        hint = "start the script with torchrun, or unset RANK and WORLD_SIZE for one process"
        try:
            rank, world = int(env["RANK"] or 0), int(env["WORLD_SIZE"] or 1)
            int(os.environ.get("LOCAL_RANK", 0))
        except ValueError:
            fail(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {env['RANK']!r}, "
                 f"{env['WORLD_SIZE']!r}, {os.environ.get('LOCAL_RANK')!r}; {hint}",
                 every_rank=True)
        if not 0 <= rank < world:
            fail(f"RANK={rank} is not a rank of WORLD_SIZE={world}; {hint}", every_rank=True)
        if world > 1 and not (env["MASTER_ADDR"] and env["MASTER_PORT"]):
            fail(f"WORLD_SIZE={world} but MASTER_ADDR or MASTER_PORT is unset; {hint}",
                 every_rank=True)
        return rank, world

    def autocast(self):  # bf16 or fp16 (--amp), or fp32 with autocast off
        return torch.autocast(self.device.type, self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def images(self, idx, x=None):  # uint8 images x[idx] (default: the training set) on the device
        try:
            out = batch(self.x if x is None else x, idx, self.device)
        except UsageError as e:  # the disk store became unreadable during the run
            fail(e, status=1, every_rank=True)
        if x is None and isinstance(self.x, DiskImages) and len(self.upcoming):
            self.x.prefetch(self.upcoming)  # the next batch, read while the device trains on this
        return out

    def rand(self, *shape, seed=1):  # uniforms for figures and analyses: not the training RNG
        g = torch.Generator(self.device).manual_seed(self.args.seed + seed)
        return torch.rand(*shape, device=self.device, generator=g)

    def clip_gradients(self, opt, model):  # --clip-grad: the gradients' norm over all parameters
        if self.args.clip_grad:  # at most that, measured unscaled (fp16: the GradScaler's scale)
            self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), self.args.clip_grad)

    @contextlib.contextmanager
    def frozen(self, model):  # for an analysis: eval mode, no gradient, under --amp
        model.eval()
        with torch.no_grad(), self.autocast():
            yield
        model.train()

    def figure(self, name):
        return os.path.join(self.dir, "figures", name)

    def spread(self, n):  # indices of n training images spread over the set (and its classes)
        return torch.arange(0, self.N, max(1, self.N // n))[:n]

    def save_views(self, x, *views):  # figures/views.png: uint8 images x above their views
        save_views(self.figure("views.png"), [x.float() / 255, *views])

    def start(self, model, opt):
        """Resume (weights, optimizer, scaler, counters, RNG, a mid-epoch position) or make a run
        directory; the module to train: under torchrun in DDP, with --compile compiled. Sets
        `fresh`: a new run, on rank 0."""
        global _active
        a, ckpt = self.args, self.ckpt
        self.model, self.opt, scaler = model, opt, self.scaler
        if a.sync_bn:  # the backbone's BatchNorm over the global batch (heads see it already)
            for m in model.modules():
                if type(m) is nn.BatchNorm2d:
                    m.__class__ = GlobalBatchNorm  # same parameters and buffers
        self.epoch, self.history, self.position = 0, {"train_seconds": 0.0, "train_images": 0}, None
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                fail(f"checkpoint {a.resume!r} does not match this model: {first_line(e)}")
            scaler.load_state_dict(ckpt["scaler"])
            self.epoch, self.history = ckpt["epoch"], ckpt["history"]
            self.position = ckpt.get("position")  # None: written at the end of an epoch
            if a.epochs < self.epoch + (self.position is not None):
                fail(f"--epochs {a.epochs} is fewer than the {self.epoch} epochs this run has "
                     f"done; give --epochs {self.epoch} or more (as many: evaluate it again)")
            if self.position is not None and (a.batch_size != ckpt["args"]["batch_size"]
                                              or len(self.position["perm"]) != self.N):
                fail(f"{a.resume!r} was saved in the middle of epoch {self.epoch + 1} (SIGTERM): "
                     "resume it with the training set and --batch-size it had")
            torch.set_rng_state(ckpt["rng"]["torch"])
            self.g.set_state(ckpt["rng"]["data"].to(self.g.get_state().device))
            if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
            self.dir = os.path.dirname(os.path.abspath(a.resume))
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.dir = os.path.join(a.output_dir, f"{self.method}__{a.dataset}__{a.seed}__{stamp}")
            while os.path.exists(self.dir):
                self.dir += "_"
        # the schedules are functions of the step: counted in this run's batches, so a resume
        # with another --batch-size continues them where the fraction of training done left off
        self.step = self.epoch * self.steps_per_epoch + (self.position or {}).get("i", 0)
        self.last_good, self.fresh = self.epoch if ckpt else None, ckpt is None and self.rank == 0
        self.solo = True
        if self.rank == 0:
            self._make_run_dir()
        self._agree()  # under torchrun: the others end too if rank 0 could not make the directory
        _active, self.training = self, self.epoch < a.epochs  # SIGTERM: save, then stop
        # DDP averages gradients over ranks (and starts every rank from rank 0's weights)
        net = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        return torch.compile(net) if a.compile else net

    def _make_run_dir(self):
        """args.json (with every earlier part of a resumed run), metrics.jsonl (cut back to the
        checkpoint's records, so a resumed log reads like one never interrupted), the header."""
        try:
            os.makedirs(os.path.join(self.dir, "figures"), exist_ok=True)
            for name in os.listdir(self.dir):  # temporary files left by a killed write
                if name.endswith(".tmp"):
                    os.remove(os.path.join(self.dir, name))
            path, earlier = os.path.join(self.dir, "args.json"), []
            if self.ckpt is not None:
                with contextlib.suppress(OSError, ValueError), open(path) as f:
                    old = json.load(f)
                    earlier = old.pop("earlier", []) + [{**old, "until_epoch": self.epoch}]
            with open(path, "w") as f:
                json.dump({**dataclasses.asdict(self.args), "earlier": earlier}, f, indent=2)
            self.metrics = open(os.path.join(self.dir, "metrics.jsonl"), "a")
            keep = (self.ckpt or {}).get("log_bytes")
            if keep is not None and self.metrics.tell() > keep:  # written after the checkpoint
                self.metrics.truncate(keep)
        except OSError as e:
            fail(f"cannot write the run directory {self.dir!r}: {e.strerror or e}")
        a, W = self.args, self.world
        shards = f" = {W} processes x {a.batch_size // W}" if W > 1 else ""
        print(f"{self.method} | {a.dataset} {self.N} images {self.size}px on {self.data_on} | "
              f"{self.device} amp={self.amp} | batch {a.batch_size}{shards} | "
              f"{self.steps_per_epoch} steps/epoch | run dir {self.dir}")

    def _log(self, **record):  # one line of metrics.jsonl, strict JSON
        try:
            self.metrics.write(json.dumps(finite(record, UNDEFINED), allow_nan=False) + "\n")
            self.metrics.flush()
        except OSError as e:
            fail(f"could not write {self.dir}/metrics.jsonl: {e}", status=1)

    def kept(self, resume=False):
        """Which checkpoint a failed or interrupted run leaves (and how to resume from it)."""
        if self.last_good is None:
            return "no checkpoint was written"
        ckpt = f"{self.dir}/checkpoint.pt"
        return (f"the last good checkpoint is {ckpt} (epoch {self.last_good})"
                + (f"; resume with --resume {ckpt}" if resume else ""))

    def batches(self):
        """The global batches of one epoch, the same on every rank: index tensors (B,) of a
        permutation drawn from the run's generator `g` (after a mid-epoch resume: the saved one,
        from the saved position). Resets the epoch's sums and the non-finite watch."""
        B, dev, pos = self.args.batch_size, self.device, self.position
        self.t0, self.i, self.sums = time.time(), 0, {}
        self.bad_run = torch.zeros((), dtype=torch.long, device=dev)  # non-finite losses in a row
        self.bad_step = torch.full((), -1, dtype=torch.long, device=dev)  # first fatal step or -1
        if pos is None:
            self.perm = torch.randperm(self.N, device=dev, generator=self.g)
        else:  # resumed in the middle of this epoch
            self.perm, self.i, self.position = pos["perm"].to(dev), pos["i"], None
            self.t0 -= pos["seconds"]
            self.sums = {k: v.to(dev) for k, v in pos["sums"].items()}
            self.bad_run, self.bad_step = pos["bad_run"].to(dev), pos["bad_step"].to(dev)
        perm = self.perm.cpu() if self.data_on == "disk" else self.perm  # disk: host indices
        for i in range(self.i, self.steps_per_epoch):
            ahead = perm[(i + 1) * B:(i + 2) * B] if i + 1 < self.steps_per_epoch else perm[:0]
            self.upcoming = ahead[self.shard]  # the next batch, read ahead from disk
            yield perm[i * B:(i + 1) * B]

    def step_done(self, loss, **stats):
        """After each step: epoch sums and the non-finite watch, on the device; every --log-every
        steps a progress line (the loop's only host syncs). fp16: the GradScaler skips steps with a
        non-finite loss, so the run stops after 10 in a row. After SIGTERM: save and stop here."""
        for k, v in {"loss": loss, **stats}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.bad_run = torch.where(torch.isfinite(loss.detach()), 0, self.bad_run + 1)
        fatal = (self.bad_step < 0) & (self.bad_run >= (10 if self.amp == "fp16" else 1))
        self.bad_step = torch.where(fatal, self.step + 1, self.bad_step)
        self.step, self.i, a = self.step + 1, self.i + 1, self.args
        stop = self._agree()[1]  # every rank stops at the same step
        if self.step % a.log_every and self.i < self.steps_per_epoch and not stop:
            return
        if self.bad_step.item() >= 0:  # the same on every rank, so all of them stop here
            fail(f"non-finite loss at step {self.bad_step.item()} (epoch {self.epoch + 1}); "
                 f"stopping: {self.kept()}", status=1)
        if stop and self.i < self.steps_per_epoch:  # at an epoch's end, checkpoint() saves
            self._check_weights(f"at step {self.step}")
            self.solo = True
            if self.rank == 0:
                self._save({"i": self.i, "perm": self.perm.cpu(), "seconds": time.time() - self.t0,
                            "sums": {k: v.cpu() for k, v in self.sums.items()},
                            "bad_run": self.bad_run.cpu(), "bad_step": self.bad_step.cpu()})
            self._agree()
            self._stopped(f"at step {self.step} of epoch {self.epoch + 1}")
        if self.rank == 0:
            ips = self.i * a.batch_size / (time.time() - self.t0)
            eta = (a.epochs * self.steps_per_epoch - self.step) * a.batch_size / ips / 60
            means = "".join(f"{k} {(v / self.i).item():.4f} " for k, v in self.sums.items()
                            if k != "loss")
            lr = self.opt.param_groups[0]["lr"]
            print(f"epoch {self.epoch + 1}/{a.epochs} step {self.step} loss {loss.item():.4f} "
                  f"{means}lr {lr:.4g} {ips:.0f} img/s eta {eta:.1f} min")

    def _check_weights(self, when):  # a blown-up last update can leave NaN weights after a finite
        bad = [k for k, v in self.model.state_dict().items()  # loss; every rank checks
               if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            fail(f"non-finite weights {when} ({len(bad)} tensors, e.g. {bad[0]}); stopping: "
                 f"{self.kept()}", status=1)

    def epoch_done(self):
        """At the end of an epoch: no parameter or buffer may be non-finite (every rank checks),
        then rank 0 logs the epoch's record. Rank 0 works alone from here to checkpoint()."""
        a, steps = self.args, self.steps_per_epoch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self.t0
        self.history["train_seconds"] += seconds
        self.history["train_images"] += steps * a.batch_size
        self.epoch += 1
        self._check_weights(f"after epoch {self.epoch}")
        self.solo = True
        if self.rank == 0:
            self._log(event="epoch", epoch=self.epoch, step=self.step,
                      **{k: (v / steps).item() for k, v in self.sums.items()},
                      lr=self.opt.param_groups[0]["lr"], seconds=seconds,
                      images_per_sec=steps * a.batch_size / seconds)

    def eval_due(self):
        """Rank 0, every --eval-every epochs; not after the last one (the final evaluation is)."""
        a = self.args
        return self.rank == 0 and a.eval_every and self.epoch % a.eval_every == 0 \
            and self.epoch < a.epochs

    def features(self, backbone):
        """Backbone features (fp32) of the un-augmented labelled train and test images, in eval
        mode, under --amp: (train (n, D), test (m, D)). The last ones are kept for the probe."""
        ex = lambda x: extract(backbone, x, self.norm, self.device, self.amp_dtype)
        try:
            self.feats = ex(self.train_x), ex(self.test_x)
        except UsageError as e:  # the disk store became unreadable during the run
            fail(e, status=1, every_rank=True)
        return self.feats

    def report(self, epoch, feats, analysis):
        """The k-NN accuracy of features (train, test) and the method's analysis (a dict): logged,
        printed, and at epoch 0 kept as the random-init baseline. Returns the eval record."""
        knn = knn_accuracy(feats[0], self.train_y, feats[1], self.test_y,
                           len(self.data.classes), self.args.knn_k, self.args.knn_t)
        out = finite({"event": "eval", "epoch": epoch, "step": self.step, "knn_acc": knn,
                      **analysis}, UNDEFINED)
        self._log(**out)
        fmt = lambda v: (" ".join(f"{u:.3f}" for u in v) if isinstance(v, list) else
                         f"{v:.4f}" if isinstance(v, float) else f"{v}")
        print(" ".join(f"{k} {fmt(v)}" for k, v in out.items()))
        if epoch == 0:
            self.history["init"] = {k: out[k] for k in list(out)[3:]}  # all but event, epoch, step
        return out

    def checkpoint(self):
        """Rank 0 writes checkpoint.pt atomically (model, optimizer, scaler, counters, history, RNG
        states, arguments); under torchrun the others learn that it did. The run ends here after
        --stop-epoch, or after SIGTERM (every rank), resumable."""
        a = self.args
        if self.rank == 0:
            self._save(None)
        stop = self._agree()[1]
        self.training = self.epoch < a.epochs  # after the last epoch, SIGTERM just ends the run
        if a.stop_epoch is not None and a.stop_epoch <= self.epoch < a.epochs:
            if self.rank == 0:
                print(f"stopped after epoch {self.epoch} (--stop-epoch); resume with "
                      f"--resume {self.dir}/checkpoint.pt")
            leave(0)
        if stop and self.epoch < a.epochs:
            self._stopped(f"after epoch {self.epoch}")
        if self.rank and not self.training:
            _status.append(0)  # the others' part of the run is done: rank 0 finishes alone

    def _save(self, position):  # checkpoint.pt; position: where in an epoch, or None at its end
        rng = {"torch": torch.get_rng_state(), "data": self.g.get_state().cpu(),
               "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}
        self.metrics.flush()
        state = {"method": self.method, "args": dataclasses.asdict(self.args),
                 "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                 "history": self.history, "rng": rng, "position": position,
                 "log_bytes": self.metrics.tell()}
        save_atomic(os.path.join(self.dir, "checkpoint.pt"), lambda f: torch.save(state, f))
        self.last_good = self.epoch

    def _stopped(self, when):  # after SIGTERM, with a checkpoint saved where training stopped
        fail(f"terminated (SIGTERM) {when}; saved {self.dir}/checkpoint.pt; resume with "
             f"--resume {self.dir}/checkpoint.pt", status=143)

    def _agree(self, failed=0):
        """Under torchrun, what the ranks must agree on, on the host: [the status of rank 0's solo
        work (0: it went well), a stop (SIGTERM) asked on any rank]. After rank 0's solo work the
        others end too when it failed (it printed why), instead of waiting at a collective."""
        flags = [failed, int(self.stop)]
        if self.world > 1:
            flags = torch.tensor(flags)
            dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.ctrl)
            flags = flags.tolist()
        if self.solo:
            self.solo = False
            if flags[0]:
                leave(flags[0])
        return flags

    def _exit(self):  # at exit: rank 0 failed while the others wait for its solo work; tell them
        if self.solo and self.rank == 0:
            self.solo = False
            with contextlib.suppress(Exception):
                self._agree(failed=1)
        # gloo's threads must end while Python is alive: left to the interpreter's teardown they
        # abort the process ("terminate called without an active exception", SIGABRT)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        # ... and even then the teardown aborted 1 run in 8-12 on a loaded CPU (after this handler,
        # with no Python frame left): when common.py ended the run (an error line, a stop or the
        # end) nothing is left to do, so the process ends here with its status, skipping it
        if _status and not hasattr(sys, "last_value"):  # last_value: a traceback was printed
            for f in (sys.stdout, sys.stderr, getattr(self, "metrics", None)):
                with contextlib.suppress(Exception):
                    f.flush()
            os._exit(_status[-1])

    def finish(self, backbone, final):
        """Rank 0, after the final evaluation `final`: the linear probe on its features,
        backbone.pt and summary.json."""
        a, h = self.args, self.history
        linear = linear_probe(self.feats[0], self.train_y, self.feats[1], self.test_y,
                              len(self.data.classes), a.linear_epochs, a.seed)
        save_atomic(os.path.join(self.dir, "backbone.pt"),
                    lambda f: torch.save(backbone.state_dict(), f))
        summary = {"knn_acc": final["knn_acc"], "linear_acc": linear, "init": h.get("init"),
                   "epochs": a.epochs,
                   "normalization": {"mean": self.data.mean, "std": self.data.std},
                   "images_per_sec": h["train_images"] / max(h["train_seconds"], 1e-9),
                   **{k: final[k] for k in list(final)[4:]}}  # the method's analysis
        summary = finite(summary, UNDEFINED)
        self._log(event="final", **summary)
        save_atomic(os.path.join(self.dir, "summary.json"),
                    lambda f: f.write(json.dumps(summary, indent=2, allow_nan=False).encode()))
        print(f"done: knn_acc {summary['knn_acc']:.4f} linear_acc {linear:.4f} (random init: "
              f"knn_acc {h['init']['knn_acc']:.4f}) -> {self.dir}")
        _status.append(0)
