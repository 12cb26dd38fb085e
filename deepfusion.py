"""Deep Fusion: SimCLR with a Transformer projection head whose attention runs across the batch.

Huanran Li, Daniel Pimentel-Alarcon, "Deep Fusion: Capturing Dependencies in Contrastive Learning
via Transformer Projection Heads", arXiv:2403.18681 (v2, 2024).

Two augmented views of B images go through a ResNet backbone; the 2B feature vectors are then the
tokens of ONE sequence fed to a Transformer encoder (no positional encoding), so every sample
attends to the other samples of the batch. The head ends in the usual SimCLR MLP and is trained
with NT-Xent. The paper's observation ("deep fusion"): in deeper head layers the attention
concentrates on samples of the same class, without labels. This file measures that (same-class
attention mass per layer) and draws it. Only the backbone is kept for evaluation.

    python deepfusion.py --batch-size 512 --dataset cifar10
    torchrun --nproc-per-node 8 deepfusion.py --batch-size 4096 --sync-bn   # the batch is global
"""

import dataclasses
import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

METHOD = "deepfusion"  # names the run directories; a checkpoint of another method is refused


@dataclasses.dataclass
class Args(common.RunArgs):
    """Deep Fusion's flags and recipe; the generic ones come from common.RunArgs."""

    head: Literal["transformer", "ffn", "mlp"] = "transformer"
    """projection head: Transformer over the batch, depth-matched FFN baseline, or SimCLR's MLP"""
    head_layers: int = 5
    """Transformer (or FFN) blocks before the MLP"""
    head_heads: int = 8
    """attention heads per Transformer block"""
    proj_dim: int = 128
    """output dimension of the projection MLP"""
    tau: float = 0.1
    """NT-Xent temperature (authors' code: 0.1 with the Transformer head; SimCLR often 0.5)"""
    lr: float = 0.06
    """SGD learning rate per 256 images (scaled by batch-size / 256)"""
    head_lr: float = 1.0
    """the head's learning rate as a multiple of --lr (ours; at 1 its attention barely trains)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """SGD weight decay (not on biases and norms)"""
    warmup_epochs: int = 10
    """linear warm-up epochs before the cosine decay"""
    min_scale: Optional[float] = None
    """smallest crop area fraction (default: 0.2 at <= 64 px, 0.08 above)"""
    jitter_strength: float = 0.5
    """colour-distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s), SimCLR's notation"""
    jitter_p: float = 0.8
    """probability of colour jitter"""
    gray_p: float = 0.2
    """probability of grayscale"""
    blur_p: Optional[float] = None
    """probability of Gaussian blur (default: 0 at <= 64 px, 0.5 above)"""


# ======================================================================== the method: Deep Fusion


