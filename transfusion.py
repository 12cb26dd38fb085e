"""TransFusion: contrastive learning with ReLU-attention fusion blocks that output an adjacency.

Huanran Li, Daniel Pimentel-Alarcon, "TransFusion: Contrastive Learning with Transformers",
arXiv:2403.18681 (v1 2024, v3 2025).

Two augmented views of B images go through a backbone and a stem (Linear, BatchNorm); the 2B
vectors are the tokens of one sequence (the batch is the sequence). Fusion blocks are single-head
attention with softmax replaced by a ReLU of cosine scores (zero diagonal, rows normalised), added
residually, no FFN. The final block is truncated: its attention matrix A (2B x 2B), the adjacency
between samples, IS the output, trained by the Jensen-Shannon divergence between the rows of A and
of the target affinity T (the two views of an image belong together; --supervised: one class).
Taken literally the paper's head does not learn (every row of A dies); four choices of ours make
it learn (stem BatchNorm, W_k = W_q, the score relu(C - row mean of C), 10 x JSD): the README.

    python transfusion.py --batch-size 512 --dataset cifar10
    torchrun --nproc-per-node 8 transfusion.py --batch-size 4096 --sync-bn   # the batch is global
"""

import dataclasses
import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

METHOD = "transfusion"  # names the run directories; a checkpoint of another method is refused


@dataclasses.dataclass
class Args(common.RunArgs):
    """TransFusion's flags and recipe; the generic ones come from common.RunArgs."""

    fusion_blocks: int = 5
    """fusion blocks before the final (adjacency) block; the authors' scripts use 5"""
    width: int = 512
    """token width d after the linear stem"""
    supervised: bool = False
    """target affinity from class labels instead of from the pairing of views"""
    score: Literal["centred", "relu", "square"] = "centred"
    """score of a cosine C in every block: relu(C - row mean) (ours), relu(C) (paper), C^2"""
    final_score: Optional[Literal["centred", "relu", "square"]] = None
    """score of the final (adjacency) block (default: --score)"""
    empty_rows: Literal["zero", "uniform"] = "zero"
    """a row with no positive score: zero (paper), or uniform (authors' code: 1e-10 everywhere)"""
    stem_bn: bool = True
    """BatchNorm1d after the linear stem, centring the tokens over the batch (ours; see README)"""
    tied_qk: bool = True
    """W_k = W_q: symmetric cosines, so two views of an image start with a positive score (ours)"""
    loss_scale: float = 10.0
    """multiplies the JSD (ours: its gradient is weak; the authors' loss is 2 x JSD + log 2)"""
    jsd: Literal["rows", "elementwise"] = "rows"
    """loss: mean JSD between rows of A and T (paper), or mean Bernoulli JSD per entry (ablation)"""
    lr: float = 0.06
    """SGD learning rate per 256 images (scaled by batch-size / 256)"""
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


# ========================================================================== the method: TransFusion


class FusionBlock(nn.Module):
    """One TransFusion block over the batch (pre-LN, single head, no FFN):
        Y = LN(X);  Q = rownorm(Y Wq);  K = rownorm(Y Wk);  V = Y Wv     (tied: Wk = Wq)
        C = Q K^T;  R = score(C) with zero diagonal;  A = R / (rowsum(R) + eps);  X <- X + A V
    The final block is truncated: it returns A itself (no A V, no residual)."""

    eps = 1e-6  # ours: keeps 1 / rowsum bounded when a row has almost no positive score

    def __init__(self, d, score="relu", final=False, empty="zero", tied=False):
        super().__init__()
        self.score, self.final, self.empty = score, final, empty
        self.ln, self.q = nn.LayerNorm(d), nn.Linear(d, d)
        self.k = self.q if tied else nn.Linear(d, d)
        self.v = None if final else nn.Linear(d, d)

    def cosines(self, y):
        """C = rownorm(Y Wq) rownorm(Y Wk)^T, (N, N), fp32 under autocast."""
        return F.normalize(self.q(y).float(), dim=-1) @ F.normalize(self.k(y).float(), dim=-1).T

    def adjacency(self, C):
        """A from the cosines C: the ReLU score in place of softmax's exp, then rows normalised."""
        R = {"relu": lambda: F.relu(C),  # paper
             "centred": lambda: F.relu(C - C.mean(1, keepdim=True)),  # ours: relu(C - mean_j C_ij)
             "square": lambda: C.square()}[self.score]()  # authors' code (their loss adjacency)
        off = 1 - torch.eye(len(C), device=C.device)
        R = R * off  # no self-attention
        if self.empty == "uniform":  # authors' code: 1e-10 on every entry: an empty row is uniform
            R = R + 1e-10 * off
            return R / R.sum(1, keepdim=True)
        return R / (R.sum(1, keepdim=True) + self.eps)  # rows sum to 1 (0 if none is positive)

    def forward(self, x):
        """x (N, d) -> (x', A (N, N)); for the final block x' is x unchanged."""
        y = self.ln(x)
        A = self.adjacency(self.cosines(y))
        return (x, A) if self.final else (x + (A @ self.v(y).float()).to(x.dtype), A)


