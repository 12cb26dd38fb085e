"""Dataset and metric helpers shared by deepfusion.py, transfusion.py and bam.py.

Nothing method-specific lives here. Datasets come back as whole uint8 tensors (N, 3, H, W) with
int64 labels, so a training script can keep them on the GPU and slice batches out of them.

How large a dataset can be: place() keeps the uint8 tensor on the GPU while it fits in the free GPU
memory (less a margin for the model), else in pinned host memory, from which batch() copies each
batch over. The host path goes up to the host's RAM: the whole uint8 tensor must fit in memory
(Tiny-ImageNet at 64 px: 1.2 GB; ImageNet-1k at 64 px: 15 GB). Beyond RAM this design does not go:
there is no streaming from disk.
"""

import contextlib
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

DATASETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder", "synthetic")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
CACHE_VERSION = 1  # bump when the decoded pixels or the cache file's contents change


class UsageError(Exception):
    """Bad input from the user. The scripts print it as one line on stderr and exit with status 2."""


@dataclass
class Data:
    pretrain_x: Tensor  # (N, 3, H, W) uint8: every image used for self-supervised pretraining
    train_x: Tensor  # (n, 3, H, W) uint8: the labelled train split (a view of pretrain_x's first n)
    train_y: Tensor  # (n,) int64
    test_x: Tensor  # (m, 3, H, W) uint8
    test_y: Tensor  # (m,) int64
    classes: list
    mean: tuple  # per-channel mean of pretrain_x in [0, 1]; inputs are (x - mean) / std
    std: tuple


# ----------------------------------------------------------------------------- datasets


def load_dataset(name, data_dir, download=True, image_size=None, num_samples=None, *, seed=0,
                 cache=True):
    """Load a dataset into memory. Raises UsageError with a one-line reason on bad input.

    name: one of DATASETS. image_size: resize to this side (None: the native size; folders 32).
    num_samples: keep a class-balanced random subset of N training images (balanced_subset, drawn
    with `seed`), in their original order, for pretraining and the labelled train split.
    STL-10 pretrains on train + unlabeled (the usual choice; with num_samples, train only); its
    k-NN/linear split is train/test. cache: keep the decoded images of image folders and
    Tiny-ImageNet in DIR/.cache for a fast next start (False: neither read nor write it).
    """
    if name == "synthetic":
        train_x, train_y, test_x, test_y, classes = _synthetic(image_size or 32)
        extra_x = None
    elif name == "imagefolder":
        size = image_size or 32
        train_x, train_y, classes = _image_folder(data_dir, "train", size, cache)
        extra_x = None
        test_x, test_y, test_classes = _image_folder(data_dir, "test", size, cache)
        if test_classes != classes:
            raise UsageError(f"{data_dir}/train and {data_dir}/test have different class folders")
    elif name == "tinyimagenet":
        train_x, train_y, test_x, test_y, classes = _tiny_imagenet(data_dir, download,
                                                                   image_size or 64, cache)
        extra_x = None
    elif name in ("cifar10", "cifar100", "stl10"):
        train_x, train_y, test_x, test_y, extra_x, classes = _torchvision(name, data_dir, download)
    else:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")

    if num_samples is not None:
        if num_samples < 1:
            raise UsageError(f"--num-samples must be positive, got {num_samples}")
        keep = balanced_subset(train_y, num_samples, seed)
        train_x, train_y, extra_x = train_x[keep], train_y[keep], None
    pretrain_x = train_x if extra_x is None else torch.cat([train_x, extra_x])
    if image_size is not None and pretrain_x.shape[-1] != image_size:
        pretrain_x, test_x = resize(pretrain_x, image_size), resize(test_x, image_size)
    train_x = pretrain_x[: len(train_y)]

    sample = pretrain_x[:10_000].float() / 255  # statistics of (at most) the first 10k images
    mean, std = sample.mean((0, 2, 3)), sample.std((0, 2, 3)).clamp_min(1e-3)
    return Data(pretrain_x, train_x, train_y, test_x, test_y, list(classes),
                tuple(mean.tolist()), tuple(std.tolist()))


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
    if world > 1:
        shared = [None if error is None else str(error)]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise UsageError(shared[0])
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
            return torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64), ds.classes
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return x, torch.as_tensor(ds.targets, dtype=torch.int64), ds.classes

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
    if not all(os.path.exists(p) for p in layout):
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
    try:
        with open(os.path.join(root, "wnids.txt")) as f:
            wnids = sorted(f.read().split())
        with open(annotations) as f:
            val = [line.split("\t")[:2] for line in f if line.strip()]
    except OSError as e:
        raise UsageError(f"cannot read Tiny-ImageNet in {root!r}: {e}") from None
    train_paths, train_y, classes = _image_files(os.path.join(root, "train"))
    if classes != wnids:
        raise UsageError(f"{root!r}: the class folders of train/ are not the wnids of wnids.txt")
    label = {w: i for i, w in enumerate(wnids)}
    if any(len(v) < 2 or v[1] not in label for v in val):
        raise UsageError(f"{annotations!r}: a line without a known wnid in its second column")
    test_paths = [os.path.join(root, "val", "images", v[0]) for v in val]
    train_x = _decode_cached(train_paths, size, root, "train", cache)
    test_x = _decode_cached(test_paths, size, root, "test", cache)
    test_y = torch.as_tensor([label[v[1]] for v in val], dtype=torch.int64)
    return train_x, torch.as_tensor(train_y, dtype=torch.int64), test_x, test_y, classes