class Block(nn.Module):
    """Post-LN Transformer encoder block over the batch: x = LN(x + MHA(x)); x = LN(x + FFN(x)).
    x is (N, D): the N samples ARE the sequence, so attention mixes samples. No positional
    encoding, hence permutation-equivariant over the batch. Dropout 0 (ours: the paper has none)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, need_weights=False):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).permute(1, 2, 0, 3)  # (h, N, d) each
        if need_weights:  # explicit softmax(q k^T / sqrt(d)), to return the attention matrix
            attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D // self.heads), dim=-1)
            y = attn @ v  # (h, N, d)
        else:  # fused kernel; the weights are never materialised
            attn, y = None, F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        x = self.ln1(x + self.out(y.transpose(0, 1).reshape(N, D)))
        return self.ln2(x + self.ffn(x)), attn


def mlp(d, out):
    """SimCLR projection MLP: Linear - BN - ReLU - Linear."""
    return nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(True), nn.Linear(d, out))


class Head(nn.Module):
    """transformer: L Transformer blocks over the batch, then the MLP (Deep Fusion).
    ffn: L blocks of Linear-BN-ReLU, then the MLP (the paper's depth-matched baseline).
    mlp: the MLP alone (SimCLR)."""

    def __init__(self, kind, d, layers, heads, out):
        super().__init__()
        self.kind = kind
        ffn = lambda: nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True))
        block = {"transformer": lambda: Block(d, heads), "ffn": ffn}.get(kind)
        self.blocks = nn.ModuleList(block() for _ in range(layers)) if block else nn.ModuleList()
        self.mlp = mlp(d, out)

    def forward(self, h, need_weights=False):
        """h (N, D) -> z (N, out); need_weights: also the attention (L, N, N), mean over heads."""
        maps = []
        for block in self.blocks:
            if self.kind == "transformer":
                h, attn = block(h, need_weights)
                maps.append(attn.mean(0) if need_weights else None)
            else:
                h = block(h)
        z = self.mlp(h)
        return (z, torch.stack(maps)) if need_weights and maps else z


class DeepFusion(nn.Module):
    def __init__(self, args, image_size):
        super().__init__()
        self.backbone, self.width = make_backbone(args.backbone, image_size, args.patch_size)
        self.head = Head(args.head, self.width, args.head_layers, args.head_heads, args.proj_dim)

    def forward(self, views):  # (2b, 3, S, S) this rank's views -> (2B, proj_dim) the global batch
        h = self.backbone(views.contiguous(memory_format=torch.channels_last))  # (2b, D)
        return self.head(gather(h, 2))  # the head attends over the global batch


def nt_xent(z, tau):
    """NT-Xent over 2B outputs where rows i and i+B are the two views of one image, s = cosine:
    l_i = -log( exp(s(z_i, z_p(i)) / tau) / sum_{k != i} exp(s(z_i, z_k) / tau) ), mean over i."""
    z = F.normalize(z.float(), dim=1)  # loss in fp32 under autocast
    s = z @ z.T / tau  # (2B, 2B)
    s = s.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    partner = (torch.arange(len(z), device=z.device) + len(z) // 2) % len(z)
    return F.cross_entropy(s, partner)


def views_of(x, u, args, size):
    """The two SimCLR views (2B, 3, size, size) of B images, view-major (row v * B + i: view v of
    image i), in one augment call; u (2, B, NU): their draws."""
    small, s = size <= 64, args.jitter_strength
    blur_p = args.blur_p if args.blur_p is not None else 0.5 * (not small)
    return augment(x.repeat(2, 1, 1, 1), u.reshape(-1, NU), size, (args.min_scale or (
        0.2 if small else 0.08), 1.0), jitter=(0.8 * s,) * 3 + (0.2 * s,), jitter_p=args.jitter_p,
        gray_p=args.gray_p, blur_p=blur_p)


# Every numeric flag of the method, its accepted range (both ends included); see check_args.
METHOD_LIMITS = {"head_layers": (0, 64), "head_heads": (1, 64), "proj_dim": (1, 1 << 16),
                 "tau": (1e-4, 100.0), "lr": (1e-9, 100.0), "head_lr": (1e-6, 1e6),
                 "momentum": (0.0, 1.0),
                 "weight_decay": (0.0, 1.0),
                 "warmup_epochs": (0, 100_000), "min_scale": (1e-4, 1.0),
                 "jitter_strength": (1e-6, 10.0), "jitter_p": (0.0, 1.0), "gray_p": (0.0, 1.0),
                 "blur_p": (0.0, 1.0)}


# ============================================================================ shared region: BEGIN
# Identical in the three method files (tests/test_shared.py checks it): the batched augmentation,
# the backbones (ResNet, ViT) and the gather over the global batch. A sample's draws are its row of
# NU uniforms, drawn for the global batch at once: a view depends on its image and its row alone,
# so a torchrun rank augmenting its shard makes one process's views. Columns: crop (TRIES area
# tries, TRIES log-aspect tries, y, x), flip, blur, blur sigma, colour (jitter on, brightness,
# contrast, saturation, hue, grayscale), solarize.

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
TRIES = 10  # RandomResizedCrop's attempts at a box that fits
U_CROP, U_COLOUR = 2 * TRIES + 2, 6
NU = U_CROP + 3 + U_COLOUR + 1


def colour_basis(T=torch.tensor(RGB2YIQ, dtype=torch.float64)):
    """(3, 3, 3): 1 g^T (every channel := the grey level g^T x), I - 1 g^T (the chroma) and the
    chroma turned 90 degrees in YIQ's (I, Q) plane (hue: the usual GPU approximation of HSV's)."""
    grey, rot = T[:1].expand(3, 3), torch.tensor([[0, 0, 0], [0, 0, -1], [0, 1, 0]]).to(T)
    return torch.stack([grey, torch.eye(3).to(T) - grey, T.inverse() @ rot @ T]).float()


COLOUR_BASIS = colour_basis()


def crop_boxes(u, scale, ratio):
    """RandomResizedCrop boxes (y0, x0, h, w), each (B,), fractions of the side, from u (B, 2T + 2)
    as torchvision: area ~ U(scale), log aspect ~ U(log ratio), the first of T tries that fits."""
    T = (u.shape[1] - 2) // 2
    area = scale[0] + (scale[1] - scale[0]) * u[:, :T]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, T:2 * T]
    w, h = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)  # index of the first fitting try (0 if none fits)
    w, h = [torch.where(fits.any(1), v.gather(1, first)[:, 0], 1.0) for v in (w, h)]
    return u[:, -2] * (1 - h), u[:, -1] * (1 - w), h, w


def resample_matrix(start, length, n_in, n_out, flip=None):
    """Per-sample (n_out x n_in) matrices resampling [start, start + length) (fractions of the
    side) to n_out px, a triangle filter of width max(1, input px per output px); flip: mirrored."""
    step = length * n_in / n_out  # input pixels per output pixel, (B,)
    pos = torch.arange(n_out, device=start.device) + 0.5  # output pixel centres
    if flip is not None:
        pos = torch.where(flip[:, None], n_out - pos, pos)
    centre = start[:, None] * n_in + pos * step[:, None] - 0.5
    j = torch.arange(n_in, device=start.device)
    w = (j - centre[:, :, None]).abs_().div_(step.clamp_min(1)[:, None, None])
    w = w.neg_().add_(1).clamp_(min=0)  # (B, n_out, n_in)
    return w.div_(w.sum(-1, keepdim=True))


def blur_matrix(sigma, n):
    """Per-sample (n x n) Gaussian blur matrices, kernel ~10% of the side, reflect padding."""
    r = max(1, int(0.1 * n) // 2)
    t = torch.arange(-r, r + 1, device=sigma.device)
    k = torch.softmax(-t[None] ** 2 / (2 * sigma[:, None] ** 2), 1)  # (B, 2r+1), normalised
    src = torch.arange(n, device=sigma.device)[:, None] + t[None]  # (n, 2r+1), reflect into [0, n)
    src = torch.where(src < 0, -src, torch.where(src >= n, 2 * (n - 1) - src, src))
    G = torch.zeros(len(sigma), n, n, device=sigma.device)
    return G.scatter_add_(2, src.expand(len(sigma), n, 2 * r + 1), k[:, None, :].expand(-1, n, -1))


def colour_matrices(x, u, jitter, jitter_p, gray_p):
    """Per-sample affine colour map (M (B,3,3), o (B,3)) of colour jitter, then grayscale; u (B, 6).
    With brightness b, contrast c, saturation s, hue angle h:
        M = b c [1 g^T + s cos(h) (I - 1 g^T) + s sin(h) rot],   o = (1 - c) b (g^T mean colour) 1
    (saturation scales the chroma, hue rotates it, contrast blends with the mean grey level);
    grayscale keeps only the first term (1 g^T M = b c 1 g^T)."""
    on = u[:, 0] < jitter_p
    bri, con, sat = [torch.where(on, max(0, 1 - s) + (1 + s - max(0, 1 - s)) * u[:, 1 + j], 1.0)
                     for j, s in enumerate(jitter[:3])]
    hue = torch.where(on, (2 * u[:, 4] - 1) * jitter[3], 0.0) * 2 * math.pi
    chroma = sat * (u[:, 5] >= gray_p)  # grayscale: no chroma left
    coef = torch.stack([torch.ones_like(sat), chroma * hue.cos(), chroma * hue.sin()], 1)
    M = ((coef * (bri * con)[:, None]) @ COLOUR_BASIS.to(x.device).view(3, 9)).view(-1, 3, 3)
    mean_grey = x.mean((2, 3)) @ torch.tensor(GREY, device=x.device)  # of the view before colour
    return M, ((1 - con) * bri * mean_grey)[:, None].expand(-1, 3)


def augment(x, u, size, scale, ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8, gray_p=0.2, blur_p=0.0, solarize_p=0.0):
    """torchvision's SimCLR ops on uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 1], sample
    i's draws from u[i] (u: (B, NU)). Crop, resize, flip and blur are linear along each axis: the
    view is Ry @ x @ Rx^T (per-sample matrices; a triangle filter, antialiased when downscaling);
    jitter and grayscale are one colour map M x + o, where jitter ops commute (no order drawn)."""
    B, _, H, W = x.shape
    box, flip, blur, sigma, colour, solar = u.split((U_CROP, 1, 1, 1, U_COLOUR, 1), dim=1)
    y0, x0, h, w = crop_boxes(box, scale, ratio)
    Ry, Rx = resample_matrix(y0, h, H, size), resample_matrix(x0, w, W, size, flip[:, 0] < flip_p)
    if blur_p > 0:  # one sigma ~ U(0.1, 2) per sample for both axes, as torchvision's GaussianBlur
        Gb, blur = blur_matrix(0.1 + 1.9 * sigma[:, 0], size), blur[:, :, None] < blur_p
        Ry, Rx = torch.where(blur, Gb @ Ry, Ry), torch.where(blur, Gb @ Rx, Rx)
    # columns, then rows, in the copy-free layouts (the fastest of four measured); 1 / 255 in Rx
    v = torch.bmm(x.reshape(B, 3 * H, W).float(), Rx.transpose(1, 2).contiguous().div_(255))
    v = torch.matmul(Ry[:, None], v.view(B, 3, H, size)).view(B, 3, size * size)
    M, o = colour_matrices(v.view(B, 3, size, size), colour, jitter, jitter_p, gray_p)
    v = torch.baddbmm(o[:, :, None], M, v).view(B, 3, size, size).clamp_(0, 1)  # M v + o
    if solarize_p > 0:  # RandomSolarize(threshold 128 / 255 ~ 0.5)
        v = torch.where((solar < solarize_p)[:, :, None, None] & (v >= 0.5), 1 - v, v)
    return v


VITS = {"vit_tiny": (192, 3), "vit_small": (384, 12), "vit_base": (768, 12)}  # width, heads


def make_backbone(name, image_size, patch=None, crops=()):
    """-> (net, feature dim): a torchvision ResNet, fc = Identity (CIFAR stem at <= 64 px), or a
    ViT with `patch` (default 4 / 8 / 16 at <= 32 / 64 / more px) for images and `crops` whose
    sides are multiples of it."""
    if name not in VITS:
        net = getattr(torchvision.models, name)()
        if image_size <= 64:
            net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        dim, net.fc = net.fc.in_features, nn.Identity()
        return net, dim
    patch = patch or (4 if image_size <= 32 else 8 if image_size <= 64 else 16)
    if any(s < patch or s % patch for s in (image_size, *crops)):
        common.fail(f"a ViT with --patch-size {patch} needs crop sides that are multiples of it, "
                    f"not {', '.join(map(str, (image_size, *crops)))} px")
    return ViT(name, image_size, patch), VITS[name][0]


class ViT(torchvision.models.VisionTransformer):
    """torchvision's ViT (12 blocks, MLP 4 x width) for crops of any side that is a multiple of the
    patch; features: the class token after the final LayerNorm. As BAM's released code (MoCo v3's
    recipe) the patch projection is frozen and the position table a fixed 2-D sin-cos one, [sin rw,
    cos rw, sin cw, cos cw] at row r, column c, w_k = 10000^(-4k / D), 0 for the class token."""

    def __init__(self, name, image_size, patch):
        (D, heads), n = VITS[name], image_size // patch
        super().__init__(image_size, patch, 12, heads, D, 4 * D, num_classes=1)
        w = 10000.0 ** -(torch.arange(D // 4, dtype=torch.float64) * 4 / D)
        r, c = [g.flatten()[:, None] * w for g in torch.meshgrid(
            torch.arange(n), torch.arange(n), indexing="ij")]  # row, column of every patch
        table = F.pad(torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1), (0, 0, 1, 0))
        self.encoder.pos_embedding.requires_grad_(False).copy_(table[None])  # (1, 1 + n^2, D)
        self.conv_proj.requires_grad_(False)
        self.heads = nn.Identity()

    def forward(self, x):  # (B, 3, H, W) -> (B, D)
        t = self.conv_proj(x)  # (B, D, H / p, W / p): a token per patch
        pos = position_table(self.encoder.pos_embedding, t.shape[-2:])
        t = torch.cat([self.class_token.expand(len(t), -1, -1), t.flatten(2).transpose(1, 2)], 1)
        return self.encoder.ln(self.encoder.layers(t + pos))[:, 0]


def position_table(pos, grid):
    """pos (1, 1 + n^2, D) of the native n x n grid for a grid (gh, gw): unchanged at n x n, else
    resized bicubically, antialiased (the released code's way), the class token's entry kept."""
    n = math.isqrt(pos.shape[1] - 1)
    if tuple(grid) == (n, n):
        return pos
    table = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, D, n, n)
    table = F.interpolate(table, size=tuple(grid), mode="bicubic", antialias=True)
    return torch.cat([pos[:, :1], table.flatten(2).transpose(1, 2)], 1)


def gather(h, views):
    """(views * b, D) rows on each of W ranks -> (views * W * b, D), as one process has them.
    Autograd-aware: each rank computes the loss of the global batch, so a rank's rows get the sum
    of W equal gradients, which DDP's averaging divides back."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return h
    parts = torch.distributed.nn.functional.all_gather(h)  # W x (views * b, D)
    return torch.stack(parts).unflatten(1, (views, -1)).transpose(0, 1).flatten(0, 2)


# ============================================================================== shared region: END


if __name__ == "__main__":
    args, ckpt = common.parse_args(Args, METHOD, METHOD_LIMITS)  # --resume: its args as defaults
    run = common.Run(METHOD, args, ckpt)  # torchrun, device, AMP, seed, the data on the device
    size, norm, B = run.size, run.norm, args.batch_size
    model = DeepFusion(args, size).to(run.device, memory_format=torch.channels_last)
    if args.head == "transformer" and model.width % args.head_heads:
        common.fail(f"--head-heads must divide the backbone width {model.width}, got "
                    f"{args.head_heads}")
    opt = torch.optim.SGD([g for part, scale in ((model.backbone, 1.0), (model.head, args.head_lr))
                           for g in common.param_groups(part, args.weight_decay, scale=scale)],
                          lr=args.lr, momentum=args.momentum)  # no weight decay on biases, norms
    total, warmup = args.epochs * run.steps_per_epoch, args.warmup_epochs * run.steps_per_epoch

    def get_lr(step):  # linear warm-up, then cosine decay to 0; linear scaling: lr x batch / 256
        peak = args.lr * args.batch_size / 256
        if step < warmup:
            return peak * (step + 1) / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    probe = common.class_sorted(run.test_y, 256)  # a labelled batch for the attention analysis

    def evaluate(epoch):
        """k-NN on the backbone's features, and the method's analysis: the same-class attention
        mass of every head layer on the probe images (their features are rows of test_f), and a
        figure of the attention maps."""
        train_f, test_f = run.features(model.backbone)
        analysis = {}
        if args.head == "transformer" and args.head_layers > 0:
            with run.frozen(model.head):
                _, attn = model.head(test_f[probe], need_weights=True)  # (L, n, n)
            mass, chance = common.same_class_mass(attn, run.test_y[probe])
            common.save_maps(run.figure(f"attention_epoch{epoch:04d}.png"), attn, run.test_y[probe])
            analysis = {"same_class_attention": mass.tolist(), "same_class_chance": chance}
        return run.report(epoch, (train_f, test_f), analysis)

    train_model = run.start(model, opt)  # resume, or a new run directory; DDP, compile
    if run.fresh:  # what the augmentation does (figures/views.png), and the random-init baseline
        x = run.images(run.spread(8))  # 8 training images, spread over the classes
        run.save_views(x, views_of(x, run.rand(2, 8, NU), args, size))  # view 1 of all, then 2
        evaluate(0)
    while run.epoch < args.epochs:
        for idx in run.batches():  # this epoch's global batches, the same on every rank
            u = torch.rand(2, B, NU, device=run.device, generator=run.g)  # every view's uniforms
            for group in opt.param_groups:
                group["lr"] = get_lr(run.step) * group["scale"]
            with run.autocast():  # the augmentation too: bf16 GEMMs with --amp bf16
                views = norm(views_of(run.images(idx[run.shard]), u[:, run.shard], args, size))
                z = train_model(views)  # (2B, proj_dim): every rank has the global batch's outputs
            loss = nt_xent(z, args.tau)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.clip_gradients(opt, model)  # --clip-grad (off by default)
            run.scaler.step(opt)
            run.scaler.update()
            run.step_done(loss)  # non-finite watch; a progress line every --log-every steps
        run.epoch_done()  # non-finite weights check; the epoch's record in metrics.jsonl
        if run.eval_due():  # rank 0, every --eval-every epochs
            evaluate(run.epoch)
        run.checkpoint()  # checkpoint.pt, atomically; ends the run here after --stop-epoch
    if run.rank == 0:  # the final evaluation; the linear probe, backbone.pt, summary.json
        run.finish(model.backbone, evaluate(args.epochs))
