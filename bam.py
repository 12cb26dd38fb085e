"""BAM: unsupervised representation learning by balanced self-attention matching.

Daniel Shalam, Simon Korman, "Unsupervised Representation Learning by Balanced Self Attention
Matching", ECCV 2024, arXiv:2408.02014.

Instead of matching the features of two views, BAM matches their self-attention vectors: each
crop's distribution of similarities to the OTHER images of the batch. Every image gets 2 global
crops and a few small local crops. The target is a global crop's attention made balanced (a few
Sinkhorn iterations on exp(S / lambda): entropy-regularised self optimal transport), without
gradient; the source is the softmax attention (temperature tau) of every other crop of the image;
the loss is their cross-entropy. No negatives, memory bank or asymmetric encoder are needed; the
released scripts' EMA teacher is one flag away, their ViT recipe one command (the README).

    python bam.py --batch-size 512 --dataset cifar10
    torchrun --nproc-per-node 8 bam.py --batch-size 4096 --sync-bn   # the batch is global
"""

import copy
import dataclasses
import math
from typing import Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

METHOD = "bam"  # names the run directories; a checkpoint of another method is refused


@dataclasses.dataclass
class Args(common.RunArgs):
    """BAM's flags and recipe; the generic ones come from common.RunArgs."""

    num_local_crops: int = 4
    """small crops per image, besides the 2 global crops"""
    local_size: Optional[int] = None
    """side of the local crops (default: half the image size; CIFAR's 2 x 32 + 4 x 16 px is ours)"""
    global_scale: Tuple[float, float] = (0.25, 1.0)
    """area fraction range of the global crops"""
    local_scale: Tuple[float, float] = (0.05, 0.25)
    """area fraction range of the local crops"""
    proj_hidden: int = 2048
    """hidden width of the 3-layer GELU projector"""
    proj_dim: int = 256
    """output dimension of the projector (embeddings are L2-normalised)"""
    proj_last_bn: bool = True
    """non-affine BatchNorm on the projector output (released code's default; README: ResNet)"""
    lam: float = 0.05
    """entropic regularisation lambda of the Sinkhorn target exp(S / lambda)"""
    tau: float = 0.1
    """softmax temperature of the source attention"""
    sinkhorn_iters: int = 3
    """Sinkhorn iterations (each: key marginals, then query marginals)"""
    top_k: int = 0
    """keep k target columns per image, the largest over its global crops (released code; 0: off)"""
    ema_teacher: bool = False
    """EMA teacher embeds every crop, gives targets and keys (released scripts); off: one network"""
    teacher_momentum: float = 0.995
    """EMA momentum of the teacher at the start; cosine schedule to 1"""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW (paper's code) or SGD with momentum 0.9"""
    lr: float = 1e-3
    """learning rate per 256 images (scaled by batch-size / 256)"""
    min_lr: float = 0.0
    """learning rate at the end of the cosine (absolute; the released ViT scripts: 1e-3)"""
    weight_decay: float = 0.04
    """weight decay at the start (not on biases and norms)"""
    weight_decay_end: float = 0.4
    """weight decay at the end (cosine schedule, as the paper's code)"""
    warmup_epochs: int = 10
    """linear warm-up epochs before the cosine decay"""
    jitter_strength: float = 0.5
    """colour-distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s)"""


# ================================================================================== the method: BAM


def projector(d, hidden, out, last_bn):
    """3-layer MLP with GELU (paper), optionally ending in a non-affine BatchNorm (released code;
    our default: centring every output over the batch kept ResNet-18 from collapsing, README)."""
    layers = [nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
              nn.Linear(hidden, out)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(out, affine=False)] if last_bn else []))


