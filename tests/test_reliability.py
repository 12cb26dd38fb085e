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


# ----------------------------------------------------------------------------- round 3: resume, logs, signals


def _records(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _strict_json(path):
    """JSON that has no NaN or Infinity (json.loads accepts them unless told not to)."""
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f] if path.endswith("l") else \
            json.loads(f.read(), parse_constant=refuse)


def _one_class_folder(root, n_train=16, n_test=1):
    from PIL import Image
    for split, n in (("train", n_train), ("test", n_test)):
        os.makedirs(root / split / "cat")
        for i in range(n):
            Image.new("RGB", (16, 16), (10 * i, 100, 200 - 10 * i)).save(root / split / "cat" / f"{i}.png")


@pytest.mark.parametrize("script", METHODS)
def test_a_test_split_of_one_image_writes_no_nan(script, tmp_path):
    _one_class_folder(tmp_path / "data")
    p = run_cli(script, "--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--image-size", "16",
                "--batch-size", "8", "--epochs", "1", "--eval-every", "0", "--linear-epochs", "2",
                *METHODS[script]["fast"], "--output-dir", tmp_path / "runs")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "note: the labelled images are of one class ('cat')" in p.stderr  # accuracy 1.0 is no news
    run = run_dir_of(tmp_path / "runs")
    summary = _strict_json(os.path.join(run, "summary.json"))
    records = _strict_json(os.path.join(run, "metrics.jsonl"))
    for record in [summary, summary["init"], *records]:  # every undefined value is null, with a reason
        for key, reason in record.get("undefined", {}).items():
            assert record[key] is None or None in record[key], (key, record[key])
            assert "fewer than two samples" in reason
    if script != "transfusion.py":  # its analysis views come in pairs: defined even for one image
        assert summary.get("undefined") and summary["init"].get("undefined")


