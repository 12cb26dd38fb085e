"""Every method file end to end through its command line, as a user runs it: outputs, resume, bad input."""

import json
import os

import pytest
import torch
import torchvision

from conftest import METHODS, TINY, assert_usage_error, run_cli, run_dir_of, run_patched

def _plain_resnet18():
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
    return net


@pytest.mark.parametrize("script", METHODS)
def test_help_lists_every_flag(script):
    p = run_cli(script, "--help")
    assert p.returncode == 0
    for flag in ("--dataset", "--data-dir", "--no-download", "--image-size", "--backbone", "--num-samples",
                 "--batch-size", "--epochs", "--seed", "--device", "--amp", "--compile", "--output-dir",
                 "--resume", "--eval-every", "--linear-epochs", "--knn-k", "--knn-t"):
        assert flag in p.stdout, flag


@pytest.mark.parametrize("script", METHODS)
def test_tiny_run_writes_every_output(script, tmp_path):
    m = METHODS[script]
    p = run_cli(script, *TINY, *m["fast"], "--output-dir", tmp_path, "--amp", "bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    run = run_dir_of(tmp_path)
    assert os.path.basename(run).startswith(script[:-3] + "__synthetic__0__")
    for f in ["args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt", "summary.json", "figures/views.png"] + [
            "figures/" + f for f in m["figures"]]:
        assert os.path.isfile(os.path.join(run, f)), f
    s = json.load(open(os.path.join(run, "summary.json")))
    assert 0 <= s["knn_acc"] <= 1 and 0 <= s["linear_acc"] <= 1 and 0 <= s["init"]["knn_acc"] <= 1
    assert s["epochs"] == 2 and s["images_per_sec"] > 0 and len(s["normalization"]["mean"]) == 3
    for key, length in m["analysis"].items():
        assert key in s and key in s["init"], key
        assert len(s[key]) == length if length else 0 <= s[key] <= 1, (key, s[key])
    assert json.load(open(os.path.join(run, "args.json")))["amp"] == "bf16"
    events = [json.loads(line)["event"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert events == ["eval", "epoch", "eval", "epoch", "eval", "final"]
    _plain_resnet18().load_state_dict(torch.load(os.path.join(run, "backbone.pt"), weights_only=True))


@pytest.mark.parametrize("script", METHODS)
def test_resume_gives_identical_weights(script, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    fast = METHODS[script]["fast"] + ["--eval-every", "0"]
    assert run_cli(script, *TINY, *fast, "--output-dir", whole).returncode == 0
    p = run_cli(script, *TINY, *fast, "--output-dir", part, "--stop-epoch", "1")
    assert p.returncode == 0 and not os.path.exists(os.path.join(run_dir_of(part), "backbone.pt"))
    p = run_cli(script, "--resume", os.path.join(run_dir_of(part), "checkpoint.pt"), "--epochs", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    a = torch.load(os.path.join(run_dir_of(whole), "backbone.pt"), weights_only=True)
    b = torch.load(os.path.join(run_dir_of(part), "backbone.pt"), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.load(open(os.path.join(run_dir_of(whole), "summary.json")))
    sb = json.load(open(os.path.join(run_dir_of(part), "summary.json")))
    assert sa["knn_acc"] == sb["knn_acc"] and sa["linear_acc"] == sb["linear_acc"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint after one epoch, per method file, made once."""
    made = {}

    def get(script):
        if script not in made:
            out = tmp_path_factory.mktemp(script[:-3])
            p = run_cli(script, *TINY, *METHODS[script]["fast"], "--eval-every", "0", "--output-dir", out,
                        "--stop-epoch", "1")
            assert p.returncode == 0, p.stderr[-3000:]
            made[script] = os.path.join(run_dir_of(out), "checkpoint.pt")
        return made[script]
    return get


def _bad_inputs(script):
    cases = [
        ("unknown dataset", ["--dataset", "imagenet99"], "invalid choice"),
        ("batch size 1", TINY + ["--batch-size", "1"], "batch-size"),
        ("batch larger than data", TINY + ["--batch-size", "128"], "larger than the training set"),
        ("missing checkpoint", ["--resume", "/nonexistent/checkpoint.pt"], "does not exist"),
    ]
    return cases + [(f"{flag} {value}", TINY + [flag, value], flag) for flag, value in METHODS[script]["bad"]]


@pytest.mark.parametrize("script,case,args,words", [(s, *c) for s in METHODS for c in _bad_inputs(s)])
def test_bad_input_is_one_line_and_status_2(script, case, args, words, tmp_path):
    p = run_cli(script, *args, "--output-dir", tmp_path / "runs")
    assert_usage_error(p, words)
    assert not os.path.exists(tmp_path / "runs")  # nothing half-written


@pytest.mark.parametrize("script", METHODS)
def test_missing_data_with_no_download(script, tmp_path):
    p = run_cli(script, "--dataset", "cifar10", "--no-download", "--data-dir", tmp_path,
                "--output-dir", tmp_path / "runs")
    assert_usage_error(p, "not found", "--no-download")
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("script", METHODS)
def test_failed_download(script, tmp_path):
    proxy = "http://127.0.0.1:9"  # refuses at once, as a machine without network does
    p = run_cli(script, "--dataset", "cifar10", "--data-dir", tmp_path, "--output-dir", tmp_path / "runs",
                env={"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy})
    assert_usage_error(p, "could not download cifar10")


@pytest.mark.parametrize("script", METHODS)
def test_empty_image_folder(script, tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    p = run_cli(script, "--dataset", "imagefolder", "--data-dir", tmp_path, "--output-dir", tmp_path / "runs")
    assert_usage_error(p, "no images")


@pytest.mark.parametrize("script", METHODS)
def test_corrupt_checkpoint(script, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x80\x02 definitely not a checkpoint")
    assert_usage_error(run_cli(script, "--resume", bad), "cannot read checkpoint")


@pytest.mark.parametrize("script", METHODS)
def test_checkpoint_of_another_method(script, tmp_path, checkpoints):
    other = next(s for s in METHODS if s != script)
    p = run_cli(script, "--resume", checkpoints(other))
    assert_usage_error(p, other[:-3], "not " + script[:-3])


@pytest.mark.parametrize("script", METHODS)
def test_checkpoint_of_another_architecture(script, checkpoints):
    p = run_cli(script, "--resume", checkpoints(script), *METHODS[script]["other_arch"])
    assert_usage_error(p, "does not match")


@pytest.mark.parametrize("script", METHODS)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(script, checkpoints, tmp_path):
    ckpt = checkpoints(script)
    before = torch.load(ckpt, weights_only=True)
    p = run_patched(script, "poison", 1, "--resume", ckpt)  # the first update of epoch 2 leaves a NaN
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "non-finite loss at step" in p.stderr and "epoch 2" in p.stderr
    assert f"{ckpt} (epoch 1)" in p.stderr  # names the checkpoint that really is good
    after = torch.load(ckpt, weights_only=True)
    assert after["epoch"] == 1 == before["epoch"]
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())
    assert not os.path.exists(os.path.join(os.path.dirname(ckpt), "summary.json"))


@pytest.mark.parametrize("script", METHODS)
def test_fp16_with_grad_scaler(script, tmp_path):
    """The GPU's fp16 path (autocast + GradScaler) through the same code, on the CPU."""
    p = run_cli(script, *TINY, *METHODS[script]["fast"], "--amp", "fp16", "--epochs", "1", "--eval-every", "0",
                "--image-size", "8", "--num-samples", "32", "--output-dir", tmp_path)  # CPU fp16 is slow: 2 steps
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(os.path.join(run_dir_of(tmp_path), "checkpoint.pt"), weights_only=True)
    assert ckpt["scaler"]["scale"] > 0  # the scaler was enabled and saved for resuming
    assert json.load(open(os.path.join(run_dir_of(tmp_path), "summary.json")))["epochs"] == 1


def test_host_memory_path_gives_the_same_run(tmp_path):
    """--data-on host (images in host memory, each batch copied to the device) and --data-on device
    make the same views and losses: the same run, step for step."""
    losses = []
    for where in ("host", "device"):
        p = run_cli("deepfusion.py", *TINY, "--head-layers", "1", "--eval-every", "0", "--data-on", where,
                    "--output-dir", tmp_path / where)
        assert p.returncode == 0 and f"on {where}" in p.stdout, p.stderr[-3000:]
        run = run_dir_of(tmp_path / where)
        losses.append([json.loads(line).get("loss") for line in open(os.path.join(run, "metrics.jsonl"))])
    assert losses[0] == losses[1] and None not in losses[0][1:3]
