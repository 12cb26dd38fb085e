"""Benchmark of common.py's data path, run by hand (not collected by pytest):

  python tests/benchmark_data.py --folder DIR        # an image folder DIR/{train,test}/<class>/*
  python tests/benchmark_data.py --n 50000 --synthetic-dir /tmp/synth50k   # generated once, reused

(a) decoding images/s: the old sequential loop against common's parallel decoder;
(b) load_dataset("imagefolder") seconds: first start (decode + cache write) against a cached start;
(c) one 512-image batch: batch() from the host against an index of the tensor on the device.
A --folder is copied to a temporary directory first, so its cache is not left in the data.

  python tests/benchmark_data.py --pipelines --n 2000 --synthetic-dir /tmp/jpeg2k --size 224

(d) ImageNet-like JPEGs (300-500 px, generated once) to augmented, normalised batches of 2 x 224
views (Deep Fusion's) and of 2 x 224 + 6 x 96 crops (BAM's), images/s per CPU core: the peer
pipeline (torchvision ImageFolder + PIL RandomResizedCrop, flip, jitter, grayscale, DINO's PIL
blur and solarize, in a DataLoader with one worker process per core) against ours (the store of
--data-on disk, read with read-ahead, the batched augmentation of the method file, with as many
torch threads as the peer has workers), side by side. With --device cuda also ours feeding the
GPU: the store read on the host, copied, augmented there under bf16 (the peer's ratio beside it).
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def sequential_decode(paths, size):
    """The decoding loop of common.py before this change: the baseline."""
    resize_crop = torchvision.transforms.Compose([
        torchvision.transforms.Resize(size), torchvision.transforms.CenterCrop(size)])
    x = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        x[i] = torch.from_numpy(np.array(resize_crop(common._read_image(path)))).permute(2, 0, 1)
    return x


def generate(root, n, size, classes=10, jpeg=False):
    """n smooth random PNGs of size x size in root/{train,test}/<class>/ (5/6 train, 1/6 test);
    jpeg: ImageNet-like JPEGs instead (quality 90, sides 300-500 px, noise), in {train,val}."""
    def one(i):
        rng = np.random.default_rng(i)
        split = "train" if (i // classes) % 6 else "val" if jpeg else "test"
        folder = os.path.join(root, split, f"c{i % classes}")
        w, h = rng.integers(300, 501, 2) if jpeg else (size, size)
        low = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3) if jpeg else (4, 4, 3))
        img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BILINEAR))
        if jpeg:  # JPEG's size and decoding time depend on detail: some noise, as in photographs
            img = (img + rng.integers(-12, 13, img.shape)).clip(0, 255).astype(np.uint8)
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.{'jpg' if jpeg else 'png'}"),
                                  **({"quality": 90} if jpeg else {}))

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, range(n)))


def timed(fn, repeat=1):
    """(best seconds of `repeat` calls, the last result)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


class PilBlur:
    """DINO's GaussianBlur: PIL's filter with a radius ~ U(0.1, 2), with probability p."""
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0))) \
            if random.random() < self.p else img


class PilSolarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def peer_views(crops, mean, std):
    """The peer transform: for each (size, scale, blur p, solarize p) one view, as DINO's
    DataAugmentationDINO (BAM's released code) and SimCLR's ImageNet recipe build them."""
    T = torchvision.transforms
    ts = [T.Compose([T.RandomResizedCrop(size, scale, interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                     T.RandomGrayscale(0.2), PilBlur(blur), PilSolarize(solar), T.ToTensor(),
                     T.Normalize(mean, std)]) for size, scale, blur, solar in crops]
    return lambda img: [t(img) for t in ts]


def pipelines(root, workers, batch, steps, size, device):
    """(d): rows of images/s, the peer against ours, for Deep Fusion's views and BAM's crops."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bam
    import deepfusion
    torch.set_num_threads(workers)
    t_prep, data = timed(lambda: common.load_dataset("imagefolder", root, image_size=size,
                                                     disk=True))
    x, n = data.pretrain_x, len(data.pretrain_x)
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    rows = [("(d) store preparation", f"{(n + len(data.test_x)) / t_prep:,.0f} img/s",
             f"{workers} threads, JPEG decode + resize to {size} px + write")]
    perm = torch.randperm(n)
    t_read = timed(lambda: [x[perm[i:i + batch]] for i in range(0, n - batch + 1, batch)], 3)[0]
    count = (n // batch) * batch
    rows.append(("(d) store reads (page cache)", f"{count / t_read:,.0f} img/s",
                 f"{count * x[0:1].nbytes / t_read / 1e9:.2f} GB/s, batches of {batch} in random order"))
    ba = bam.Args(num_local_crops=6, local_size=96)
    u = lambda v, imgs, g, nu: torch.rand(v, len(imgs), nu, generator=g, device=imgs.device)
    recipes = {  # name: (peer crops, ours: uniforms (V, B, NU) -> augmented tensors)
        "2 x 224": ([(size, (0.08, 1.0), 0.5, 0.0)] * 2,
                    lambda imgs, g: [deepfusion.views_of(
                        imgs, u(2, imgs, g, deepfusion.NU),
                        deepfusion.Args(), size)]),
        "2 x 224 + 6 x 96": ([(size, ba.global_scale, 1.0, 0.0), (size, ba.global_scale, 0.1, 0.2)]
                             + [(96, ba.local_scale, 0.5, 0.0)] * 6,
                             lambda imgs, g: bam.crops_of(
                                 imgs, u(8, imgs, g, bam.NU), ba, size))}
    for name, (crops, augment) in recipes.items():
        loader = torch.utils.data.DataLoader(
            torchvision.datasets.ImageFolder(os.path.join(root, "train"),
                                             peer_views(crops, data.mean, data.std)),
            batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
            persistent_workers=True, prefetch_factor=2)

        def peer():
            count, t = 0, None
            while count < steps * batch:  # epochs as needed
                for views, _ in loader:
                    if t is None:  # timed from the first batch on: the workers have started
                        t = time.perf_counter()
                    else:
                        count += len(views[0])
                    if count >= steps * batch:
                        break
            return count / (time.perf_counter() - t)

        def ours(amp, dev=torch.device("cpu")):
            g, perm = torch.Generator(dev).manual_seed(0), torch.randperm(n)
            idx = [perm[i * batch % (n - batch):][:batch] for i in range(steps + 1)]
            m, s = mean.to(dev), std.to(dev)
            x.pin = dev.type == "cuda"  # as common.place does for a CUDA run
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            t = time.perf_counter()
            for i in range(steps + 1):
                if i == 1:
                    sync()
                    t = time.perf_counter()  # after the first batch, as the peer's
                if i < steps:
                    x.prefetch(idx[i + 1])  # Run.images reads the next batch ahead
                with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                    views = [(v - m) / s for v in augment(common.batch(x, idx[i], dev), g)]
            sync()
            return steps * batch / (time.perf_counter() - t)

        p = peer()
        del loader
        rows.append((f"(d) {name}, peer ({workers} workers)", f"{p / workers:,.1f} img/s/core",
                     f"{p:,.1f} img/s"))
        for amp in (False, True):
            o = ours(amp)
            rows.append((f"(d) {name}, ours ({'bf16' if amp else 'fp32'})",
                         f"{o / workers:,.1f} img/s/core", f"{o:,.1f} img/s, x{o / p:.2f}"))
        if device.type == "cuda":  # the store read on the host, copied, augmented on the GPU
            o = ours(True, device)
            rows.append((f"(d) {name}, ours on {torch.cuda.get_device_name()} (bf16)", "",
                         f"{o:,.1f} img/s, x{o / p:.2f}"))
    return rows


def show(rows):
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'result':>16}  notes")
    for name, value, note in rows:
        print(f"{name:{width}}  {value:>16}  {note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", help="an image folder (default: generate --n images)")
    p.add_argument("--n", type=int, default=5000, help="images to generate without --folder")
    p.add_argument("--synthetic-dir", help="where to generate them (kept; reused if complete)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, help="default 512; 64 with --pipelines")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pipelines", action="store_true", help="(d) only, on generated JPEGs")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="(d): processes, threads")
    p.add_argument("--steps", type=int, default=20, help="(d): batches timed per pipeline")
    args = p.parse_args()
    args.batch = args.batch or (64 if args.pipelines else 512)

    scratch = tempfile.mkdtemp(prefix="benchmark_data_")
    try:
        if args.folder:
            root = os.path.join(scratch, "data")
            shutil.copytree(args.folder, root)  # copy2 keeps the mtimes; the cache goes in here
        else:
            root = args.synthetic_dir or os.path.join(scratch, "data")
            count = sum(len(f) for _, _, f in os.walk(root)) if os.path.isdir(root) else 0
            if count != args.n:
                shutil.rmtree(root, ignore_errors=True)
                t, _ = timed(lambda: generate(root, args.n, args.size, jpeg=args.pipelines))
                print(f"generated {args.n} images in {root} ({t:.1f} s)")
        shutil.rmtree(os.path.join(root, ".cache"), ignore_errors=True)
        test = "val" if args.pipelines else "test"
        paths = [q for split in ("train", test)
                 for q in common._image_files(os.path.join(root, split))[0]]
        for q in paths:  # both decoders read from the OS page cache, not the first from the disk
            with open(q, "rb") as f:
                f.read()
        n = len(paths)
        rows = [("images", f"{n}", ""), ("CPU threads", f"{os.cpu_count()}", "")]
        if args.pipelines:
            rows += pipelines(root, args.workers, args.batch, args.steps, args.size,
                              torch.device(args.device))
            return show(rows)

        t_seq, ref = timed(lambda: sequential_decode(paths, args.size))
        t_par, out = timed(lambda: common._decode(paths, args.size))
        assert torch.equal(ref, out), "the parallel decoder changed the pixels"
        rows += [("(a) decode, sequential loop", f"{n / t_seq:,.0f} img/s", f"{t_seq:.2f} s"),
                 ("(a) decode, parallel", f"{n / t_par:,.0f} img/s",
                  f"{t_par:.2f} s, x{t_seq / t_par:.2f}")]

        load = lambda **kw: common.load_dataset("imagefolder", root, image_size=args.size, **kw)
        t_nocache, _ = timed(lambda: load(cache=False))
        t_first, _ = timed(load)
        t_cached, data = timed(load, repeat=3)
        size = sum(os.path.getsize(os.path.join(root, ".cache", f))
                   for f in os.listdir(os.path.join(root, ".cache")))
        rows += [("(b) load_dataset, cache=False", f"{t_nocache:.2f} s", ""),
                 ("(b) load_dataset, first start", f"{t_first:.2f} s", "decode + cache write"),
                 ("(b) load_dataset, cached start", f"{t_cached:.3f} s",
                  f"{t_cached / n * 1e4:.3f} s per 10k images; cache {size / 2**20:.0f} MiB")]

        x, dev = data.pretrain_x, torch.device(args.device)
        idx = torch.randperm(len(x))[: args.batch]
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        host = common.place(x, dev, "host")[0]
        on_dev = common.place(x, dev, "device")[0]
        idx_dev = idx.to(dev)

        def run(fn):
            def go():
                for _ in range(20):
                    out = fn()
                sync()
                return out
            return timed(go, repeat=5)[0] / 20

        t_host = run(lambda: common.batch(host, idx, dev))
        t_index = run(lambda: common.batch(on_dev, idx_dev, dev))
        mb = args.batch * x[0].nbytes / 2**20
        rows += [(f"(c) batch() from the host ({dev.type})", f"{t_host * 1e3:.3f} ms",
                  f"{args.batch} images, {mb:.1f} MiB"),
                 (f"(c) index on the device ({dev.type})", f"{t_index * 1e3:.3f} ms", "")]
        if dev.type == "cpu":  # both paths are the same gather; what a copy over would add:
            gathered = x[idx]
            t_copy = run(lambda: gathered.clone())
            rows.append(("(c) a copy of the batch (memcpy)", f"{t_copy * 1e3:.3f} ms",
                         f"{t_copy / (t_copy + t_index):.0%} of gather + copy"))
        show(rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.folder and args.synthetic_dir:
            shutil.rmtree(os.path.join(args.synthetic_dir, ".cache"), ignore_errors=True)


if __name__ == "__main__":
    main()
