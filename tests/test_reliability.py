"""What a hostile but realistic user meets: every numeric flag's range, non-finite weights, failed
writes, Ctrl-C, checkpoints of other versions, one-off flags on resume."""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import METHODS, ROOT, TINY, assert_usage_error, run_cli, run_dir_of, run_patched


def _outside(lo, hi):
    """Values just outside [lo, hi], and for floats nan and inf."""
    if isinstance(lo, int) and isinstance(hi, int):
        return [lo - 1, hi + 1]
    return [math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf), math.nan, math.inf]


def _limit_cases():
    for script in METHODS:
        mod = importlib.import_module(script[:-3])
        for name, (lo, hi) in {**common.LIMITS, **mod.METHOD_LIMITS}.items():
            for value in _outside(lo, hi):
                yield script, name, value


@pytest.mark.parametrize("script,name,value", list(_limit_cases()))
def test_every_numeric_flag_outside_its_range_is_one_line_and_status_2(script, name, value, capsys):
    mod = importlib.import_module(script[:-3])
    default = getattr(mod.Args(), name)
    v = (value, value) if isinstance(default, tuple) else value
    with pytest.raises(SystemExit) as e:
        common.check_args(mod.Args(**{name: v}), mod.METHOD_LIMITS)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: --" + name.replace("_", "-"))


@pytest.mark.parametrize("script", METHODS)
def test_defaults_and_the_ends_of_every_range_are_accepted(script):
    mod = importlib.import_module(script[:-3])
    common.check_args(mod.Args(), mod.METHOD_LIMITS)
    for name, (lo, hi) in {**common.LIMITS, **mod.METHOD_LIMITS}.items():
        for v in (lo, hi):
            v = (v, v) if isinstance(getattr(mod.Args(), name), tuple) else v
            common.check_args(mod.Args(**{name: v}), mod.METHOD_LIMITS)


@pytest.mark.parametrize("script,args,words", [
    ("deepfusion.py", ["--lr", "inf"], "--lr"),
    ("deepfusion.py", ["--seed", str(10 ** 30)], "--seed"),
    ("transfusion.py", ["--image-size", "100000"], "--image-size"),
    ("transfusion.py", ["--momentum", "nan"], "--momentum"),
    ("bam.py", ["--local-size", "100000"], "--local-size"),
    ("bam.py", ["--tau", "1e-30"], "--tau"),
])
def test_bad_flags_through_the_command_line(script, args, words, tmp_path):
    p = run_cli(script, *TINY, *args, "--output-dir", tmp_path / "runs")
    assert_usage_error(p, words)
    assert not os.path.exists(tmp_path / "runs")  # nothing written


def _one_line_failure(p, *words):
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("script", METHODS)
def test_weights_blown_up_by_the_last_update_are_never_saved(script, tmp_path):
    """One step per epoch: the step's loss is finite, the update leaves NaN weights."""
    one_step = [*TINY, *METHODS[script]["fast"], "--num-samples", "16", "--eval-every", "0"]
    p = run_patched(script, "poison", 1, *one_step, "--epochs", "1", "--output-dir", tmp_path / "a")
    _one_line_failure(p, "non-finite weights after epoch 1", "no checkpoint was written")
    assert sorted(os.listdir(run_dir_of(tmp_path / "a"))) == ["args.json", "figures", "metrics.jsonl"]
    p = run_patched(script, "poison", 2, *one_step, "--epochs", "3", "--output-dir", tmp_path / "b")
    run = run_dir_of(tmp_path / "b")
    _one_line_failure(p, "non-finite weights after epoch 2", f"{run}/checkpoint.pt (epoch 1)")
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 1 and all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not {"backbone.pt", "summary.json"} & set(os.listdir(run))


def test_non_finite_loss_in_the_first_epoch_promises_no_checkpoint(tmp_path):
    p = run_patched("deepfusion.py", "poison", 1, *TINY, "--head-layers", "1", "--eval-every", "0",
                     "--output-dir", tmp_path)
    _one_line_failure(p, "non-finite loss at step 2 (epoch 1)", "no checkpoint was written")
    assert not os.path.exists(os.path.join(run_dir_of(tmp_path), "checkpoint.pt"))


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    p = run_patched("deepfusion.py", "save", 2, *TINY, "--head-layers", "1", "--eval-every", "0",
                     "--output-dir", tmp_path)
    run = run_dir_of(tmp_path)
    _one_line_failure(p, f"could not write {run}/checkpoint.pt", "No space left on device")
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    assert not os.path.exists(os.path.join(run, "checkpoint.pt.tmp"))


def test_an_unusable_output_dir_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    p = run_cli("deepfusion.py", *TINY, "--output-dir", tmp_path / "file")
    assert_usage_error(p, "cannot write the run directory")


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "deepfusion.py"), *TINY, "--head-layers", "1",
                             "--eval-every", "0", "--epochs", "1000", "--output-dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.listdir(tmp_path) and os.path.exists(
            os.path.join(run_dir_of(tmp_path), "checkpoint.pt"))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: interrupted") and "--resume " in lines[0]
    ckpt = lines[0].split("--resume ")[1]
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 1


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A Deep Fusion run stopped by --stop-epoch 1 of 3."""
    out = tmp_path_factory.mktemp("stopped")
    p = run_cli("deepfusion.py", *TINY, "--head-layers", "1", "--eval-every", "0", "--epochs", "3",
                "--stop-epoch", "1", "--output-dir", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return os.path.join(run_dir_of(out), "checkpoint.pt")


def test_checkpoints_of_another_version_are_refused_in_one_line(stopped_run, tmp_path):
    ckpt = torch.load(stopped_run, weights_only=True)
    del ckpt["rng"]
    torch.save(ckpt, tmp_path / "no_rng.pt")
    assert_usage_error(run_cli("deepfusion.py", "--resume", tmp_path / "no_rng.pt"), "another version", "rng")
    ckpt = torch.load(stopped_run, weights_only=True)
    ckpt["args"]["future_flag"] = 1
    torch.save(ckpt, tmp_path / "future.pt")
    assert_usage_error(run_cli("deepfusion.py", "--resume", tmp_path / "future.pt"), "--future-flag")


def test_resume_does_not_inherit_stop_epoch_and_keeps_the_argument_history(stopped_run):
    run = os.path.dirname(stopped_run)
    open(stopped_run + ".tmp", "wb").write(b"half a checkpoint")  # as a killed write leaves it
    p = run_cli("deepfusion.py", "--resume", stopped_run, "--batch-size", "32")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "note: resuming with --batch-size 32; the run so far used 16" in p.stderr
    assert json.load(open(os.path.join(run, "summary.json")))["epochs"] == 3  # ran to the end
    assert not os.path.exists(stopped_run + ".tmp")
    args = json.load(open(os.path.join(run, "args.json")))
    assert args["batch_size"] == 32 and args["stop_epoch"] is None
    assert [(a["batch_size"], a["stop_epoch"], a["until_epoch"]) for a in args["earlier"]] == [(16, 1, 1)]
