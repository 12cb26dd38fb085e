"""The Vision Transformer of the shared region (deepfusion.py's copy; test_shared.py holds the three
copies equal): its position table, crops of any size, what it trains, and each method file end to end."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

import common
import deepfusion as df
from conftest import METHODS, TINY, assert_usage_error, run_cli, run_dir_of


def test_position_table_is_the_released_sin_cos_table_of_the_native_grid():
    net = df.ViT("vit_tiny", 32, 8)  # a 4 x 4 grid of 192-d embeddings
    pos = net.encoder.pos_embedding
    assert pos.shape == (1, 1 + 16, 192) and not pos.requires_grad
    assert (pos[0, 0] == 0).all()  # the class token's entry
    w = [10000.0 ** (-4 * k / 192) for k in range(48)]
    for r in range(4):
        for c in range(4):
            row = [f(r * wk) for f in (math.sin, math.cos) for wk in w] + \
                  [f(c * wk) for f in (math.sin, math.cos) for wk in w]
            assert torch.allclose(pos[0, 1 + 4 * r + c], torch.tensor(row), atol=1e-6)


def test_position_table_is_unchanged_at_its_grid_and_resized_bicubically_elsewhere():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert df.position_table(pos, (14, 14)) is pos
    for grid in ((6, 6), (2, 2), (20, 10)):
        out = df.position_table(pos, grid)
        table = pos[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
        ref = F.interpolate(table, size=grid, mode="bicubic", antialias=True, align_corners=False)
        assert out.shape == (1, 1 + grid[0] * grid[1], 32)
        assert torch.equal(out[:, 0], pos[:, 0])  # the class token's entry is kept
        assert torch.allclose(out[0, 1:], ref[0].flatten(1).T, atol=1e-6)


@torch.no_grad()
def test_a_vit_built_for_224_px_runs_on_96_px_crops_and_32_px_images():
    torch.manual_seed(0)
    net, dim = df.make_backbone("vit_tiny", 224, crops=[96])
    assert dim == 192 and net.patch_size == 16  # the default patch at 224 px
    net.eval()
    for side in (224, 96, 32):
        assert net(torch.rand(2, 3, side, side)).shape == (2, 192)
    # at the native size it is torchvision's own VisionTransformer with our weights
    plain = torchvision.models.VisionTransformer(224, 16, 12, 3, 192, 768)
    plain.heads = torch.nn.Identity()
    plain.load_state_dict(net.state_dict())
    plain.eval()
    x = torch.rand(2, 3, 224, 224)
    assert torch.allclose(plain(x), net(x), atol=1e-5)


def test_what_a_vit_trains_and_what_weight_decay_shrinks():
    net, _ = df.make_backbone("vit_small", 32)  # patch 4 by default at 32 px
    assert net.patch_size == 4 and net.encoder.layers[0].self_attention.num_heads == 12
    assert not any(p.requires_grad for p in net.conv_proj.parameters())  # frozen, as released
    decay, keep = common.param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    kept = {id(p) for p in keep["params"]}
    assert id(net.class_token) in kept and id(net.encoder.ln.weight) in kept
    assert id(net.encoder.layers[0].mlp[0].bias) in kept
    assert id(net.encoder.layers[0].mlp[0].weight) in {id(p) for p in decay["params"]}
    frozen = {id(net.encoder.pos_embedding), *map(id, net.conv_proj.parameters())}
    assert not frozen & {id(p) for g in (decay, keep) for p in g["params"]}


@pytest.mark.parametrize("script,flags,words", [
    ("deepfusion.py", ["--patch-size", "5"], "multiples"),
    ("transfusion.py", ["--patch-size", "32"], "multiples"),  # a patch larger than the 16 px images
    ("bam.py", ["--patch-size", "4", "--local-size", "10"], "10 px"),
    ("deepfusion.py", ["--head-heads", "5"], "--head-heads must divide the backbone width 192"),
])
def test_bad_vit_shapes_are_one_line_before_anything_is_written(script, flags, words, tmp_path):
    p = run_cli(script, *TINY, "--backbone", "vit_tiny", *flags, "--output-dir", tmp_path / "runs")
    assert_usage_error(p, words)
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("script", METHODS)
def test_each_method_trains_a_vit_and_saves_a_torchvision_backbone(script, tmp_path):
    p = run_cli(script, *TINY, *METHODS[script]["fast"], "--backbone", "vit_tiny", "--patch-size", "4",
                "--epochs", "1", "--eval-every", "0", "--clip-grad", "1.0", "--output-dir", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = run_dir_of(tmp_path)
    assert 0 <= json.load(open(os.path.join(run, "summary.json")))["knn_acc"] <= 1
    net = torchvision.models.VisionTransformer(16, 4, 12, 3, 192, 768)
    net.heads = torch.nn.Identity()
    net.load_state_dict(torch.load(os.path.join(run, "backbone.pt"), weights_only=True))
