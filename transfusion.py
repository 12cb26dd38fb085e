"""TransFusion: contrastive learning with ReLU-attention fusion blocks that output an adjacency matrix.

Huanran Li, Daniel Pimentel-Alarcon, "TransFusion: Contrastive Learning with Transformers",
arXiv:2403.18681 (v1 2024, v3 2025).

Two augmented views of B images go through a ResNet backbone and a stem (Linear, then BatchNorm over
the batch); the 2B vectors are the tokens of one sequence (the batch is the sequence). Fusion blocks
are single-head attention with the softmax replaced by a ReLU of cosine scores (zero diagonal, rows
normalised), added residually, no FFN. The final block is truncated: its attention matrix A
(2B x 2B), the adjacency between samples, IS the output. Training minimises the Jensen-Shannon
divergence between the rows of A and the rows of the target affinity T (which samples belong
together: the two views of an image, or with --supervised the samples of one class). Only the
backbone is kept for downstream use and evaluation.

Taken literally the paper's head does not learn (every row of A dies, see README). Four choices of
ours keep its three points (ReLU attention, A as the output, JSD to T) and make it learn: the stem's
BatchNorm centres the tokens (a random backbone's features all have cosine ~0.9, so every ReLU row
is flat or empty), W_k = W_q (two views then start with a positive score), the score
relu(C - row mean of C) (no row is ever empty) and 10 x JSD (its gradient is weak). The README has
the table of every formulation we measured; each is one flag away.

    python transfusion.py --batch-size 512 --dataset cifar10
    python transfusion.py --dataset synthetic --epochs 1        # offline smoke run
    torchrun --nproc-per-node 8 transfusion.py --batch-size 4096 --sync-bn   # 8 GPUs; the batch is global
"""

import atexit
import contextlib
import ctypes
import dataclasses
import datetime
import io
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro

import common


