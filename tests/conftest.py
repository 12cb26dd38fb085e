"""Shared test helpers: the repository root on sys.path, and running a method file as a user would."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The smallest run that still exercises every stage: 16 px synthetic images, 4 steps per epoch.
TINY = ["--dataset", "synthetic", "--image-size", "16", "--num-samples", "64", "--batch-size", "16",
        "--epochs", "2", "--linear-epochs", "2", "--eval-every", "1", "--log-every", "2", "--seed", "0"]

# per file: flags that make it small and fast, what its summary adds, its figures, a flag that changes
# the architecture (a checkpoint must then be refused), and non-positive values it must refuse
METHODS = {
    "deepfusion.py": dict(
        fast=["--head-layers", "2"], analysis={"same_class_attention": 2, "same_class_chance": None},
        figures=["attention_epoch0000.png", "attention_epoch0002.png"], other_arch=["--head-layers", "3"],
        bad=[("--tau", "0"), ("--tau", "-0.5"), ("--head-heads", "0")]),
    "transfusion.py": dict(
        fast=["--fusion-blocks", "1", "--width", "32"],
        analysis={"same_class_adjacency": 2, "same_class_chance": None, "partner_mass": None, "dead_rows": None},
        figures=["adjacency_epoch0000.png", "adjacency_epoch0002.png"], other_arch=["--width", "64"],
        bad=[("--width", "0"), ("--fusion-blocks", "-1")]),
    "bam.py": dict(  # with the EMA teacher, so resume covers its state too
        fast=["--num-local-crops", "1", "--proj-hidden", "64", "--proj-dim", "32", "--ema-teacher"],
        analysis={"same_class_target": None, "same_class_chance": None, "sinkhorn_col_dev": None,
                  "sinkhorn_row_dev": None, "embedding_std": None},
        figures=["target_source_epoch0000.png", "target_source_epoch0002.png"], other_arch=["--no-ema-teacher"],
        bad=[("--tau", "0"), ("--lam", "0"), ("--lam", "-1"), ("--sinkhorn-iters", "0")]),
}


def run_cli(script, *args, env=None, timeout=300, processes=1):
    """Run `python <script> args...` from the repository root, or with processes > 1
    `torchrun --standalone --nproc-per-node <processes> <script> args...`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return subprocess.run([sys.executable, *launcher, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def run_dir_of(output_dir):
    """The one run directory a run wrote under output_dir."""
    dirs = [os.path.join(output_dir, d) for d in os.listdir(output_dir)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def assert_usage_error(proc, *words):
    """Bad input: exit status 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def union_of_subspaces(n, D=64, K=4, r=3, noise=0.3, seed=0):
    """n points from K random r-dim subspaces of R^D, two noisy draws per point as its two views."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(K, D, r, generator=g))[0]
    def batch():
        y = torch.arange(n) % K
        p = torch.einsum("kdr,kr->kd", U[y], torch.randn(n, r, generator=g)) * (D / r) ** 0.5
        view = lambda: p + noise * torch.randn(n, D, generator=g)
        return torch.cat([view(), view()]), torch.cat([y, y])
    return batch


DRIVER = """
import runpy, sys, torch
script, mode, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]
if mode == "poison":  # after the optimizer's step number `at`, a weight is NaN
    for cls in (torch.optim.SGD, torch.optim.AdamW):
        def make(orig):
            def step(self, *a, **k):
                out = orig(self, *a, **k)
                calls[0] += 1
                if calls[0] >= at:
                    with torch.no_grad():
                        self.param_groups[0]["params"][0].fill_(float("nan"))
                return out
            return step
        cls.step = make(cls.step)
else:  # torch.save's call number `at` fails as on a full disk
    save = torch.save
    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            raise OSError(28, "No space left on device")
        return save(*a, **k)
    torch.save = failing
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


def run_patched(script, mode, at, *args):
    """Run a method file as __main__ with a fault injected: "poison" (a NaN weight after the optimizer's
    step number `at`) or "save" (torch.save's call number `at` fails as on a full disk)."""
    return subprocess.run([sys.executable, "-c", DRIVER, os.path.join(ROOT, script), mode, str(at),
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