class TransFusionHead(nn.Module):
    """Stem to width d (Linear, then BatchNorm1d over the batch: --stem-bn), `fusion_blocks`
    fusion blocks, then the truncated final block."""

    def __init__(self, d_in, args):
        super().__init__()
        d = args.width
        self.stem = nn.Sequential(nn.Linear(d_in, d), *[nn.BatchNorm1d(d)] * args.stem_bn)
        kw = dict(empty=args.empty_rows, tied=args.tied_qk)
        self.blocks = nn.ModuleList(FusionBlock(d, args.score, **kw)
                                    for _ in range(args.fusion_blocks))
        self.final = FusionBlock(d, args.final_score or args.score, final=True, **kw)

    def forward(self, h, every_block=False):
        """h (N, D) -> adjacency A (N, N); every_block: the A of every block, (blocks + 1, N, N)."""
        x, maps = self.stem(h), []
        for block in [*self.blocks, self.final]:
            x, A = block(x)
            maps.append(A)
        return torch.stack(maps) if every_block else A


class TransFusion(nn.Module):
    def __init__(self, args, image_size):
        super().__init__()
        self.backbone, d = make_backbone(args.backbone, image_size, args.patch_size)
        self.head = TransFusionHead(d, args)

    def forward(self, views):  # (2b, 3, S, S) this rank's views -> adjacency (2B, 2B), global batch
        h = self.backbone(views.contiguous(memory_format=torch.channels_last))  # (2b, D)
        return self.head(gather(h, 2))  # the fusion blocks attend over the global batch


def partner_mass(A):
    """Mean share of each row of A (2B, 2B) on the row's partner view (view-major order)."""
    n = len(A) // 2
    return (A.diagonal(n).sum() + A.diagonal(-n).sum()) / len(A)


def dead_rows(A):
    """Fraction of rows of A with no score above the others: all zero, or all equal (uniform)."""
    return (A.amax(1) * (len(A) - 1) < 1 + 1e-3).float().mean()


def target_affinity(group):
    """T_ij = 1 if samples i and j belong together (same group id) and i != j, rows normalised to 1.
    group: (N,) image index (views) or class label (--supervised). A row with no partner stays 0."""
    T = (group[:, None] == group[None, :]).float()
    T.fill_diagonal_(0)
    return T / T.sum(1, keepdim=True).clamp_min(1)


def jsd(P, Q, eps=1e-12):
    """Jensen-Shannon divergence in nats along the last axis: 0.5 KL(P||M) + 0.5 KL(Q||M),
    M = (P+Q)/2, 0 log 0 = 0 (the clamp keeps log finite where the factor is 0); at most log 2."""
    M = (P + Q) / 2
    kl = lambda X: (X * (X.clamp_min(eps).log() - M.clamp_min(eps).log())).sum(-1)
    return 0.5 * kl(P) + 0.5 * kl(Q)


def jsd_loss(A, T, kind="rows"):
    """rows: mean over rows i of JSD(A_i, T_i), rows of T with no partner left out (paper).
    elementwise: mean over i != j of JSD(Bernoulli(A_ij), Bernoulli(T_ij)) (ours, an ablation)."""
    A, T = A.float(), T.float()
    if kind == "rows":
        # A row whose scores are all <= 0 sums to 0, not 1: it would score JSD = 0.5 log 2 against
        # any target, below a spread-out row, so the loss would drive rows to zero, where ReLU
        # has no gradient. Ours: complete each row with a "none" outcome of mass 1 - rowsum(A)
        # that the target never has (the same JSD when rows sum to 1; log 2 for a dead row).
        none = (1 - A.sum(1, keepdim=True)).clamp_min(0)
        has_partner = (T.sum(1) > 0).float()
        rows = jsd(torch.cat([A, none], 1), torch.cat([T, torch.zeros_like(none)], 1))
        return (rows * has_partner).sum() / has_partner.sum().clamp_min(1)
    off = 1 - torch.eye(len(A), device=A.device)
    per_entry = jsd(torch.stack([A, 1 - A], -1), torch.stack([T, 1 - T], -1))  # (N, N)
    return (per_entry * off).sum() / off.sum()


def views_of(x, u, args, size):
    """The two SimCLR views (2B, 3, size, size) of B images, view-major (row v * B + i: view v of
    image i), in one augment call; u (2, B, NU): their draws."""
    small, s = size <= 64, args.jitter_strength
    blur_p = args.blur_p if args.blur_p is not None else 0.5 * (not small)
    return augment(x.repeat(2, 1, 1, 1), u.reshape(-1, NU), size, (args.min_scale or (
        0.2 if small else 0.08), 1.0), jitter=(0.8 * s,) * 3 + (0.2 * s,), jitter_p=args.jitter_p,
        gray_p=args.gray_p, blur_p=blur_p)