@dataclass
class Args:
    # ---- generic: identical in deepfusion.py, transfusion.py and bam.py
    dataset: Literal["cifar10", "cifar100", "stl10", "imagefolder", "synthetic"] = "cifar10"
    """dataset; imagefolder reads DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*"""
    data_dir: str = "data"
    """where datasets are downloaded to / read from"""
    download: bool = True
    """download torchvision datasets that are missing from --data-dir"""
    image_size: Optional[int] = None
    """resize images to this side length (default: native size; 32 for image folders)"""
    backbone: Literal["resnet18", "resnet50"] = "resnet18"
    """torchvision ResNet; images <= 64 px get the CIFAR stem (3x3 conv, no max-pool)"""
    num_samples: Optional[int] = None
    """use only the first N training images (default: all)"""
    batch_size: int = 512
    """images per optimisation step (each contributes several views)"""
    epochs: int = 200
    """training epochs (the learning-rate schedule spans all of them)"""
    seed: int = 1
    """random seed (initialisation, data order, augmentation)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: cuda when available"""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """mixed precision; auto: bf16 (or fp16 with loss scaling) on cuda, off on cpu"""
    compile: bool = False
    """torch.compile the model"""
    output_dir: str = "runs"
    """parent of the run directories"""
    resume: Optional[str] = None
    """checkpoint.pt to continue from (its run directory is reused; flags given now override)"""
    eval_every: int = 10
    """k-NN evaluation every N epochs (0: only at the end)"""
    linear_epochs: int = 100
    """epochs of the linear probe on frozen features"""
    knn_k: int = 200
    """neighbours in the weighted k-NN evaluation"""
    knn_t: float = 0.1
    """temperature of the weighted k-NN vote"""
    log_every: int = 50
    """print (and sync) the loss every N steps"""
    stop_epoch: Optional[int] = None
    """stop after this epoch as if interrupted, keeping the checkpoint (for testing --resume)"""
    sync_bn: bool = False
    """under torchrun: the backbone's BatchNorm statistics over the global batch, not each rank's shard"""
    # ---- method: TransFusion
    fusion_blocks: int = 5
    """fusion blocks before the final (adjacency) block; the authors' scripts use 5"""
    width: int = 512
    """token width d after the linear stem"""
    supervised: bool = False
    """target affinity from class labels instead of from the pairing of views"""
    score: Literal["centred", "relu", "offset", "leaky", "square"] = "centred"
    """score of a cosine C in every block: relu(C - row mean of C) (ours), relu(C) (paper), ablations"""
    final_score: Optional[Literal["relu", "centred", "offset", "leaky", "square"]] = None
    """score of the final (adjacency) block (default: --score)"""
    empty_rows: Literal["zero", "uniform"] = "zero"
    """a row with no positive score: zero (paper), or uniform (authors' code: 1e-10 on every entry)"""
    beta_init: float = 1.0
    """--score offset: initial beta of relu(C + beta), learned per block"""
    stem_bn: bool = True
    """BatchNorm1d after the linear stem, centring the tokens over the batch (ours; see README)"""
    tied_qk: bool = True
    """W_k = W_q: symmetric cosines, so two views of an image start with a positive score (ours)"""
    loss_scale: float = 10.0
    """multiplies the JSD (ours: its gradient is weak, see README; the authors' loss is 2 x JSD + log 2)"""
    head_lr: float = 1.0
    """the head's learning rate as a multiple of the backbone's"""
    jsd: Literal["rows", "elementwise"] = "rows"
    """loss: mean JSD between rows of A and T (paper), or mean Bernoulli JSD per entry (ablation)"""
    lr: float = 0.06
    """SGD learning rate per 256 images (scaled by batch-size / 256)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """SGD weight decay"""
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


# ----------------------------------------------------------------------------- augmentation
# torchvision's SimCLR pipeline is RandomResizedCrop -> HorizontalFlip -> ColorJitter(p=0.8) ->
# Grayscale(p=0.2) -> GaussianBlur. Here the same draws are made per sample, but the work is a few
# batched tensor ops:
# * crop, resize, flip and blur are linear along each image axis, so for every sample they are one
#   (size x H) matrix per axis, and the whole view is Ry @ x @ Rx^T (two batched matmuls). Resizing
#   uses a triangle (bilinear) filter widened when downscaling, i.e. antialiased like PIL's.
# * brightness, saturation, hue (a rotation in YIQ space, the usual GPU approximation of the HSV hue
#   shift) and grayscale are 3x3 colour matrices; contrast blends with the image's mean grey level,
#   which an affine colour map moves affinely. So all colour ops fold into one per-sample affine map
#   x -> M x + o, applied once (see colour_matrices for its closed form).
# * torchvision's ColorJitter applies its four ops in a random order per image. In this linear model
#   they commute (hue and saturation keep the grey level and the grey axis, brightness scales both,
#   and contrast's offset comes out as (1 - c) b mean_grey in every order), so no order is drawn: the
#   order only matters through torchvision's clamping after every op.
# Differences from torchvision: boxes are not rounded to whole pixels; values are clamped to [0, 1]
# once at the end instead of after every jitter op; blur is applied before the colour ops, which
# commutes with them up to that clamping; hue is the YIQ rotation.

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def colour_basis():
    """(3, 3, 3): 1 g^T (every channel := grey level g^T x), I - 1 g^T (the chroma part of x) and the
    chroma rotated by 90 degrees in the (I, Q) plane, i.e. T^-1 [[0, 0, 0], [0, 0, -1], [0, 1, 0]] T."""
    T = torch.tensor(RGB2YIQ, dtype=torch.float64)
    grey = torch.ones(3, 1, dtype=torch.float64) * T[:1]
    rot = torch.linalg.inv(T) @ torch.tensor([[0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64) @ T
    return torch.stack([grey, torch.eye(3, dtype=torch.float64) - grey, rot]).float()


COLOUR_BASIS = colour_basis()


TRIES = 10  # RandomResizedCrop's attempts at a box that fits
# A sample's randomness is one row u of NU uniforms in [0, 1), drawn for the whole (global) batch at
# once. A view is then a function of its image and its row alone, whatever else is in the batch, so a
# rank that augments only its shard makes exactly the views one process would make (see __main__).
# Columns: crop (T area tries, T log-aspect tries, y, x), flip, blur, blur sigma, colour (jitter on,
# brightness, contrast, saturation, hue, grayscale).
U_CROP, U_COLOUR = 2 * TRIES + 2, 6
NU = U_CROP + 3 + U_COLOUR


def crop_boxes(u, scale, ratio):
    """RandomResizedCrop boxes from u (B, 2T + 2) as fractions of the side: (y0, x0, h, w), each (B,). As
    torchvision: area ~ U(scale), log aspect ~ U(log ratio); the first of T tries that fits, else the whole image."""
    T = (u.shape[1] - 2) // 2
    area = scale[0] + (scale[1] - scale[0]) * u[:, :T]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, T:2 * T]
    w, h = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)  # index of the first fitting try (0 if none fits)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    w, h = [torch.where(fits.any(1), v, torch.ones_like(v)) for v in (w, h)]
    return u[:, -2] * (1 - h), u[:, -1] * (1 - w), h, w


def resample_matrix(start, length, n_in, n_out, flip=None):
    """Per-sample (n_out x n_in) matrices that resample the interval [start, start + length) (fractions
    of the side) onto n_out pixels with a triangle filter of width max(1, input px per output px);
    where flip (B,) is true, in mirrored order."""
    step = length * n_in / n_out  # input pixels per output pixel, (B,)
    pos = torch.arange(n_out, device=start.device) + 0.5  # output pixel centres
    if flip is not None:
        pos = torch.where(flip[:, None], n_out - pos, pos)
    centre = start[:, None] * n_in + pos * step[:, None] - 0.5
    support = step.clamp_min(1)[:, None, None]
    j = torch.arange(n_in, device=start.device)
    w = (j[None, None, :] - centre[:, :, None]).abs_().div_(support).neg_().add_(1).clamp_(min=0)  # (B, n_out, n_in)
    return w.div_(w.sum(-1, keepdim=True))


def blur_matrix(sigma, n):
    """Per-sample (n x n) Gaussian blur matrices, kernel ~10% of the side, reflect padding (torchvision)."""
    r = max(1, int(0.1 * n) // 2)
    t = torch.arange(-r, r + 1, device=sigma.device)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1)
    src = torch.arange(n, device=sigma.device)[:, None] + t[None]  # (n, 2r+1), reflect into [0, n)
    src = torch.where(src < 0, -src, torch.where(src >= n, 2 * (n - 1) - src, src))
    G = torch.zeros(len(sigma), n, n, device=sigma.device)
    G.scatter_add_(2, src.expand(len(sigma), n, 2 * r + 1), k[:, None, :].expand(-1, n, -1))
    return G


def colour_matrices(x, u, jitter, jitter_p, gray_p):
    """Per-sample affine colour map (M (B,3,3), o (B,3)) of colour jitter, then grayscale; u (B, 6): the
    sample's colour uniforms (see NU). With brightness b, contrast c, saturation s, hue angle h:
        M = b c [1 g^T + s cos(h) (I - 1 g^T) + s sin(h) rot],   o = (1 - c) b (g^T mean colour) 1
    (saturation scales the chroma, hue rotates it, contrast blends with the mean grey level); grayscale
    keeps only the first term (1 g^T M = b c 1 g^T)."""
    on = u[:, 0] < jitter_p
    bri, con, sat = [torch.where(on, max(0, 1 - s) + (1 + s - max(0, 1 - s)) * u[:, 1 + j], 1.0)
                     for j, s in enumerate(jitter[:3])]
    hue = torch.where(on, (2 * u[:, 4] - 1) * jitter[3], 0.0) * 2 * math.pi
    chroma = sat * (u[:, 5] >= gray_p)  # grayscale: no chroma left
    coef = torch.stack([torch.ones_like(sat), chroma * hue.cos(), chroma * hue.sin()], 1) * (bri * con)[:, None]
    M = (coef @ COLOUR_BASIS.to(x.device).view(3, 9)).view(-1, 3, 3)
    mean_grey = x.mean((2, 3)) @ torch.tensor(GREY, device=x.device)  # of the view before colour ops
    return M, ((1 - con) * bri * mean_grey)[:, None].expand(-1, 3)


def augment(x, u, size, scale, ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8, gray_p=0.2, blur_p=0.0):
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 1]; sample i's crop box, flip, colour jitter,
    grayscale and blur all come from its uniforms u[i] (u: (B, NU), on x's device)."""
    B, _, H, W = x.shape
    box, flip, blur, sigma, colour = u.split((U_CROP, 1, 1, 1, U_COLOUR), dim=1)
    y0, x0, h, w = crop_boxes(box, scale, ratio)
    Ry, Rx = resample_matrix(y0, h, H, size), resample_matrix(x0, w, W, size, flip=flip[:, 0] < flip_p)
    if blur_p > 0:  # one sigma ~ U(0.1, 2) per sample for both axes, as torchvision's GaussianBlur
        Gb, blur = blur_matrix(0.1 + 1.9 * sigma[:, 0], size), blur[:, :, None] < blur_p
        Ry, Rx = torch.where(blur, Gb @ Ry, Ry), torch.where(blur, Gb @ Rx, Rx)
    # columns, then rows, in the layouts that need no copies (measured fastest of four on one CPU thread);
    # 1 / 255 folded into Rx
    v = torch.bmm(x.reshape(B, 3 * H, W).float(), Rx.transpose(1, 2).contiguous().div_(255))  # (B, 3H, size)
    v = torch.matmul(Ry[:, None], v.view(B, 3, H, size))  # (B, 3, size, size)
    M, o = colour_matrices(v, colour, jitter, jitter_p, gray_p)
    return torch.baddbmm(o[:, :, None], M, v.reshape(B, 3, size * size)).view(B, 3, size, size).clamp_(0, 1)  # M v + o