def _image_files(root):
    """(paths, labels, classes) of root/<class>/**/<image> (torchvision's ImageFolder layout and file
    extensions, sorted). Symbolic links are followed, except those that lead back into root: a loop
    (e.g. a link to ..) or another class's images would multiply and mislabel the data; they are
    refused. Only regular files count as images (a named pipe would hang the reading)."""
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
                    raise UsageError(f"image folder {root!r}: the link {link!r} leads back into the "
                                     "folder (a loop, or images counted twice); remove it")
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS):
                    path = os.path.join(top, name)
                    if not stat.S_ISREG(os.stat(path).st_mode):
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


def _image_folder(data_dir, split, size, cache):
    """data_dir/split/<class>/* -> uint8 (N, 3, size, size), labels, classes."""
    paths, labels, classes = _image_files(os.path.join(data_dir, split))
    x = _decode_cached(paths, size, data_dir, split, cache)
    return x, torch.as_tensor(labels, dtype=torch.int64), classes


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


_warned = set()


def _warn(message):
    """One line on stderr, once per message (not warnings.warn: PYTHONWARNINGS=ignore hides it)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _decode_cached(paths, size, home, split, cache):
    """_decode(paths, size), kept in home/.cache/<split>-<size>-<key>.pt between runs.

    The key hashes the format version, the size, the library versions that decode and resize, and
    each file's name relative to home, byte size and mtime: an added, removed or touched file gives
    another key, so the cache is rebuilt. A torch.save file rather than .npy: it holds the key and
    the tensor together and is read with weights_only=True, so a planted file runs no code. The
    key, dtype and shape are checked on every load; a file that fails any check is rebuilt.
    """
    if not cache:
        return _decode(paths, size)
    from PIL import __version__ as pil_version

    h = hashlib.sha256(f"{CACHE_VERSION} {size} {torchvision.__version__} {pil_version}".encode())
    for p in paths:
        s = os.stat(p)
        h.update(f"\0{os.path.relpath(p, home)}\0{s.st_size}\0{s.st_mtime_ns}".encode())
    key = h.hexdigest()
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
            return x
        except Exception as e:  # whatever is wrong with the file, decoding again is the answer
            _warn(f"cache {path!r} is unusable ({str(e).splitlines()[0][:200]}); rebuilding it")
    x = _decode(paths, size)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{prefix}", suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            torch.save({"version": CACHE_VERSION, "key": key, "x": x}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        tmp = None
    except (OSError, RuntimeError) as e:  # read-only or full disk: run on without the cache
        reason = getattr(e, "strerror", None) or e  # without the file name: one warning per folder
        _warn(f"cannot write the image cache in {folder!r} ({reason}); continuing without it")
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        return x
    for name in os.listdir(folder):  # older keys of this split and size; stale temp files of a
        old = os.path.join(folder, name)  # killed run (never read; removed after an hour)
        with contextlib.suppress(OSError):
            if old != path and (name.startswith(prefix) or name.startswith(".")
                                and os.path.getmtime(old) < time.time() - 3600):
                os.remove(old)
    return x


def _synthetic(size, n_train=512, n_test=256, n_classes=10):
    """Offline stand-in data: each class is a smooth random colour pattern; every image adds its own
    smooth variation, a random brightness and pixel noise. Learnable, not trivial; always the same."""
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
    if where not in ("auto", "device", "host"):
        raise ValueError(f"where must be 'auto', 'device' or 'host', got {where!r}")
    device = torch.device(device)
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
    if x.device.type != "cpu" or device.type != "cuda":
        return x[idx.to(x.device)].to(device)
    # A fresh pinned buffer per call: PyTorch's pinned-memory allocator does not hand it out again
    # until the asynchronous copy from it has finished, so no batch overwrites one in flight.
    idx = idx.cpu()
    buf = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
    torch.index_select(x, 0, idx, out=buf)
    return buf.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- metrics


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
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * -(-len(train_f) // batch)))
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
        return accuracy(clf(test_f), test_y)


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
        votes.scatter_add_(1, train_y[idx], ((sim - sim[:, :1]) / t).exp())  # topk is sorted: column 0 = max
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_f)


def accuracy(logits, y):
    """Top-1 accuracy as a float in [0, 1]."""
    return (logits.argmax(1) == y).float().mean().item()


@torch.no_grad()
def same_class_mass(A, y):
    """Mean over rows i of sum_{j != i, y_j = y_i} A_ij, for A of shape (..., n, n) with rows summing
    to (at most) 1. Returns (mass with shape A.shape[:-2], chance): chance is the mass a row would put
    on its own class if it spread its weight uniformly over the other n - 1 samples."""
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
    """Save (L, n, n) non-negative matrices, rows and columns sorted by class label y (n,), side by
    side as one PNG. Each panel is scaled to its own maximum (square root for contrast); thin red
    lines mark the class boundaries, so mass inside the diagonal blocks is same-class mass."""
    maps = maps.detach().float().cpu()
    maps = (maps / maps.amax((1, 2), keepdim=True).clamp_min(1e-12)).sqrt()
    img = maps[:, None].repeat(1, 3, 1, 1)  # (L, 3, n, n) grey
    edges = (y[1:] != y[:-1]).nonzero().flatten().cpu() + 1
    red = torch.tensor([1.0, 0.0, 0.0])[:, None]
    for e in edges.tolist():
        img[:, :, e, :] = red
        img[:, :, :, e] = red
    img = img.repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torchvision.utils.save_image(img, path, nrow=len(img), padding=4, pad_value=1.0)



def save_views(path, rows, size=96):
    """Save images as one PNG grid, one row of 8 per entry of rows (each (n, 3, s, s) in [0, 1]:
    e.g. originals, then their views); smaller crops centred on white, small images enlarged
    to about `size` px so a person can see what the augmentation does."""
    side = max(r.shape[-1] for r in rows)
    pad = lambda r, p: F.pad(r, [p, side - r.shape[-1] - p] * 2, value=1.0)
    grid = torch.cat([pad(r.float(), (side - r.shape[-1]) // 2) for r in rows])
    up = max(1, size // side)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torchvision.utils.save_image(grid.repeat_interleave(up, 2).repeat_interleave(up, 3), path, nrow=8)