class BAM(nn.Module):
    """Student backbone + projector; with --ema-teacher also a teacher copy without gradient."""

    def __init__(self, args, image_size):
        super().__init__()
        local = args.local_size or image_size // 2  # the side of the local crops
        self.backbone, d = make_backbone(args.backbone, image_size, args.patch_size, crops=[local])
        self.projector = projector(d, args.proj_hidden, args.proj_dim, args.proj_last_bn)
        self.teacher = None
        if args.ema_teacher:
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                          "projector": copy.deepcopy(self.projector)})
            self.teacher.requires_grad_(False)

    def forward(self, glob, local):
        """This rank's crops (2b and nb rows) -> (z, zt): embeddings (V*B, D) of the global batch's
        crops by the student, and the teacher (no gradient) or None. The backbone runs once per
        crop size; the projector sees the global batch (in eval mode: just the given crops)."""
        def embed(net, x):  # this rank's crops of one size -> (views * B, D)
            h = net["backbone"](x.contiguous(memory_format=torch.channels_last))
            h = gather(h, len(x) // (len(glob) // 2)) if self.training else h
            return F.normalize(net["projector"](h).float(), dim=1)
        every_crop = lambda net: torch.cat([embed(net, x) for x in (glob, local) if len(x)])
        z = every_crop({"backbone": self.backbone, "projector": self.projector})
        if self.teacher is None:
            return z, None
        with torch.no_grad():  # released code: the teacher embeds every crop, local ones too
            return z, every_crop(self.teacher)

    @torch.no_grad()
    def update_teacher(self, m):  # teacher <- m * teacher + (1 - m) * student (EMA), per parameter
        student = [*self.backbone.parameters(), *self.projector.parameters()]
        teacher = [*self.teacher["backbone"].parameters(), *self.teacher["projector"].parameters()]
        torch._foreach_lerp_(teacher, student, 1 - m)

    def eval_backbone(self):  # the backbone that is evaluated and saved: the teacher's if any
        return self.backbone if self.teacher is None else self.teacher["backbone"]


def same_image(rows, cols, B, device):
    """(rows, cols) mask, True where a crop-major query and key come from the same image."""
    image = lambda n: torch.arange(n, device=device) % B
    return image(rows)[:, None] == image(cols)[None, :]


@torch.no_grad()
def sinkhorn(S, mask, lam, iters):
    """Balanced target: P = exp(S / lam) over the unmasked entries, then `iters` alternations of
    columns (keys) to uniform and rows (queries) to sum 1 (masked entries: 0). Log space, fp32."""
    with torch.autocast(S.device.type, enabled=False):
        logP = (S.float() / lam).masked_fill(mask, float("-inf"))
        for _ in range(iters):
            logP = logP - logP.logsumexp(0, keepdim=True)  # every key receives the same mass
            logP = logP - logP.logsumexp(1, keepdim=True)  # every query sends the same mass
        return logP.exp()


def keep_top_k(P, k, G):
    """--top-k as the released code: for image i, the k columns with the largest MEAN over its G
    global crops' target rows; each row keeps its values there, renormalised. P (G*B, K); k=0: P."""
    if not k or k >= P.shape[1]:
        return P
    idx = P.view(G, -1, P.shape[1]).mean(0).topk(k, dim=1).indices.repeat(G, 1)  # (G*B, k)
    kept = torch.zeros_like(P).scatter_(1, idx, P.gather(1, idx))
    return kept / kept.sum(1, keepdim=True)


def bam_objective(z, zt, B, args, mask):
    """The loss of one step. z (V*B, D): student embeddings of every crop (crop-major); zt: the EMA
    teacher's, or None (the student is its own teacher). As the released code: keys = the global
    crops' rows of the teacher side (student keys carry gradient); the Sinkhorn target runs over
    EVERY crop's teacher-side row against them; its global rows are the targets."""
    G = 2
    source = z if zt is None else zt
    keys = source[: G * B]  # (2B, D)
    S = source.detach() @ keys.detach().T  # (V*B, 2B)
    P = sinkhorn(S, mask, args.lam, args.sinkhorn_iters)
    return bam_loss(z, keys, keep_top_k(P[: G * B], args.top_k, G), B, args.tau, mask)


def bam_loss(z, keys, target, B, tau, mask=None):
    """Cross-entropy between balanced targets and source attention.
    z (V*B, D) queries of every crop (crop-major); keys (G*B, D) global-crop embeddings;
    target (G*B, G*B) Sinkhorn rows of the global crops, no gradient.
    Source: A_v = softmax(z_v K^T / tau) over the keys of OTHER images.
    loss = mean over g, v != g, i of  -sum_j P_g[i, j] log A_v[i, j].  mask: same_image(...)."""
    V, G = len(z) // B, len(keys) // B
    mask = same_image(len(z), len(keys), B, z.device) if mask is None else mask
    logA = F.log_softmax((z.float() @ keys.float().T / tau).masked_fill(mask, float("-inf")), dim=1)
    logA = logA.masked_fill(mask, 0.0).view(V, B, G * B)  # 0 * log 0 := 0 on masked entries
    ce = -torch.einsum("gik,vik->gv", target.view(G, B, G * B), logA) / B  # (G, V), mean over i
    return (ce.sum() - ce[:, :G].diagonal().sum()) / (G * (V - 1))  # leave out v == g


def crops_of(x, u, args, size):
    """Multi-crop (the paper's DINO-style recipe): global crop 1 blur p 1.0; global crop 2 blur p
    0.1, solarise p 0.2; local crops blur p 0.5; no blur at <= 64 px. u (V, B, NU): every crop's
    draws. -> (globals (2B, 3, S, S), locals (nB, 3, s, s)), crop-major (row v * B + i: crop v)."""
    s, blur, gs = args.jitter_strength, size > 64, args.global_scale
    kw = dict(jitter=(0.8 * s,) * 3 + (0.2 * s,))
    glob = torch.cat([augment(x, u[0], size, gs, blur_p=1.0 * blur, **kw),
                      augment(x, u[1], size, gs, blur_p=0.1 * blur, solarize_p=0.2, **kw)])
    local = augment(x.repeat(args.num_local_crops, 1, 1, 1), u[2:].reshape(-1, NU),
                    args.local_size or size // 2, args.local_scale, blur_p=0.5 * blur, **kw)
    return glob, local  # local: one call for all local crops


# Every numeric flag of the method, its accepted range (both ends included); see check_args.
METHOD_LIMITS = {"num_local_crops": (0, 64), "local_size": (8, 1024), "global_scale": (1e-4, 1.0),
                 "local_scale": (1e-4, 1.0), "proj_hidden": (1, 1 << 16), "proj_dim": (1, 1 << 16),
                 "lam": (1e-4, 100.0), "tau": (1e-4, 100.0), "sinkhorn_iters": (1, 1000),
                 "top_k": (0, 10**9), "teacher_momentum": (0.0, 1.0), "lr": (1e-9, 100.0),
                 "min_lr": (0.0, 100.0), "weight_decay": (0.0, 10.0),
                 "weight_decay_end": (0.0, 10.0), "warmup_epochs": (0, 100_000),
                 "jitter_strength": (1e-6, 10.0)}


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
    G, V = 2, 2 + args.num_local_crops  # global crops, all crops per image
    model = BAM(args, size).to(run.device, memory_format=torch.channels_last)
    groups = common.param_groups(model, args.weight_decay)  # the student's; not biases, norms
    opt = (torch.optim.AdamW(groups, lr=args.lr) if args.optimizer == "adamw" else
           torch.optim.SGD(groups, lr=args.lr, momentum=0.9))
    total, warmup = args.epochs * run.steps_per_epoch, args.warmup_epochs * run.steps_per_epoch

    def get_lr(step):  # linear warm-up, then cosine to --min-lr; linear scaling: lr x batch / 256
        peak = args.lr * args.batch_size / 256
        if step < warmup:
            return peak * (step + 1) / warmup
        return args.min_lr + (peak - args.min_lr) * get_cos(step - warmup, total - warmup)

    def get_cos(step, steps=total):  # 1 -> 0 over `steps`: lr, weight decay, teacher momentum
        return 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))

    mask = same_image(V * B, G * B, B, run.device)  # built once
    probe = common.class_sorted(run.test_y, 128)  # labelled images for the attention analysis

    def evaluate(epoch):
        """k-NN of the evaluated backbone, and the analysis on two fixed global crops of the probe
        images: target P and source A (a figure), their same-class mass, P's balance, collapse."""
        feats, n, y2 = run.features(model.eval_backbone()), len(probe), run.test_y[probe].repeat(2)
        glob, _ = crops_of(run.images(probe, run.test_x), run.rand(V, n, NU, seed=2), args, size)
        with run.frozen(model):  # the same crops at every evaluation
            z, zt = model(norm(glob), glob[:0])
        keys, m = (z if zt is None else zt), same_image(2 * n, 2 * n, n, run.device)  # (2n, D)
        P = sinkhorn(keys @ keys.T, m, args.lam, args.sinkhorn_iters)
        A = torch.softmax((z @ keys.T / args.tau).masked_fill(m, float("-inf")), dim=1)
        mass, chance = common.same_class_mass(torch.stack([P, A]), y2)
        common.save_maps(run.figure(f"target_source_epoch{epoch:04d}.png"), torch.stack([P, A]), y2)
        dev = lambda d: (P.sum(d) - 1).abs().max().item()  # balanced: every row and column sums 1
        return run.report(epoch, feats, {
            "same_class_target": mass[0].item(), "same_class_source": mass[1].item(),
            "same_class_chance": chance, "sinkhorn_row_dev": dev(1), "sinkhorn_col_dev": dev(0),
            "embedding_std": z.std(0).mean().item(), "embedding_std_uniform": z.shape[1] ** -0.5})

    train_model = run.start(model, opt)  # resume, or a new run directory; DDP, compile
    if run.fresh:  # what the augmentation does (figures/views.png), and the random-init baseline
        x = run.images(run.spread(8))  # 8 training images, spread over the classes
        run.save_views(x, *crops_of(x, run.rand(V, 8, NU), args, size))  # global, then local
        evaluate(0)
    while run.epoch < args.epochs:
        for idx in run.batches():  # this epoch's global batches, the same on every rank
            u = torch.rand(V, B, NU, device=run.device, generator=run.g)  # every crop's uniforms
            cos = get_cos(run.step)
            for group in opt.param_groups:
                group["lr"] = get_lr(run.step)
                group["weight_decay"] = group["decay"] * (
                    args.weight_decay_end + (args.weight_decay - args.weight_decay_end) * cos)
            with run.autocast():  # the augmentation too: bf16 GEMMs with --amp bf16
                glob, local = crops_of(run.images(idx[run.shard]), u[:, run.shard], args, size)
                z, zt = train_model(norm(glob), norm(local))  # (V*B, D) student; teacher or None
            loss = bam_objective(z, zt, B, args, mask)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.clip_gradients(opt, model)  # --clip-grad (off by default)
            run.scaler.step(opt)
            run.scaler.update()
            if model.teacher is not None:  # momentum 0.995 -> 1, cosine (released scripts)
                model.update_teacher(1 - (1 - args.teacher_momentum) * cos)
            run.step_done(loss)  # non-finite watch; a progress line every --log-every steps
        run.epoch_done()  # non-finite weights check; the epoch's record in metrics.jsonl
        if run.eval_due():  # rank 0, every --eval-every epochs
            evaluate(run.epoch)
        run.checkpoint()  # checkpoint.pt, atomically; ends the run here after --stop-epoch
    if run.rank == 0:  # the final evaluation; the linear probe, backbone.pt, summary.json
        run.finish(model.eval_backbone(), evaluate(args.epochs))