def views_of(x, u, args, size):
    """The two SimCLR views of B images, view-major: row v * B + i is view v of image i,
    (2B, 3, size, size) in [0, 1]. u (2, B, NU): every view's uniforms."""
    small = size <= 64
    scale = (args.min_scale if args.min_scale is not None else (0.2 if small else 0.08), 1.0)
    blur_p = args.blur_p if args.blur_p is not None else (0.0 if small else 0.5)
    s = args.jitter_strength
    kw = dict(scale=scale, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=args.jitter_p,
              gray_p=args.gray_p, blur_p=blur_p)
    return augment(x.repeat(2, 1, 1, 1), u.reshape(-1, NU), size, **kw)  # both views in one call


# ----------------------------------------------------------------------------- model


def make_backbone(name, image_size):
    """torchvision ResNet with fc = Identity; CIFAR stem for small images. Returns (net, feature dim)."""
    net = getattr(torchvision.models, name)()
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


# torch 2.14 marks torch.distributed.nn.functional deprecated in favour of a private module; it is still
# the public, autograd-aware form of the collectives (torch >= 2.4), so that warning is silenced
warnings.filterwarnings("ignore", "torch.distributed.nn.functional", FutureWarning)


def gather(h, views):
    """Rows of every rank in the order one process with the whole batch has them, view-major over the
    global batch: (views * b, D) on each of W ranks -> (views * W * b, D). Autograd-aware: every rank
    computes the same loss over the global batch, so a rank's rows receive the sum of W identical
    gradients, which DDP's averaging divides back: the step is the one-process step. One process: h."""
    if not (dist.is_available() and dist.is_initialized()):
        return h
    parts = torch.distributed.nn.functional.all_gather(h)  # W x (views * b, D)
    return torch.stack(parts).unflatten(1, (views, -1)).transpose(0, 1).flatten(0, 2)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, over all ranks (--sync-bn),
    through autograd-aware all_reduce, so the gradient through the statistics reaches every rank. The
    job of nn.SyncBatchNorm, which refuses CPU tensors (so it could not be tested here). Same state_dict
    as BatchNorm2d; in eval mode, or in one process, it is BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        sum_ = lambda t: torch.distributed.nn.functional.all_reduce(t.sum((0, 2, 3)))  # over all ranks
        n = x.numel() // x.shape[1] * dist.get_world_size()
        xf = x.float()
        mean = sum_(xf) / n
        var = sum_((xf - mean[:, None, None]) ** 2) / n  # two passes: as exact as one process's BatchNorm
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm2d
        scale = self.weight * (var + self.eps).rsqrt()
        return (xf * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


class FusionBlock(nn.Module):
    """One TransFusion block over the batch (pre-LN, single head, no FFN):
        Y = LN(X);  Q = rownorm(Y Wq);  K = rownorm(Y Wk);  V = Y Wv     (tied: Wk = Wq)
        C = Q K^T;  R = score(C) with zero diagonal;  A = R / (rowsum(R) + eps);  X <- X + A V
    The final block is truncated: it returns A itself (no A V, no residual)."""

    eps = 1e-6  # ours: keeps 1 / rowsum bounded when a row has almost no positive score

    def __init__(self, d, score="relu", final=False, empty="zero", beta_init=1.0, tied=False):
        super().__init__()
        self.score, self.final, self.empty = score, final, empty
        self.ln, self.q = nn.LayerNorm(d), nn.Linear(d, d)
        self.k = self.q if tied else nn.Linear(d, d)
        self.v = None if final else nn.Linear(d, d)
        self.beta = nn.Parameter(torch.tensor(float(beta_init))) if score == "offset" else None

    def cosines(self, y):
        """C = rownorm(Y Wq) rownorm(Y Wk)^T, (N, N), fp32 under autocast."""
        return F.normalize(self.q(y).float(), dim=-1) @ F.normalize(self.k(y).float(), dim=-1).T

    def adjacency(self, C):
        """A from the cosines C: the ReLU score in place of softmax's exp, then rows normalised."""
        R = {"relu": lambda: F.relu(C),  # paper
             "centred": lambda: F.relu(C - C.mean(1, keepdim=True)),  # ours: relu(C_ij - mean_j C_ij)
             "offset": lambda: F.relu(C + self.beta),  # ours: a learned offset
             "leaky": lambda: F.leaky_relu(C, 0.1) + 0.1,  # ours: LeakyReLU lifted to be >= 0 on [-1, 1]
             "square": lambda: C.square()}[self.score]()  # authors' code (their loss adjacency)
        off = 1 - torch.eye(len(C), device=C.device)
        R = R * off  # no self-attention
        if self.empty == "uniform":  # authors' code: 1e-10 on every entry, so an empty row becomes uniform
            R = R + 1e-10 * off
            return R / R.sum(1, keepdim=True)
        return R / (R.sum(1, keepdim=True) + self.eps)  # rows sum to 1 (or 0 if no score is positive)

    def forward(self, x):
        """x (N, d) -> (x', A (N, N)); for the final block x' is x unchanged."""
        y = self.ln(x)
        A = self.adjacency(self.cosines(y))
        return (x, A) if self.final else (x + (A @ self.v(y).float()).to(x.dtype), A)


class TransFusionHead(nn.Module):
    """Stem to width d (Linear, then BatchNorm1d over the batch with --stem-bn), `fusion_blocks`
    fusion blocks, then the truncated final block. Built from the method's flags in args."""

    def __init__(self, d_in, args):
        super().__init__()
        d = args.width
        self.stem = nn.Sequential(nn.Linear(d_in, d), *[nn.BatchNorm1d(d)] * args.stem_bn)
        kw = dict(empty=args.empty_rows, beta_init=args.beta_init, tied=args.tied_qk)
        self.blocks = nn.ModuleList(FusionBlock(d, args.score, **kw) for _ in range(args.fusion_blocks))
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
        self.backbone, d = make_backbone(args.backbone, image_size)
        self.head = TransFusionHead(d, args)

    def forward(self, views):  # (2b, 3, S, S) this rank's views -> adjacency (2B, 2B) of the global batch
        h = self.backbone(views.contiguous(memory_format=torch.channels_last))  # this rank's (2b, D)
        return self.head(gather(h, 2))  # the fusion blocks attend over the global batch


def partner_mass(A):
    """Mean share of each row of A (2B, 2B) on the row's partner view (view-major order)."""
    n = len(A) // 2
    return (A.diagonal(n).sum() + A.diagonal(-n).sum()) / len(A)


def dead_rows(A):
    """Fraction of rows of A with no score above the others: all zero, or (uniform fallback) all equal."""
    return (A.amax(1) * (len(A) - 1) < 1 + 1e-3).float().mean()


def target_affinity(group):
    """T_ij = 1 if samples i and j belong together (same group id) and i != j, rows normalised to 1.
    group: (N,) image index (views) or class label (--supervised). A row with no partner stays 0."""
    T = (group[:, None] == group[None, :]).float()
    T.fill_diagonal_(0)
    return T / T.sum(1, keepdim=True).clamp_min(1)


def jsd(P, Q, eps=1e-12):
    """Jensen-Shannon divergence in nats along the last axis: 0.5 KL(P||M) + 0.5 KL(Q||M), M = (P+Q)/2,
    with 0 log 0 = 0 (the clamp only keeps log finite where the factor in front is 0). <= log 2."""
    M = (P + Q) / 2
    kl = lambda X: (X * (X.clamp_min(eps).log() - M.clamp_min(eps).log())).sum(-1)
    return 0.5 * kl(P) + 0.5 * kl(Q)


def jsd_loss(A, T, kind="rows"):
    """rows: mean over rows i of JSD(A_i, T_i), rows of T with no partner left out (paper).
    elementwise: mean over i != j of JSD(Bernoulli(A_ij), Bernoulli(T_ij)) (ours, an ablation)."""
    A, T = A.float(), T.float()
    if kind == "rows":
        # A row whose scores are all <= 0 sums to 0, not 1. Such a row would score JSD = 0.5 log 2 against
        # any target, below a spread-out row, so the loss would drive rows to zero, where ReLU has no
        # gradient. Ours: complete each row with a "none" outcome of mass 1 - rowsum(A) that the target
        # never has (the same JSD when rows sum to 1; log 2, the maximum, for a dead row).
        none = (1 - A.sum(1, keepdim=True)).clamp_min(0)
        has_partner = (T.sum(1) > 0).float()
        rows = jsd(torch.cat([A, none], 1), torch.cat([T, torch.zeros_like(none)], 1))
        return (rows * has_partner).sum() / has_partner.sum().clamp_min(1)
    off = 1 - torch.eye(len(A), device=A.device)
    per_entry = jsd(torch.stack([A, 1 - A], -1), torch.stack([T, 1 - T], -1))  # (N, N)
    return (per_entry * off).sum() / off.sum()


# ----------------------------------------------------------------------------- evaluation


def autocast(device, amp_dtype):
    """Mixed precision in amp_dtype (bf16 or fp16); None: fp32, autocast off."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


@torch.no_grad()
def extract(backbone, x, norm, amp_dtype, batch=512):
    """Backbone features (N, D) of un-augmented uint8 images, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    for i in range(0, len(x), batch):
        with autocast(x.device, amp_dtype):
            xb = norm(x[i:i + batch].float() / 255).contiguous(memory_format=torch.channels_last)
            feats.append(backbone(xb).float())
    backbone.train(was_training)
    return torch.cat(feats)


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs, seed, batch=1024):
    """Top-1 test accuracy of a linear classifier trained on frozen, standardised features
    (Adam 1e-3, cosine; ours: a fast, robust choice for a probe on cached features)."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    g = torch.Generator(train_f.device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the probe must not consume the training RNG
        torch.manual_seed(seed)
        clf = nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(train_f) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    for _ in range(epochs):
        perm = torch.randperm(len(train_f), device=train_f.device, generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return common.accuracy(clf(test_f), test_y)


# ----------------------------------------------------------------------------- run plumbing


def fail(msg, status=2, every_rank=False):
    """One line on stderr and exit: 2 for bad input, 1 for a failed run. Under torchrun every rank meets
    the same error and rank 0 prints it; every_rank: an error of this rank alone, which it prints."""
    if every_rank or int(os.environ.get("RANK", 0)) == 0:
        print("error: " + " ".join(str(msg).split()), file=sys.stderr)
    raise SystemExit(status)


def parse_args():
    """tyro CLI whose errors are one line. With --resume, the checkpoint's arguments are the defaults,
    so only the flags given now change anything. Returns (args, checkpoint or None)."""
    def cli(default=None):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return tyro.cli(Args, default=default)
        except SystemExit as e:
            if e.code:  # tyro draws a box; keep its first sentence on one line
                text = re.sub(r"[\u2500-\u257f]", " ", err.getvalue())
                fail(" ".join(text.split()).split(" For full helptext")[0])
            raise

    args = cli()
    if args.resume is None:
        return args, None
    try:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and "args" in ckpt and "model" in ckpt
    except FileNotFoundError:
        fail(f"checkpoint {args.resume!r} does not exist")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        fail(f"cannot read checkpoint {args.resume!r} (truncated, or not written by this script): "
             f"{type(e).__name__} {first}")
    if ckpt.get("method") != "transfusion":
        fail(f"{args.resume!r} is a checkpoint of {ckpt.get('method')!r}, not transfusion")
    missing = sorted(CHECKPOINT_KEYS - set(ckpt))
    unknown = sorted(set(ckpt["args"]) - {f.name for f in dataclasses.fields(Args)})
    if missing or unknown:  # written by another version of this file
        fail(f"checkpoint {args.resume!r} was written by another version of this script: "
             + (f"it lacks {', '.join(missing)}" if missing else
                f"unknown argument(s) {', '.join('--' + u.replace('_', '-') for u in unknown)}"))
    # the checkpoint's arguments are the defaults; one-off flags (--stop-epoch) are not inherited
    new = cli(Args(**{**ckpt["args"], "resume": args.resume, "stop_epoch": None}))
    for name in ("dataset", "data_dir", "image_size", "num_samples", "batch_size"):
        if getattr(new, name) != ckpt["args"][name] and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: resuming with --{name.replace('_', '-')} {getattr(new, name)}; the run "
                  f"so far used {ckpt['args'][name]}", file=sys.stderr)
    return new, ckpt


# Every numeric flag's accepted range, both ends included, checked in one place (check_args) before
# anything is written; every value must also be finite. The upper bounds keep a typo from exhausting
# memory or overflowing (image side, widths, counts, seed). Generic flags here, the method's below.
LIMITS = {"image_size": (8, 1024), "num_samples": (1, 10**9), "batch_size": (2, 1 << 16),
          "epochs": (1, 100_000), "seed": (0, 2**32 - 3), "eval_every": (0, 100_000),
          "linear_epochs": (1, 100_000), "knn_k": (1, 100_000), "knn_t": (1e-4, 100.0),
          "log_every": (1, 10**9), "stop_epoch": (1, 100_000)}
METHOD_LIMITS = {"fusion_blocks": (0, 64), "width": (1, 1 << 16), "beta_init": (-1.0, 2.0),
                 "loss_scale": (1e-6, 1e6), "head_lr": (1e-6, 1e6), "lr": (1e-9, 100.0),
                 "momentum": (0.0, 1.0), "weight_decay": (0.0, 1.0), "warmup_epochs": (0, 100_000),
                 "min_scale": (1e-4, 1.0), "jitter_strength": (1e-6, 10.0), "jitter_p": (0.0, 1.0),
                 "gray_p": (0.0, 1.0), "blur_p": (0.0, 1.0)}


def check_args(args):
    """Every numeric flag against LIMITS and METHOD_LIMITS (one line and exit 2 when outside)."""
    for name, (lo, hi) in {**LIMITS, **METHOD_LIMITS}.items():
        value = getattr(args, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and not (math.isfinite(v) and lo <= v <= hi):
                fail(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}")


def keep_freed_memory():
    """CPU with glibc: keep freed memory for reuse instead of returning it to the OS. A step allocates
    tensors of a few MB; by default glibc unmaps or trims them when they are freed, so the next step
    page-faults them in again (measured: the batched augmentation ran at half speed on CPU)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's maximum) come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap instead of trimming it