# Every numeric flag of the method, its accepted range (both ends included); see check_args.
METHOD_LIMITS = {"fusion_blocks": (0, 64), "width": (1, 1 << 16), "loss_scale": (1e-6, 1e6),
                 "lr": (1e-9, 100.0), "momentum": (0.0, 1.0), "weight_decay": (0.0, 1.0),
                 "warmup_epochs": (0, 100_000), "min_scale": (1e-4, 1.0), "jitter_p": (0.0, 1.0),
                 "jitter_strength": (1e-6, 10.0), "gray_p": (0.0, 1.0), "blur_p": (0.0, 1.0)}


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
    if args.supervised and len(run.train_y) != run.N:
        common.fail(f"--supervised needs a label for every training image; {args.dataset} has none")
    model = TransFusion(args, size).to(run.device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(common.param_groups(model, args.weight_decay), lr=args.lr,
                          momentum=args.momentum)  # no weight decay on biases and norms
    total, warmup = args.epochs * run.steps_per_epoch, args.warmup_epochs * run.steps_per_epoch

    def get_lr(step):  # linear warm-up, then cosine decay to 0; linear scaling: lr x batch / 256
        peak = args.lr * args.batch_size / 256
        if step < warmup:
            return peak * (step + 1) / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    pair = torch.arange(B, device=run.device).repeat(2)  # views: the group is the source image
    probe = common.class_sorted(run.test_y, 128)  # labelled images for the adjacency analysis

    def evaluate(epoch):
        """k-NN of the backbone; on two fixed views of the probe images every block's adjacency (a
        figure), its same-class mass, the final block's mass on each partner view, its dead rows."""
        feats = run.features(model.backbone)
        u = run.rand(2, len(probe), NU, seed=2)  # the same views at every evaluation
        views = norm(views_of(run.images(probe, run.test_x), u, args, size))  # (2n, 3, S, S)
        with run.frozen(model):
            h = model.backbone(views.contiguous(memory_format=torch.channels_last))
            maps = model.head(h, every_block=True)  # (blocks + 1, 2n, 2n)
        y2 = run.test_y[probe].repeat(2)
        mass, chance = common.same_class_mass(maps, y2)
        dead = dead_rows(maps[-1]).item()  # > 0: the README on dead rows
        common.save_maps(run.figure(f"adjacency_epoch{epoch:04d}.png"), maps, y2)  # by class
        return run.report(epoch, feats, {
            "same_class_adjacency": mass.tolist(), "same_class_chance": chance,
            "partner_mass": partner_mass(maps[-1]).item(), "partner_chance": 1 / (len(y2) - 1),
            "dead_rows": dead})

    train_model = run.start(model, opt)  # resume, or a new run directory; DDP, compile
    if run.fresh:  # what the augmentation does (figures/views.png), and the random-init baseline
        x = run.images(run.spread(8))  # 8 training images, spread over the classes
        run.save_views(x, views_of(x, run.rand(2, 8, NU), args, size))  # view 1 of all, then 2
        evaluate(0)
    while run.epoch < args.epochs:
        for idx in run.batches():  # this epoch's global batches, the same on every rank
            u = torch.rand(2, B, NU, device=run.device, generator=run.g)  # every view's uniforms
            for group in opt.param_groups:
                group["lr"] = get_lr(run.step)
            with run.autocast():  # the augmentation too: bf16 GEMMs with --amp bf16
                views = norm(views_of(run.images(idx[run.shard]), u[:, run.shard], args, size))
                A = train_model(views)  # (2B, 2B) adjacency of the final block, global batch
            T = target_affinity(run.train_y[idx].repeat(2) if args.supervised else pair)  # (2B, 2B)
            loss = args.loss_scale * jsd_loss(A, T, args.jsd)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.clip_gradients(opt, model)  # --clip-grad (off by default)
            run.scaler.step(opt)
            run.scaler.update()
            A = A.detach()  # is the final block alive? epoch means, printed at log steps:
            run.step_done(loss, dead_rows=dead_rows(A), partner_mass=partner_mass(A))
        run.epoch_done()  # non-finite weights check; the epoch's record in metrics.jsonl
        if run.eval_due():  # rank 0, every --eval-every epochs
            evaluate(run.epoch)
        run.checkpoint()  # checkpoint.pt, atomically; ends the run here after --stop-epoch
    if run.rank == 0:  # the final evaluation; the linear probe, backbone.pt, summary.json
        run.finish(model.backbone, evaluate(args.epochs))