def test_resume_with_another_batch_size_continues_the_schedule(tmp_path):
    """The cosine is a function of the fraction of training done: after a resume with twice the batch
    it goes on from where it was (lr x 2 by the linear scaling rule), not past its end."""
    flags = [*TINY, "--head-layers", "1", "--eval-every", "0", "--epochs", "3", "--warmup-epochs", "0"]
    p = run_cli("deepfusion.py", *flags, "--stop-epoch", "1", "--output-dir", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = run_dir_of(tmp_path)
    p = run_cli("deepfusion.py", "--resume", run, "--batch-size", "32")
    assert p.returncode == 0, p.stderr[-3000:]
    epochs = [r for r in _records(run) if r["event"] == "epoch"]
    peak = lambda b: 0.06 * b / 256
    cosine = lambda step, total: 0.5 * (1 + math.cos(math.pi * step / total))
    assert epochs[0]["lr"] == pytest.approx(peak(16) * cosine(3, 12))  # 4 steps of 16 images
    assert epochs[1]["lr"] == pytest.approx(peak(32) * cosine(3, 6))  # then 2 steps of 32: half way
    assert epochs[2]["lr"] == pytest.approx(peak(32) * cosine(5, 6))
    assert [r["step"] for r in epochs] == [4, 4, 6]  # counted in the batches of each part


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    p = run_cli("deepfusion.py", *TINY, "--head-layers", "1", "--eval-every", "0", "--output-dir", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = run_dir_of(tmp_path)
    before = open(os.path.join(run, "summary.json")).read()
    assert_usage_error(run_cli("deepfusion.py", "--resume", run, "--epochs", "1"), "--epochs 1", "2 epochs")
    assert open(os.path.join(run, "summary.json")).read() == before


def test_a_resumed_log_reads_like_an_uninterrupted_one(tmp_path):
    """A crash between an evaluation and its checkpoint (here: the checkpoint write fails), then a
    resume from the checkpoint before: no record of the repeated epoch appears twice."""
    flags = [*TINY, "--head-layers", "1", "--epochs", "3"]
    p = run_patched("deepfusion.py", "save", 2, *flags, "--output-dir", tmp_path / "crashed")
    assert p.returncode == 1, p.stderr[-3000:]
    run = run_dir_of(tmp_path / "crashed")
    assert [r["event"] for r in _records(run)] == ["eval", "epoch", "eval", "epoch", "eval"]
    assert run_cli("deepfusion.py", "--resume", run).returncode == 0  # a run directory is accepted
    assert run_cli("deepfusion.py", *flags, "--output-dir", tmp_path / "whole").returncode == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_sec")} for r in rs]
    assert strip(_records(run)) == strip(_records(run_dir_of(tmp_path / "whole")))


def _start(script, *args, out):
    """A method file started as a user would, its output unbuffered (so a test can follow it)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args), "--output-dir", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})


def test_a_run_killed_in_its_first_epoch_says_how_to_start_it_again(tmp_path):
    flags = [*TINY, "--head-layers", "1", "--eval-every", "0", "--epochs", "1000"]
    proc = _start("deepfusion.py", *flags, out=tmp_path / "killed")
    assert "steps/epoch" in proc.stdout.readline()  # the run directory exists
    proc.kill()  # kill -9, before the first checkpoint
    proc.communicate()
    run = run_dir_of(tmp_path / "killed")
    p = run_cli("deepfusion.py", "--resume", os.path.join(run, "checkpoint.pt"))
    assert_usage_error(p, "has no checkpoint", "start it again with: python deepfusion.py")
    command = p.stderr.split("start it again with: ")[1].split()
    assert command[:2] == ["python", "deepfusion.py"] and "--epochs" in command
    command[command.index("--epochs") + 1] = "1"  # the same run, shortened for the test
    assert run_cli(*command[1:]).returncode == 0
    assert len(os.listdir(tmp_path / "killed")) == 2  # a new run beside the killed one


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_with_the_same_weights(tmp_path):
    flags = [*TINY, "--head-layers", "1", "--eval-every", "0", "--num-samples", "256", "--log-every", "1"]
    proc = _start("deepfusion.py", *flags, out=tmp_path / "part")
    while "step 3 " not in proc.stdout.readline():  # in the middle of epoch 1 (16 steps)
        pass
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 143 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: terminated (SIGTERM) at step") and "of epoch 1; saved" in lines[0]
    ckpt = lines[0].split("--resume ")[1]
    assert torch.load(ckpt, weights_only=True)["position"]["i"] >= 3
    assert run_cli("deepfusion.py", "--resume", ckpt).returncode == 0
    assert run_cli("deepfusion.py", *flags, "--output-dir", tmp_path / "whole").returncode == 0
    a, b = [torch.load(os.path.join(run_dir_of(tmp_path / d), "backbone.pt"), weights_only=True)
            for d in ("whole", "part")]
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [r.get("loss") for r in _records(run_dir_of(tmp_path / d))]
    assert losses("whole") == losses("part")  # the interrupted epoch's mean loss too


DRIVER_SLOW_DECODE = """
import runpy, sys, time, common
def slow(paths, size, chunk=64):
    print("decoding", file=sys.stderr, flush=True)
    time.sleep(60)
common._decode = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig,status,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_while_the_data_is_decoded_is_one_line(sig, status, name, tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        os.makedirs(tmp_path / "data" / split / "a")
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "a" / "0.png")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER_SLOW_DECODE, os.path.join(ROOT, "bam.py"), "--dataset",
                             "imagefolder", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "decoding"
    proc.send_signal(sig)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == status and err.strip() == f"error: interrupted ({name}); nothing was written", err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("env,words", [
    ({"RANK": "1"}, "RANK=1 is not a rank of WORLD_SIZE=1"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "two"}, "must be integers"),
])
def test_torchrun_variables_left_in_the_environment_are_one_line(env, words, tmp_path):
    clean = {k: "" for k in ("MASTER_ADDR", "MASTER_PORT")}
    p = run_cli("transfusion.py", *TINY, "--output-dir", tmp_path / "runs", env={**clean, **env})
    assert_usage_error(p, words, "torchrun")
    assert not os.path.exists(tmp_path / "runs")


def test_num_samples_beyond_the_dataset_is_noted(tmp_path):
    p = run_cli("deepfusion.py", *TINY, "--num-samples", "100000", "--batch-size", "256", "--epochs", "1",
                "--head-layers", "1", "--eval-every", "0", "--output-dir", tmp_path, "--image-size", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "note: --num-samples 100000 is more than the 512 training images; using all of them" in p.stderr
