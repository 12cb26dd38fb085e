"""torchrun (CPU, gloo): 2 processes, each with half of the global batch, take the same step as 1 process
with the whole batch: the same loss, gradients and parameters, and the same outputs."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import DRIVER, METHODS, ROOT, run_cli, run_dir_of

# One optimizer step: 16 images, global batch 16 (8 per process); fp32; BatchNorm over the global batch
# (per-process statistics differ from one process's by design, so --sync-bn is what makes them equal).
ONE_STEP = ["--dataset", "synthetic", "--image-size", "16", "--num-samples", "16", "--batch-size", "16",
            "--epochs", "1", "--linear-epochs", "2", "--eval-every", "0", "--seed", "0", "--amp", "off", "--sync-bn"]


def _run(script, out, processes, *flags):
    p = run_cli(script, *flags, "--output-dir", out, processes=processes)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return run_dir_of(out)


def _losses(run):
    return [r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if r["event"] == "epoch"]


def _gradients(ckpt):
    """Each parameter's gradient of the step, read from the optimizer state (the SGD momentum buffer is
    grad + weight decay * param after one step, AdamW's exp_avg is (1 - beta1) grad)."""
    state = ckpt["optimizer"]["state"]
    return [s["momentum_buffer"] if "momentum_buffer" in s else s["exp_avg"] for _, s in sorted(state.items())]


def _checkpoints(*runs):
    return [torch.load(os.path.join(r, "checkpoint.pt"), weights_only=True) for r in runs]


def _files(run):
    return sorted(os.path.relpath(os.path.join(d, f), run) for d, _, fs in os.walk(run) for f in fs)


VIT = ["--backbone", "vit_tiny", "--patch-size", "4"]  # 16 px images: 4 x 4 tokens (locals: 2 x 2)


@pytest.mark.parametrize("script,backbone", [(s, []) for s in METHODS] + [("bam.py", VIT)])
def test_two_processes_take_the_one_process_step(script, backbone, tmp_path):
    flags = [*ONE_STEP, *METHODS[script]["fast"], *backbone]
    one = _run(script, tmp_path / "one", 1, *flags)
    two = _run(script, tmp_path / "two", 2, *flags)
    # Tolerances: float32 summation order. Two one-process runs with 1 and 2 threads differ as much:
    # losses by 1e-6 relative, a parameter's gradient by up to 1% (median 0.002%-0.4% per file), and
    # gradients that are 0 in exact arithmetic (a bias before a BatchNorm) by 1e-7 absolute.
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = _checkpoints(one, two)
    ga, gb = _gradients(a), _gradients(b)
    assert len(ga) == len(gb) > 0
    for x, y in zip(ga, gb):  # a wrong gradient scale (DDP, all_gather) would be 50% off or more
        assert (x - y).norm() <= 0.05 * x.norm() + 1e-6, (x.shape, (x - y).norm() / x.norm())
    for k, v in a["model"].items():  # parameters and BatchNorm buffers
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-4), k
    # the same outputs: files, arguments, summary entries
    assert _files(one) == _files(two)
    args = [json.load(open(os.path.join(r, "args.json"))) for r in (one, two)]
    assert {**args[0], "output_dir": None} == {**args[1], "output_dir": None}
    sa, sb = [json.load(open(os.path.join(r, "summary.json"))) for r in (one, two)]
    assert sa.keys() == sb.keys() and sb["knn_acc"] == pytest.approx(sa["knn_acc"], abs=0.02)


def test_two_processes_reading_their_shards_from_the_disk_take_the_one_process_step(tmp_path):
    from test_data import _photos
    _photos(tmp_path / "data", n=(8, 2), split_names=("train", "val"))  # 16 training images
    flags = [*ONE_STEP[2:], "--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--data-on", "disk",
             *METHODS["bam.py"]["fast"]]
    one = _run("bam.py", tmp_path / "one", 1, *flags)
    two = _run("bam.py", tmp_path / "two", 2, *flags)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = _checkpoints(one, two)
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-4), k


@pytest.mark.parametrize("script", METHODS)
def test_resume_under_torchrun(script, tmp_path):
    # 2 steps: interrupted after the first under torchrun, resumed under torchrun; compared with one
    # uninterrupted single-process run
    flags = [*ONE_STEP, *METHODS[script]["fast"], "--epochs", "2"]
    one = _run(script, tmp_path / "one", 1, *flags)
    two = _run(script, tmp_path / "two", 2, *flags, "--stop-epoch", "1")
    assert len(_losses(two)) == 1
    p = run_cli(script, "--resume", os.path.join(two, "checkpoint.pt"), processes=2)
    assert p.returncode == 0, p.stderr[-3000:]
    # float noise grows with the second step (measured for deepfusion: one-process runs with 1 and 2 threads
    # end 7e-5 apart in a parameter, this comparison 1.4e-4; second-step losses 2e-5 and 6e-5 relative);
    # resuming with the wrong data order, augmentation or state would be far outside these tolerances
    assert _losses(two) == pytest.approx(_losses(one), rel=5e-4)
    a, b = _checkpoints(one, two)
    assert a["step"] == b["step"] == 2
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-3), k


def test_global_batch_must_split_evenly(tmp_path):
    p = run_cli("deepfusion.py", *ONE_STEP, "--batch-size", "15", "--num-samples", "30", "--output-dir", tmp_path,
                processes=2)
    assert p.returncode != 0 and "divisible" in p.stderr
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)


def test_failed_download_under_torchrun_is_one_error_line(tmp_path):
    # rank 0 downloads while the others wait: they must learn that it failed and stop quietly,
    # not crash at a barrier with tracebacks that bury rank 0's message
    proxy = "http://127.0.0.1:9"  # refuses at once, as a machine without network does
    p = run_cli("bam.py", "--dataset", "cifar10", "--data-dir", tmp_path, "--output-dir", tmp_path / "runs",
                env={"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy},
                processes=2)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not download cifar10" in errors[0], p.stderr[-3000:]
    assert "[rank" not in p.stderr  # no worker traceback (torchrun's own summary may follow)


def test_a_failed_write_on_rank_0_ends_every_rank_at_once(tmp_path):
    # rank 0 writes alone while the others wait for it: its failure must reach them (one error line,
    # no tracebacks of theirs), not leave them at the next collective until its timeout
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    flags = [*ONE_STEP, "--epochs", "3", "--head-layers", "1", "--output-dir", tmp_path / "runs"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        driver, os.path.join(ROOT, "deepfusion.py"), "save", "2", *map(str, flags)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT})
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and len(errors) == 1 and "could not write" in errors[0], p.stderr[-3000:]
    assert "[rank1]" not in p.stderr  # rank 1 ended quietly (torchrun's own summary may follow)


def test_sigterm_under_torchrun_saves_where_every_rank_stopped(tmp_path):
    flags = [*ONE_STEP, "--num-samples", "128", "--epochs", "2", "--head-layers", "1", "--log-every", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen([*launcher, os.path.join(ROOT, "deepfusion.py"), *flags, "--output-dir",
                             str(tmp_path / "part")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})
    while "step 2 " not in proc.stdout.readline():
        pass
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to every process
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "terminated (SIGTERM) at step" in errors[0], err[-3000:]
    assert "[rank" not in err
    p = run_cli("deepfusion.py", "--resume", errors[0].split("--resume ")[1], processes=2)
    assert p.returncode == 0, p.stderr[-3000:]
    whole = _run("deepfusion.py", tmp_path / "whole", 2, *flags)
    a, b = _checkpoints(whole, run_dir_of(tmp_path / "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the same run, bit for bit
