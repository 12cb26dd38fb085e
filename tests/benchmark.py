"""Speed and memory of the three method files, measured side by side in one run (run by hand).

    python tests/benchmark.py                       # CPU, batch 256, ResNet-18
    python tests/benchmark.py --device cuda --amp bf16   # adds images/s and s/epoch (eager, compiled)
    python tests/benchmark.py --backbone vit_small --image-size 224 --batch-size 16   # a ViT at 224 px

Prints a table and writes benchmark.json. Every figure is a median over --repeats after a warm-up; the
two sides of a ratio are timed in turns, so a slow period of a shared machine slows both alike:
1. augmentation: each file's batched augmentation against torchvision's per-image PIL pipeline with the
   same operations, both ending in the input normalisation (one process, --threads threads), views per
   second and the ratio;
2. step overhead: one full training step (augmentation, backbone, head, loss, backward, optimizer) over a
   backbone-only step (forward, trivial loss, backward, optimizer) on the same views, crop sizes and AMP;
3. peak memory of the full step (CPU: peak RSS increase of a fresh process; CUDA: max_memory_allocated);
4. CUDA only: training images per second and seconds per CIFAR-10 epoch (--amp), channels_last,
   without and with torch.compile;
5. BAM's backbone step with its two resolutions (global crops at the image size, local crops at
   half of it, one backbone call each) against one call on the same crops all at the image size
   (local crops upsampled): what the multi-resolution forward (and a ViT's resized position table)
   saves.
This file is not collected by pytest (its name does not start with test_).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bam  # noqa: E402
import common  # noqa: E402
import deepfusion  # noqa: E402
import transfusion  # noqa: E402

METHODS = ("deepfusion", "transfusion", "bam")


@dataclass
class Bench:
    device: Literal["cpu", "cuda"] = "cpu"
    """device of the training step"""
    batch_size: int = 256
    """images per step"""
    backbone: Literal["resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base"] = "resnet18"
    """torchvision ResNet or ViT (as the method files' --backbone)"""
    patch_size: Optional[int] = None
    """ViT patch side (default: the method files' default for --image-size)"""
    image_size: int = 32
    """image side: the images are resized to it (global views at this size, BAM's local at half)"""
    repeats: int = 5
    """timed repeats of the step figures (the median is reported); one warm-up run is not counted"""
    aug_repeats: int = 15
    """timed repeats of the augmentation figures (each about 0.2 s)"""
    threads: int = 1
    """torch threads for the augmentation comparison (the PIL pipeline runs on one)"""
    images: Optional[str] = None
    """image folder (DIR/train/<class>/*) of real images; default: ../shared/data/cifar10-mini if
    present, else synthetic images"""
    amp: Literal["off", "bf16"] = "off"
    """autocast for the step figures (CPU default off, as the training scripts' --amp auto)"""
    steps: bool = True
    """measure step overhead, memory and CUDA throughput too (--no-steps: augmentation only, fast)"""
    compile: bool = True
    """CUDA throughput with torch.compile too, beside eager (--no-compile: eager only, faster)"""
    ema_teacher: bool = False
    """bam.py with --ema-teacher (its teacher embeds every crop, without gradient)"""
    memory_of: Optional[str] = None
    """internal: measure the peak memory of one method's step in this (fresh) process"""


def median_seconds(fns, repeats, sync):
    """Median seconds of each function, one warm-up call each, then timed in turns."""
    for fn in fns:
        fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def pil_pipeline(size, scale, mean, std, blur=False, solarize=0.0):
    """torchvision's per-image SimCLR/DINO pipeline with the operations our batched code does."""
    import torchvision.transforms as T
    ops = [T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
    if blur:
        ops.append(T.RandomApply([T.GaussianBlur(2 * max(1, size // 20) + 1, (0.1, 2.0))], p=0.5))
    if solarize:
        ops.append(T.RandomSolarize(128, p=solarize))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def image_stats(x):
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    xf = x.float().div(255)
    return xf.mean((0, 2, 3)).tolist(), xf.std((0, 2, 3)).tolist()


def autocast(device):
    """The AMP setting of both step figures."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bench.amp == "bf16")


def method_parts(name, args, x, stats, device):
    """(augment: () -> inputs, full_step: () -> None, backbone_step_inputs, model) for one method, built
    from the file's own components exactly as its training loop uses them; stats: image_stats."""
    mod = {"deepfusion": deepfusion, "transfusion": transfusion, "bam": bam}[name]
    size = x.shape[-1]
    g = torch.Generator(device).manual_seed(0)
    model = {"deepfusion": deepfusion.DeepFusion, "transfusion": transfusion.TransFusion, "bam": bam.BAM}[name](
        args, size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    B = len(x)
    pair = torch.arange(B, device=device).repeat(2)
    mask = bam.same_image((2 + args.num_local_crops) * B, 2 * B, B, device) if name == "bam" else None
    mean, std = [torch.tensor(s, device=device).view(1, 3, 1, 1) for s in stats]

    def augment():  # as the training loop: draw the uniforms, augment, normalise
        if name == "bam":
            crops = mod.crops_of(x, torch.rand(2 + args.num_local_crops, B, mod.NU, device=device, generator=g), args, size)
        else:
            crops = (mod.views_of(x, torch.rand(2, B, mod.NU, device=device, generator=g), args, size),)
        return [(c - mean) / std for c in crops]

    def full_step():
        crops = augment()
        with autocast(device):
            out = model(*crops)
        if name == "deepfusion":
            loss = deepfusion.nt_xent(out, args.tau)
        elif name == "transfusion":
            loss = transfusion.jsd_loss(out, transfusion.target_affinity(pair))
        else:
            loss = bam.bam_objective(*out, B, args, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if name == "bam" and model.teacher is not None:
            model.update_teacher(0.996)

    return augment, full_step, [c.detach().clone() for c in augment()], model


def backbone_step(model, inputs, device):
    """Backbone only on the same crops: forward, a trivial loss, backward, optimizer."""
    opt = torch.optim.SGD(model.backbone.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with autocast(device):
            loss = sum(model.backbone(c.contiguous(memory_format=torch.channels_last)).float().square().mean()
                       for c in inputs if len(c))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def method_args(name, backbone):
    kw = dict(backbone=backbone, patch_size=bench.patch_size)
    if name == "bam":
        return bam.Args(**kw, ema_teacher=bench.ema_teacher)
    return {"deepfusion": deepfusion.Args, "transfusion": transfusion.Args}[name](**kw)


def load_images(n):
    folder, S = bench.images or os.path.join(ROOT, "..", "shared", "data", "cifar10-mini"), bench.image_size
    if os.path.isdir(os.path.join(folder, "train")):
        return common.load_dataset("imagefolder", folder, image_size=S).train_x[:n], f"real {S} px images from {folder}"
    return common.load_dataset("synthetic", "unused", image_size=S).train_x[:n], f"synthetic {S} px images"


def two_resolutions(model, glob, local, device):
    """5.: (seconds of a backbone step on the global and the local crops at their own sizes, seconds
    of one on the same crops with the local ones upsampled to the global size)."""
    up = F.interpolate(local, size=glob.shape[-2:], mode="bilinear", align_corners=False)
    return median_seconds([backbone_step(model, [glob, local], device),
                           backbone_step(model, [torch.cat([glob, up])], device)], bench.repeats, sync)


if __name__ == "__main__":
    bench = tyro.cli(Bench)
    device = torch.device(bench.device)
    if device.type == "cpu":
        common.keep_freed_memory()  # as the training scripts do on CPU
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if bench.memory_of:  # child process: peak memory of one method's full step
        x, _ = load_images(bench.batch_size)
        _, full_step, _, _ = method_parts(bench.memory_of, method_args(bench.memory_of, bench.backbone),
                                          x.to(device), image_stats(x), device)
        def status(key):  # KiB, Linux
            return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status("VmRSS:")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            full_step()
        sync()
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else
                (status("VmHWM:") - before) / 1024)
        print(json.dumps({"peak_mib": peak}))
        raise SystemExit(0)

    x, source = load_images(max(bench.batch_size, 512))
    stats = image_stats(x)  # the input normalisation, the same for both sides
    results = {"config": {**vars(bench), "source": source, "torch": torch.__version__, "cpus": os.cpu_count()},
               "methods": {}}
    print(f"{source}; device {device}; batch {bench.batch_size}; {bench.backbone}; amp {bench.amp}; "
          f"medians of {bench.aug_repeats} (augmentation) and {bench.repeats} (steps)")

    # 1. augmentation throughput
    torch.set_num_threads(bench.threads)
    pil_images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x[:256]]
    xb = x[:512].to(device)
    for name in METHODS:
        args = method_args(name, bench.backbone)
        S, blur = bench.image_size, bench.image_size > 64  # the files blur above 64 px
        if name == "bam":
            pipes = [pil_pipeline(S, args.global_scale, *stats, blur),
                     pil_pipeline(S, args.global_scale, *stats, blur, solarize=0.2)
                     ] + [pil_pipeline(S // 2, args.local_scale, *stats, blur)] * args.num_local_crops
        else:
            pipes = [pil_pipeline(S, (0.2 if S <= 64 else 0.08, 1.0), *stats, blur)] * 2
        augment = method_parts(name, args, xb, stats, device)[0]
        calls = 10 if S <= 64 else 1  # ours is fast: several batches per repeat, about as long as PIL
        ours_s, pil_s = median_seconds([lambda: [augment() for _ in range(calls)],
                                        lambda: [p(im) for im in pil_images for p in pipes]], bench.aug_repeats, sync)
        pil_vps = len(pil_images) * len(pipes) / pil_s
        ours_vps = calls * len(xb) * len(pipes) / ours_s
        results["methods"][name] = {"aug_views_per_sec": ours_vps, "pil_views_per_sec": pil_vps,
                                    "aug_speedup_vs_pil": ours_vps / pil_vps}
    torch.set_num_threads(os.cpu_count() if device.type == "cpu" else torch.get_num_threads())

    # 2. step overhead and 3. peak memory
    xb = x[: bench.batch_size].to(device)
    for name in METHODS if bench.steps else ():
        torch.manual_seed(0)
        _, full_step, inputs, model = method_parts(name, method_args(name, bench.backbone), xb, stats, device)
        full, base = median_seconds([full_step, backbone_step(model, inputs, device)], bench.repeats, sync)
        child = subprocess.run([sys.executable, __file__, "--memory-of", name, "--device", bench.device,
                                "--batch-size", str(bench.batch_size), "--backbone", bench.backbone,
                                "--image-size", str(bench.image_size),
                                *(["--patch-size", str(bench.patch_size)] if bench.patch_size else []),
                                "--amp", bench.amp, "--ema-teacher" if bench.ema_teacher else "--no-ema-teacher"],
                               capture_output=True, text=True)
        peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_mib"] if child.returncode == 0 else None
        results["methods"][name].update(step_seconds=full, backbone_step_seconds=base,
                                        step_overhead_vs_backbone=full / base, peak_memory_mib=peak)
        if name == "bam":  # 5.
            two, one = two_resolutions(model, *inputs, device)
            results["bam_two_resolutions"] = {"two_resolutions_s": two, "one_resolution_s": one,
                                              "saving": one / two}

    # 4. CUDA throughput (not measurable on a CPU-only machine)
    if device.type == "cuda" and bench.steps:
        for name in METHODS:
            for compiled in (False, True)[:1 + bench.compile]:
                torch.manual_seed(0)
                _, full_step, _, model = method_parts(name, method_args(name, bench.backbone), xb, stats, device)
                if compiled:
                    model.forward = torch.compile(model.forward)
                s = median_seconds([full_step], bench.repeats, sync)[0]
                key = "compiled" if compiled else "eager"
                results["methods"][name][f"cuda_images_per_sec_{key}"] = bench.batch_size / s
                results["methods"][name][f"cuda_seconds_per_cifar10_epoch_{key}"] = 50_000 / (bench.batch_size / s)

    rows = [("method", "aug views/s", "PIL views/s", "aug speedup", "step s", "backbone s", "overhead", "peak MiB")]
    for name, r in results["methods"].items():
        fmt = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)
        rows.append((name, fmt("aug_views_per_sec", ".0f"), fmt("pil_views_per_sec", ".0f"),
                     fmt("aug_speedup_vs_pil", ".1f") + "x", fmt("step_seconds", ".2f"),
                     fmt("backbone_step_seconds", ".2f"), fmt("step_overhead_vs_backbone", ".3f"),
                     fmt("peak_memory_mib", ".0f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if "bam_two_resolutions" in results:
        r = results["bam_two_resolutions"]
        print(f"bam backbone step, crops at two resolutions {r['two_resolutions_s']:.2f} s, all at "
              f"{bench.image_size} px {r['one_resolution_s']:.2f} s: {r['saving']:.2f}x")
    if device.type != "cuda":
        print("CUDA images/s and s/epoch: not measured (no CUDA device in this run)")
    elif bench.steps:
        print(f"{torch.cuda.get_device_name()}, amp {bench.amp}: images/s (s per 50,000-image epoch)")
        for name, r in results["methods"].items():
            print(f"  {name:12s}" + "".join(
                f"  {key} {r[f'cuda_images_per_sec_{key}']:,.0f} "
                f"({r[f'cuda_seconds_per_cifar10_epoch_{key}']:.1f} s)" for key in ("eager", "compiled")
                if f"cuda_images_per_sec_{key}" in r))
    with open("benchmark.json", "w") as f:
        json.dump(results, f, indent=2)
    print("wrote benchmark.json")