CHECKPOINT_KEYS = {"method", "args", "model", "optimizer", "scaler", "epoch", "step", "history", "rng"}


def save_atomic(path, write):
    """write(file) into path + ".tmp", fsync, rename, fsync the directory: a crash or power loss never
    leaves a truncated or empty file. A failed write (disk full, permission lost) ends the run with
    one line, the previous file intact and the temp file removed."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        fail(f"could not write {path}: {e}; its previous version (if any) is intact", status=1)


def non_finite(model):
    """Names of the parameters and buffers holding NaN or inf."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]


if __name__ == "__main__":
    args, ckpt = parse_args()
    check_args(args)
    # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python` run is one process and needs no setup.
    # --batch-size is the global batch: every rank draws the same global batch and its randomness, and
    # augments and encodes its shard of b = B / W images; the head and loss see all B (see gather).
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} (the global batch) must be divisible by the {world} processes")
    b = args.batch_size // world
    shard = slice(rank * b, (rank + 1) * b)  # this rank's images of each global batch
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available")
    if device.type == "cpu":
        keep_freed_memory()
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # NCCL on GPUs, gloo on CPU; a long timeout because the other ranks wait while rank 0 evaluates
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
        atexit.register(dist.destroy_process_group)
    amp = {"auto": ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"}.get(
        args.amp, args.amp)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    torch.manual_seed(args.seed)  # the same on every rank: same initial weights, data order, augmentation

    def load():
        try:
            return common.load_dataset(args.dataset, args.data_dir, args.download, args.image_size, args.num_samples), None
        except common.UsageError as e:
            return None, str(e)
    data, error = load() if rank == 0 else (None, None)
    if world > 1:  # rank 0 loads (and downloads) first; the others learn how that went, then read its files
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
        if rank > 0 and error is None:
            data, own = load()
            if own is not None:  # e.g. --data-dir not shared between nodes
                fail(f"rank {rank}: {own}", every_rank=True)
    if error is not None:
        fail(error)  # the same for every rank; rank 0 prints it
    N, size = len(data.pretrain_x), data.pretrain_x.shape[-1]
    if args.batch_size > N:
        fail(f"--batch-size {args.batch_size} is larger than the training set ({N} images)")
    if args.supervised and len(data.train_y) != N:
        fail(f"--supervised needs a label for every training image; {args.dataset} has unlabeled ones")
    x_all = data.pretrain_x.to(device)
    train_x, train_y = x_all[: len(data.train_y)], data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
    norm = lambda v: (v - mean) / std
    n_cls = len(data.classes)
    pair = torch.arange(args.batch_size, device=device).repeat(2)  # views mode: group = source image
    probe = common.class_sorted(data.test_y, 128).to(device)  # labelled images for the adjacency analysis

    model = TransFusion(args, size).to(device).to(memory_format=torch.channels_last)
    if args.sync_bn:  # the backbone's BatchNorm over the global batch (the head has none)
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm  # same parameters and buffers, so checkpoints stay compatible
    lr = args.lr * args.batch_size / 256  # linear scaling rule
    groups = [{"params": model.backbone.parameters(), "mult": 1.0},
              {"params": model.head.parameters(), "mult": args.head_lr}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    g = torch.Generator(device).manual_seed(args.seed)  # data order and augmentation
    steps_per_epoch = N // args.batch_size  # the last partial batch is dropped
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    epoch, step, history = 0, 0, {"train_seconds": 0.0, "train_images": 0}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint {args.resume!r} does not match this model: {str(e).splitlines()[0]}")
        scaler.load_state_dict(ckpt["scaler"])
        epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        g.set_state(ckpt["rng"]["data"].to(g.get_state().device))
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        run_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join(args.output_dir, f"transfusion__{args.dataset}__{args.seed}__{stamp}")
        while os.path.exists(run_dir):
            run_dir += "_"
    # DDP averages gradients over ranks (and starts every rank from rank 0's weights and buffers)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    train_model = torch.compile(train_model) if args.compile else train_model
    last_good = epoch  # the epoch of the newest checkpoint on disk (0: none)
    if rank == 0:  # only rank 0 writes, logs, evaluates and checkpoints; `model` is the unwrapped module
        try:
            os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
            for name in ("checkpoint.pt", "backbone.pt", "summary.json"):  # left by a killed run
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(run_dir, name + ".tmp"))
            earlier = []  # args.json keeps the settings of every earlier part of a resumed run
            if ckpt is not None:
                with contextlib.suppress(OSError, ValueError), open(os.path.join(run_dir, "args.json")) as f:
                    old = json.load(f)
                    earlier = old.pop("earlier", []) + [{**old, "until_epoch": epoch}]
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump({**asdict(args), "earlier": earlier}, f, indent=2)
            metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        except OSError as e:
            fail(f"cannot write the run directory {run_dir!r}: {e.strerror or e}")
        log = lambda **kv: (metrics.write(json.dumps(kv) + "\n"), metrics.flush())
        print(f"transfusion | {args.dataset} {N} images {size}px | {device} amp={amp} | batch {args.batch_size}"
              + (f" = {world} processes x {b}" if world > 1 else "") + f" | {steps_per_epoch} steps/epoch | run dir {run_dir}")

    def kept():
        return (f"the last good checkpoint is {run_dir}/checkpoint.pt (epoch {last_good})" if last_good
                else "no checkpoint was written")

    def interrupted(*_):  # Ctrl-C: one line, where to resume from, exit status 130
        fail(f"interrupted; {kept()}" + (f"; resume with --resume {run_dir}/checkpoint.pt"
                                          if last_good else ""), status=130)
    signal.signal(signal.SIGINT, interrupted)

    def evaluate(epoch):
        """k-NN on backbone features; adjacency of every block on two fixed views of the probe batch:
        same-class mass per block and, for the final block, the mass on each row's partner view.
        Returns (metrics, train features, test features)."""
        train_f, test_f = [extract(model.backbone, v, norm, amp_dtype) for v in (train_x, test_x)]
        knn = common.knn_accuracy(train_f, train_y, test_f, test_y, n_cls, args.knn_k, args.knn_t)
        out = {"event": "eval", "epoch": epoch, "step": step, "knn_acc": knn}
        pg = torch.Generator(device).manual_seed(args.seed + 2)  # the same views at every evaluation
        u = torch.rand(2, len(probe), NU, device=device, generator=pg)
        views = norm(views_of(test_x[probe], u, args, size))  # (2n, ...): view 1 of all, then view 2
        model.eval()
        with torch.no_grad(), autocast(device, amp_dtype):
            maps = model.head(model.backbone(views.contiguous(memory_format=torch.channels_last)), every_block=True)
        model.train()
        y2 = test_y[probe].repeat(2)
        mass, chance = common.same_class_mass(maps, y2)  # maps (blocks + 1, 2n, 2n)
        n2 = len(y2)
        partner, dead = partner_mass(maps[-1]).item(), dead_rows(maps[-1]).item()
        out.update(same_class_adjacency=mass.tolist(), same_class_chance=chance, partner_mass=partner,
                   partner_chance=1 / (n2 - 1), dead_rows=dead)
        if dead > 0.5:
            print(f"warning: {dead:.0%} of the final block's rows are dead (every ReLU score <= 0, no "
                  "gradient); see the README on dead rows", file=sys.stderr)
        order = torch.sort(y2, stable=True).indices  # both views of each class together
        common.save_maps(os.path.join(run_dir, "figures", f"adjacency_epoch{epoch:04d}.png"),
                         maps[:, order][:, :, order], y2[order])
        log(**out)
        print(" ".join(f"{k} " + (" ".join(f"{u:.3f}" for u in v) if isinstance(v, list) else
                                  f"{v:.4f}" if isinstance(v, float) else f"{v}") for k, v in out.items()))
        return out, train_f, test_f

    if ckpt is None and rank == 0:  # the other ranks go ahead and wait at the first all_gather
        vg = torch.Generator(device).manual_seed(args.seed + 1)  # a figure must not move the training RNG
        orig = train_x[:: max(1, len(train_x) // 8)][:8]  # spread over the set (folders are class-sorted)
        views = views_of(orig, torch.rand(2, len(orig), NU, device=device, generator=vg), args, size)
        grid = torch.cat([orig.float() / 255, views])  # originals, view 1, view 2
        up = max(1, 96 // size)  # enlarge small images so a person can see the augmentation
        torchvision.utils.save_image(grid.repeat_interleave(up, 2).repeat_interleave(up, 3),
                                     os.path.join(run_dir, "figures", "views.png"), nrow=8)
        history["init"] = {k: v for k, v in evaluate(0)[0].items() if k not in ("event", "epoch", "step")}

    model.train()
    while epoch < args.epochs:
        t0, loss_sum, live_sum = time.time(), torch.zeros((), device=device), torch.zeros(2, device=device)
        bad_run = torch.zeros((), dtype=torch.long, device=device)  # consecutive non-finite losses
        bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first fatal step, -1: none
        patience = 10 if amp == "fp16" else 1  # fp16: the GradScaler skips steps before we give up
        perm = torch.randperm(N, device=device, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]  # the global batch, as on every rank
            u = torch.rand(2, args.batch_size, NU, device=device, generator=g)  # and its views' randomness
            for group in opt.param_groups:  # warm-up then cosine, a function of the step (resumable)
                group["lr"] = group["mult"] * (lr * (step + 1) / warmup_steps if step < warmup_steps else
                               lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) /
                                                        max(1, total_steps - warmup_steps))))
            views = norm(views_of(x_all[idx[shard]], u[:, shard], args, size))  # this rank's (2b, 3, S, S)
            with autocast(device, amp_dtype):
                A = train_model(views)  # (2B, 2B) adjacency of the final block over the global batch
            T = target_affinity(train_y[idx].repeat(2) if args.supervised else pair)  # (2B, 2B)
            loss = args.loss_scale * jsd_loss(A, T, args.jsd)
            with torch.no_grad():  # is the final block alive? (read on the host at log steps only)
                live_sum += torch.stack([dead_rows(A), partner_mass(A)])  # A is fp32 (see cosines)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss = loss.detach()
            loss_sum += loss
            bad_run = torch.where(torch.isfinite(loss), 0, bad_run + 1)
            bad_step = torch.where((bad_step < 0) & (bad_run >= patience), step + 1, bad_step)
            step += 1
            if step % args.log_every == 0 or i == steps_per_epoch - 1:  # the only host syncs of the loop
                if bad_step.item() >= 0:  # the loss is the same on every rank, so all of them stop here
                    fail(f"non-finite loss at step {bad_step.item()} (epoch {epoch + 1}); stopping: {kept()}",
                         status=1)
                if rank == 0:
                    ips = (i + 1) * args.batch_size / (time.time() - t0)
                    eta = ((total_steps - step) * args.batch_size) / ips
                    dead, partner = (live_sum / (i + 1)).tolist()  # means over the epoch so far
                    print(f"epoch {epoch + 1}/{args.epochs} step {step} loss {loss.item():.4f} "
                          f"dead {dead:.3f} partner {partner:.4f} "
                          f"lr {opt.param_groups[0]['lr']:.4g} {ips:.0f} img/s eta {eta / 60:.1f} min")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
        history["train_seconds"] += seconds
        history["train_images"] += steps_per_epoch * args.batch_size
        epoch += 1
        bad = non_finite(model)  # a blown-up last update can leave NaN weights after a finite loss
        if bad:  # the same on every rank (DDP keeps the weights equal), so all of them stop here
            fail(f"non-finite weights after epoch {epoch} ({len(bad)} tensors, e.g. {bad[0]}); stopping: "
                 f"{kept()}", status=1)
        if rank == 0:
            dead, partner = (live_sum / steps_per_epoch).tolist()  # of the final block, epoch means
            log(event="epoch", epoch=epoch, step=step, loss=(loss_sum / steps_per_epoch).item(), lr=opt.param_groups[0]["lr"],
                seconds=seconds, images_per_sec=steps_per_epoch * args.batch_size / seconds, dead_rows=dead,
                partner_mass=partner)
            if args.eval_every and epoch % args.eval_every == 0 and epoch < args.epochs:
                evaluate(epoch)
            state = {
                "method": "transfusion", "args": asdict(args), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                "history": history, "rng": {"torch": torch.get_rng_state(), "data": g.get_state().cpu(),
                                            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}
            save_atomic(os.path.join(run_dir, "checkpoint.pt"), lambda f: torch.save(state, f))
            last_good = epoch
        if args.stop_epoch is not None and epoch >= args.stop_epoch and epoch < args.epochs:
            if rank == 0:
                print(f"stopped after epoch {epoch} (--stop-epoch); resume with --resume {run_dir}/checkpoint.pt")
            raise SystemExit(0)

    if rank > 0:
        raise SystemExit(0)  # training is done; rank 0 evaluates alone
    final, train_f, test_f = evaluate(args.epochs)  # the linear probe reuses the k-NN features
    linear = linear_probe(train_f, train_y, test_f, test_y, n_cls, args.linear_epochs, args.seed)
    save_atomic(os.path.join(run_dir, "backbone.pt"), lambda f: torch.save(model.backbone.state_dict(), f))
    summary = {"knn_acc": final["knn_acc"], "linear_acc": linear, "init": history.get("init"),
               "epochs": args.epochs, "images_per_sec": history["train_images"] / max(history["train_seconds"], 1e-9),
               "normalization": {"mean": data.mean, "std": data.std},
               **{k: v for k, v in final.items() if k not in ("event", "epoch", "step", "knn_acc")}}
    log(event="final", **summary)
    save_atomic(os.path.join(run_dir, "summary.json"), lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"done: knn_acc {summary['knn_acc']:.4f} linear_acc {linear:.4f} "
          f"(random init: knn_acc {history['init']['knn_acc']:.4f}) -> {run_dir}")
