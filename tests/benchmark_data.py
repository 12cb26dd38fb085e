"""Benchmark of common.py's data path, run by hand (not collected by pytest):

  python tests/benchmark_data.py --folder DIR        # an image folder DIR/{train,test}/<class>/*
  python tests/benchmark_data.py --n 50000 --synthetic-dir /tmp/synth50k   # generated once, reused

(a) decoding images/s: the old sequential loop against common's parallel decoder;
(b) load_dataset("imagefolder") seconds: first start (decode + cache write) against a cached start;
(c) one 512-image batch: batch() from the host against an index of the tensor on the device.
A --folder is copied to a temporary directory first, so its cache is not left in the data.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision
from PIL import Image

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


def generate(root, n, size, classes=10):
    """n smooth random PNGs of size x size in root/{train,test}/<class>/ (5/6 train, 1/6 test)."""
    def one(i):
        split = "train" if (i // classes) % 6 else "test"
        folder = os.path.join(root, split, f"c{i % classes}")
        low = np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{i:06d}.png"))

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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", help="an image folder (default: generate --n images)")
    p.add_argument("--n", type=int, default=5000, help="images to generate without --folder")
    p.add_argument("--synthetic-dir", help="where to generate them (kept; reused if complete)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

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
                t, _ = timed(lambda: generate(root, args.n, args.size))
                print(f"generated {args.n} {args.size} px PNGs in {root} ({t:.1f} s)")
        shutil.rmtree(os.path.join(root, ".cache"), ignore_errors=True)
        paths = [q for split in ("train", "test")
                 for q in common._image_files(os.path.join(root, split))[0]]
        for q in paths:  # both decoders read from the OS page cache, not the first from the disk
            with open(q, "rb") as f:
                f.read()
        n = len(paths)
        rows = [("images", f"{n}", ""), ("CPU threads", f"{os.cpu_count()}", "")]

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
        width = max(len(r[0]) for r in rows)
        print(f"\n{'':{width}}  {'result':>14}  notes")
        for name, value, note in rows:
            print(f"{name:{width}}  {value:>14}  {note}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.folder and args.synthetic_dir:
            shutil.rmtree(os.path.join(args.synthetic_dir, ".cache"), ignore_errors=True)


if __name__ == "__main__":
    main()
