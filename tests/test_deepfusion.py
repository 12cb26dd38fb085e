"""deepfusion.py: augmentation, head, loss, the Deep Fusion effect, and the CLI end to end."""

import math

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF

import common
import deepfusion as df
from conftest import union_of_subspaces


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _u(n, seed=0, cols=df.NU):
    """Every sample's uniforms, as the training loop draws them."""
    return torch.rand(n, cols, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- augmentation


def test_augment_shape_dtype_range():
    x = _images(5, 20)
    v = df.augment(x, _u(5), 12, scale=(0.2, 1), blur_p=0.5)
    assert v.shape == (5, 3, 12, 12) and v.dtype == torch.float32
    assert v.min() >= 0 and v.max() <= 1


def test_augment_is_per_sample_random_and_seeded():
    x = _images(1).repeat(8, 1, 1, 1)  # eight copies of one image
    v = df.augment(x, _u(8), 16, scale=(0.2, 1))
    assert len({tuple(vi.flatten()[:50].tolist()) for vi in v}) == 8  # every copy its own draws
    y0, x0, h, w = df.crop_boxes(_u(8, cols=df.U_CROP), (0.2, 1), (3 / 4, 4 / 3))
    assert len(set(h.tolist())) == 8 and len(set(x0.tolist())) == 8  # two samples, two boxes
    assert ((h <= 1) & (w <= 1) & (y0 >= 0) & (y0 + h <= 1 + 1e-6) & (x0 + w <= 1 + 1e-6)).all()
    assert ((h * w >= 0.2 - 1e-6) & (h * w <= 1 + 1e-6)).all()
    again = df.augment(x, _u(8), 16, scale=(0.2, 1))
    assert torch.equal(v, again)


def test_a_view_depends_only_on_its_image_and_its_uniforms():
    # what lets each torchrun process augment only its shard of the global batch: a sample's view is
    # the same whether it is augmented with the whole batch or with any part of it
    x, u = _images(6, 20), _u(6)
    whole = df.augment(x, u, 12, scale=(0.2, 1), blur_p=0.5)
    halves = [df.augment(x[s], u[s], 12, scale=(0.2, 1), blur_p=0.5) for s in (slice(0, 3), slice(3, 6))]
    assert torch.allclose(whole, torch.cat(halves), atol=1e-6)
    u2 = _u(12, 1).view(2, 6, df.NU)  # views_of: view-major rows
    assert torch.allclose(df.views_of(x, u2, df.Args(), 20)[6 + 4], df.views_of(x[4:5], u2[:, 4:5], df.Args(), 20)[1],
                          atol=1e-6)


def test_augment_identity():
    x = _images(4, 16)
    v = df.augment(x, _u(4), 16, scale=(1, 1), ratio=(1, 1), flip_p=0,
                   jitter_p=0, gray_p=0, blur_p=0)
    assert torch.allclose(v, x.float() / 255, atol=1e-6)


def test_flip_and_grayscale_match_torchvision():
    x = _images(4, 16)
    kw = dict(scale=(1, 1), ratio=(1, 1), jitter_p=0, blur_p=0)
    flipped = df.augment(x, _u(4), 16, flip_p=1, gray_p=0, **kw)
    assert torch.allclose(flipped, TF.hflip(x.float() / 255))
    grey = df.augment(x, _u(4), 16, flip_p=0, gray_p=1, **kw)
    assert torch.allclose(grey, TF.rgb_to_grayscale(x.float() / 255, 3), atol=1e-3)


def test_crop_resize_matches_interpolate():
    # a box of whole pixels, upsampled: the triangle filter is bilinear interpolation
    x = torch.rand(2, 3, 16, 16)
    start, length = torch.tensor([0.25, 0.0]), torch.tensor([0.5, 0.5])
    R = df.resample_matrix(start, length, 16, 16)  # (2, 16, 16)
    v = R[:, None] @ x @ R.transpose(1, 2)[:, None]
    crop = torch.stack([x[0, :, 4:12, 4:12], x[1, :, 0:8, 0:8]])
    ref = F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False)
    # the outermost output pixels read the image just outside the box (as roi_align does), where
    # crop-then-resize repeats the box's edge; everything inside is the same
    assert torch.allclose(v[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)
    # downscaling by 2 averages pixel pairs (antialiased like PIL, not point-sampled)
    D = df.resample_matrix(torch.zeros(1), torch.ones(1), 16, 8)[0]
    assert torch.allclose(D.sum(1), torch.ones(8)) and (D > 0).sum(1).min() >= 2


def test_colour_ops_match_torchvision_without_clamping():
    # one op at a time, factor recovered from the colour matrix, compared with torchvision's op
    x = torch.rand(6, 3, 8, 8) * 0.5 + 0.25  # mid-range: torchvision's per-op clamp does nothing
    for which, ref in ((0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)):
        jitter = [0.0, 0.0, 0.0, 0.0]
        jitter[which] = 0.4
        M, o = df.colour_matrices(x, _u(6, 3, cols=df.U_COLOUR), jitter, 1.0, 0.0)
        out = torch.einsum("bij,bjhw->bihw", M, x) + o[:, :, None, None]
        for b in range(6):
            factor = M[b, 0, 0].item() if which < 2 else None
            if which == 2:  # saturation s: M = s I + (1 - s) 1 g^T, so M[0,1] = (1 - s) * 0.587
                factor = 1 - M[b, 0, 1].item() / df.GREY[1]
            assert 0.6 - 1e-5 <= factor <= 1.4 + 1e-5
            assert torch.allclose(out[b], ref(x[b], factor), atol=2e-3), which


def test_hue_rotation_keeps_grey_and_luma():
    x = torch.rand(6, 3, 8, 8)
    M, o = df.colour_matrices(x, _u(6, cols=df.U_COLOUR), (0, 0, 0, 0.5), 1.0, 0.0)
    grey = torch.full((3,), 0.5)
    assert torch.allclose(M @ grey, grey.expand(6, 3), atol=1e-5)  # greys have no hue to rotate
    luma = torch.tensor(df.GREY)
    assert torch.allclose(luma @ M, luma.expand(6, 3), atol=2e-3)  # brightness (Y) is kept
    assert not torch.allclose(M, torch.eye(3).expand(6, 3, 3), atol=1e-2)


def test_colour_map_is_the_jitter_ops_in_any_order():
    # the four jitter ops applied one after another (unclamped), in two different orders, then
    # grayscale for some samples, give the closed-form M x + o
    x, u = torch.rand(8, 3, 6, 6), _u(8, 5, cols=df.U_COLOUR)
    u[:, 0], u[:4, 5], u[4:, 5] = 0.0, 0.0, 1.0  # jitter on for all; grayscale for the first four
    jitter = (0.4, 0.4, 0.4, 0.1)
    factor = lambda j, s: max(0, 1 - s) + (1 + s - max(0, 1 - s)) * u[:, 1 + j, None, None, None]
    b, c, s = (factor(j, jitter[j]) for j in range(3))
    h = ((2 * u[:, 4] - 1) * jitter[3] * 2 * math.pi)[:, None, None, None]
    T = torch.tensor(df.RGB2YIQ)
    grey = lambda v: torch.einsum("c,bchw->bhw", torch.tensor(df.GREY), v)[:, None]
    ops = {
        "brightness": lambda v: b * v,
        "contrast": lambda v: c * v + (1 - c) * grey(v).mean((2, 3), keepdim=True),
        "saturation": lambda v: s * v + (1 - s) * grey(v),
        "hue": lambda v: torch.einsum("ij,bjhw->bihw", torch.linalg.inv(T), torch.stack([
            (yiq := torch.einsum("ij,bjhw->bihw", T, v))[:, 0],
            h[:, 0].cos() * yiq[:, 1] - h[:, 0].sin() * yiq[:, 2],
            h[:, 0].sin() * yiq[:, 1] + h[:, 0].cos() * yiq[:, 2]], 1)),
    }
    M, o = df.colour_matrices(x, u, jitter, 0.8, 0.2)
    closed = torch.einsum("bij,bjhw->bihw", M, x) + o[:, :, None, None]
    for order in (["brightness", "contrast", "saturation", "hue"], ["hue", "saturation", "contrast", "brightness"]):
        v = x
        for name in order:
            v = ops[name](v)
        v = torch.where(torch.arange(8)[:, None, None, None] < 4, grey(v).expand(-1, 3, -1, -1), v)
        assert torch.allclose(closed, v, atol=1e-5), order


def test_blur_matrix_rows_are_normalised_and_smooth():
    G = df.blur_matrix(torch.tensor([0.1, 2.0]), 32)
    assert torch.allclose(G.sum(-1), torch.ones(2, 32), atol=1e-6)
    assert torch.allclose(G[0], torch.eye(32), atol=1e-3)  # sigma 0.1: barely a blur
    assert G[1].diagonal().max() < 0.5


# ----------------------------------------------------------------------------- model and loss


def test_nt_xent_matches_a_loop():
    z = torch.randn(8, 5)
    tau = 0.3
    zn = z / z.norm(dim=1, keepdim=True)
    s = lambda i, k: float(zn[i] @ zn[k]) / tau
    total = 0.0
    for i in range(8):
        p = (i + 4) % 8
        total += -math.log(math.exp(s(i, p)) / sum(math.exp(s(i, k)) for k in range(8) if k != i))
    assert abs(df.nt_xent(z, tau).item() - total / 8) < 1e-5


def test_transformer_head_mixes_samples_and_is_permutation_equivariant():
    torch.manual_seed(0)
    head = df.Head("transformer", 32, 2, 4, 16).eval()
    h = torch.randn(10, 32)
    z = head(h)
    h2 = h.clone()
    h2[0] += 1.0
    assert not torch.allclose(head(h2)[1], z[1])  # changing sample 0 changes sample 1's output
    perm = torch.randperm(10)
    assert torch.allclose(head(h[perm]), z[perm], atol=1e-5)
    z_w, attn = head(h, need_weights=True)  # explicit attention path == fused path
    assert torch.allclose(z_w, z, atol=1e-5) and attn.shape == (2, 10, 10)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 10), atol=1e-5)
    mlp = df.Head("mlp", 32, 2, 4, 16).eval()  # the baseline head does not mix samples
    assert torch.allclose(mlp(h2)[1], mlp(h)[1])


def test_backbone_state_loads_into_plain_torchvision():
    net, dim = df.make_backbone("resnet18", 32)
    ref = torchvision.models.resnet18()
    ref.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool, ref.fc = torch.nn.Identity(), torch.nn.Identity()
    ref.load_state_dict(net.state_dict())
    assert dim == 512 and net(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_deep_fusion_on_a_union_of_subspaces():
    """The paper's claim in its theory's setting: after training with NT-Xent, attention in deeper
    layers concentrates on the same subspace; an untrained head shows nothing of the kind."""
    torch.manual_seed(0)
    batch = union_of_subspaces(64)
    head = df.Head("transformer", 64, 3, 4, 32)

    def mass():
        h, y = batch()
        head.eval()
        with torch.no_grad():
            _, A = head(h, need_weights=True)
        head.train()
        return common.same_class_mass(A, y)

    before, chance = mass()
    assert (before - chance).abs().max() < 0.02
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(1000):
        loss = df.nt_xent(head(batch()[0]), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, chance = mass()
    assert after[-1] > chance + 0.07, (after, chance)
    assert after[-1] > after[0] + 0.05, after
