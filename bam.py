"""BAM: unsupervised representation learning by balanced self-attention matching.

Daniel Shalam, Simon Korman, "Unsupervised Representation Learning by Balanced Self Attention
Matching", ECCV 2024, arXiv:2408.02014.

Instead of matching the features of two views, BAM matches their self-attention vectors: each crop's
distribution of similarities to the OTHER images of the batch. Every image gets 2 global crops and a
few small local crops. The target is the attention of a global crop made balanced (entropy-regularised
self optimal transport: a few Sinkhorn iterations on exp(S / lambda)) and taken without gradient; the
source is the plain softmax attention (temperature tau) of every other crop of the same image; the
loss is their cross-entropy. No negatives, memory bank or asymmetric encoder are needed; an EMA
teacher (as in the released scripts) is one flag away. Only the backbone is kept for evaluation.

    python bam.py --batch-size 512 --dataset cifar10
    python bam.py --dataset synthetic --epochs 1        # offline smoke run
    torchrun --nproc-per-node 8 bam.py --batch-size 4096 --sync-bn   # 8 GPUs; the batch is global
"""

import atexit
import contextlib
import copy
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
from typing import Literal, Optional, Tuple

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
    # ---- method: BAM
    num_local_crops: int = 4
    """small crops per image, besides the 2 global crops"""
    local_size: Optional[int] = None
    """side of the local crops (default: half the image size; the CIFAR recipe 2 x 32 + 4 x 16 px is ours)"""
    global_scale: Tuple[float, float] = (0.25, 1.0)
    """area fraction range of the global crops"""
    local_scale: Tuple[float, float] = (0.05, 0.25)
    """area fraction range of the local crops"""
    proj_hidden: int = 2048
    """hidden width of the 3-layer GELU projector"""
    proj_dim: int = 256
    """output dimension of the projector (embeddings are L2-normalised)"""
    proj_last_bn: bool = True
    """non-affine BatchNorm on the projector output (released code's MlpProjHead; see README: without it
    ResNet-18 collapsed in our checks)"""
    lam: float = 0.05
    """entropic regularisation lambda of the Sinkhorn target exp(S / lambda)"""
    tau: float = 0.1
    """softmax temperature of the source attention"""
    sinkhorn_iters: int = 3
    """Sinkhorn iterations (each: key marginals, then query marginals)"""
    top_k: int = 0
    """keep k target columns per image, those largest on average over its global crops (released code,
    --top_k_sink); 0 = off, as in the paper"""
    ema_teacher: bool = False
    """EMA teacher embeds every crop and gives targets and keys (released scripts); off = one network"""
    teacher_momentum: float = 0.995
    """EMA momentum of the teacher at the start; cosine schedule to 1"""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW (paper's code) or SGD with momentum 0.9"""
    lr: float = 1e-3
    """learning rate per 256 images (scaled by batch-size / 256)"""
    weight_decay: float = 0.04
    """weight decay at the start (not on biases and norms)"""
    weight_decay_end: float = 0.4
    """weight decay at the end (cosine schedule, as the paper's code)"""
    warmup_epochs: int = 10
    """linear warm-up epochs before the cosine decay"""
    jitter_strength: float = 0.5
    """colour-distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s)"""


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
# brightness, contrast, saturation, hue, grayscale), solarize.
U_CROP, U_COLOUR = 2 * TRIES + 2, 6
NU = U_CROP + 3 + U_COLOUR + 1


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
            jitter_p=0.8, gray_p=0.2, blur_p=0.0, solarize_p=0.0):
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 1]; sample i's crop box, flip, colour jitter,
    grayscale, blur and solarisation all come from its uniforms u[i] (u: (B, NU), on x's device)."""
    B, _, H, W = x.shape
    box, flip, blur, sigma, colour, solar = u.split((U_CROP, 1, 1, 1, U_COLOUR, 1), dim=1)
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
    v = torch.baddbmm(o[:, :, None], M, v.reshape(B, 3, size * size)).view(B, 3, size, size).clamp_(0, 1)  # M v + o
    solar = (solar < solarize_p)[:, :, None, None]
    return torch.where(solar & (v >= 0.5), 1 - v, v)  # RandomSolarize(threshold 128 / 255 ~ 0.5)


def crops_of(x, u, args, size):
    """Multi-crop (DINO-style recipe of the paper): global crop 1 blur p 1.0; global crop 2 blur p 0.1,
    solarise p 0.2; local crops blur p 0.5; no blur at <= 64 px. u (V, B, NU): every crop's uniforms.
    Returns (globals (2B, 3, S, S), locals (nB, 3, s, s)), crop-major: row v * B + i is crop v of image i."""
    s, blur = args.jitter_strength, size > 64
    kw = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s))
    glob = torch.cat([augment(x, u[0], size, args.global_scale, blur_p=1.0 * blur, **kw),
                      augment(x, u[1], size, args.global_scale, blur_p=0.1 * blur, solarize_p=0.2, **kw)])
    small = args.local_size or size // 2
    local = augment(x.repeat(args.num_local_crops, 1, 1, 1), u[2:].reshape(-1, NU), small, args.local_scale,
                    blur_p=0.5 * blur, **kw)
    return glob, local  # local: one call for all local crops


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


def projector(d, hidden, out, last_bn):
    """3-layer MLP with GELU (paper), optionally ending in a non-affine BatchNorm (released code; ours
    as default: it centres every output dimension over the batch, which kept ResNet-18 from
    collapsing to one point in our CPU checks). The caller L2-normalises the output."""
    layers = [nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(out, affine=False)] if last_bn else []))


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


class BAM(nn.Module):
    """Student backbone + projector; with --ema-teacher also a teacher copy that gets no gradient."""

    def __init__(self, args, image_size):
        super().__init__()
        self.backbone, d = make_backbone(args.backbone, image_size)
        self.projector = projector(d, args.proj_hidden, args.proj_dim, args.proj_last_bn)
        self.teacher = None
        if args.ema_teacher:
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                          "projector": copy.deepcopy(self.projector)}).requires_grad_(False)

    def forward(self, glob, local):
        """This rank's crops (2b and nb rows) -> (z, zt): embeddings (V*B, D) of every crop of the global
        batch by the student, and by the teacher (no gradient) or None. The backbone runs once per crop
        size; the projector sees the global batch (its BatchNorm too). In eval mode nothing couples the
        samples (BatchNorm uses running statistics), so each process embeds just the crops it is given."""
        def embed(net, x):
            h = net["backbone"](x.contiguous(memory_format=torch.channels_last))  # this rank's rows
            return F.normalize(net["projector"](gather(h, len(x) // (len(glob) // 2)) if self.training else h)
                               .float(), dim=1)

        def every_crop(net):  # (V*B, D), crop-major
            return torch.cat([embed(net, glob)] + ([embed(net, local)] if len(local) else []))
        z = every_crop({"backbone": self.backbone, "projector": self.projector})
        if self.teacher is None:
            return z, None
        with torch.no_grad():  # released code: the teacher embeds every crop, local ones too
            return z, every_crop(self.teacher)

    @torch.no_grad()
    def update_teacher(self, m):
        """teacher <- m * teacher + (1 - m) * student, parameter by parameter (EMA)."""
        student = [*self.backbone.parameters(), *self.projector.parameters()]
        teacher = [*self.teacher["backbone"].parameters(), *self.teacher["projector"].parameters()]
        torch._foreach_lerp_(teacher, student, 1 - m)

    def eval_backbone(self):
        """The backbone that is evaluated and saved: the teacher's when there is one."""
        return self.backbone if self.teacher is None else self.teacher["backbone"]


def same_image(rows, cols, B, device):
    """(rows, cols) mask, True where a crop-major query and key come from the same image."""
    return (torch.arange(rows, device=device) % B)[:, None] == (torch.arange(cols, device=device) % B)[None, :]


@torch.no_grad()
def sinkhorn(S, mask, lam, iters):
    """Balanced target: P = exp(S / lam) over the unmasked entries, then `iters` alternations of
    columns (keys) to uniform and rows (queries) to uniform. Log space, fp32: finite for small lam.
    The last step makes every row sum to 1; masked entries are exactly 0."""
    with torch.autocast(S.device.type, enabled=False):
        logP = (S.float() / lam).masked_fill(mask, float("-inf"))
        for _ in range(iters):
            logP = logP - logP.logsumexp(0, keepdim=True)  # every key receives the same mass
            logP = logP - logP.logsumexp(1, keepdim=True)  # every query sends the same mass
        return logP.exp()


def keep_top_k(P, k, G):
    """--top-k, the released code's rule: for image i, the k columns with the largest MEAN over its G
    global crops' target rows; every one of those rows keeps its own values there, renormalised to 1.
    P (G*B, K), crop-major. k = 0 (or >= K): P unchanged."""
    if not k or k >= P.shape[1]:
        return P
    idx = P.view(G, -1, P.shape[1]).mean(0).topk(k, dim=1).indices.repeat(G, 1)  # (G*B, k), shared by crops
    kept = torch.zeros_like(P).scatter_(1, idx, P.gather(1, idx))
    return kept / kept.sum(1, keepdim=True)


def bam_objective(z, zt, B, args, mask):
    """The loss of one step. z (V*B, D): student embeddings of every crop (crop-major); zt: the EMA
    teacher's embeddings of every crop, or None (one network: the student is its own teacher).
    As the released code: keys = the global crops' rows of the teacher side (student keys carry gradient);
    the Sinkhorn target runs over EVERY crop's teacher-side row against those keys, and its global rows
    are the targets. mask: same_image(V*B, G*B, B)."""
    G = 2
    source = z if zt is None else zt
    keys = source[: G * B]  # (2B, D)
    P = sinkhorn(source.detach() @ keys.detach().T, mask, args.lam, args.sinkhorn_iters)  # (V*B, 2B)
    return bam_loss(z, keys, keep_top_k(P[: G * B], args.top_k, G), B, args.tau, mask)


def bam_loss(z, keys, target, B, tau, mask=None):
    """Cross-entropy between balanced targets and source attention.
    z (V*B, D) queries of every crop (crop-major); keys (G*B, D) global-crop embeddings;
    target (G*B, G*B) Sinkhorn rows of the global crops, no gradient.
    Source: A_v = softmax(z_v K^T / tau) over the keys of OTHER images.
    loss = mean over g, v != g, i of  -sum_j P_g[i, j] log A_v[i, j].  mask: same_image(...), if prebuilt."""
    V, G = len(z) // B, len(keys) // B
    mask = same_image(len(z), len(keys), B, z.device) if mask is None else mask
    logA = F.log_softmax((z.float() @ keys.float().T / tau).masked_fill(mask, float("-inf")), dim=1)
    logA = logA.masked_fill(mask, 0.0).view(V, B, G * B)  # 0 * log 0 := 0 on masked entries
    ce = -torch.einsum("gik,vik->gv", target.view(G, B, G * B), logA) / B  # (G, V) mean over images
    return (ce.sum() - ce[:, :G].diagonal().sum()) / (G * (V - 1))  # leave out v == g


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
    if ckpt.get("method") != "bam":
        fail(f"{args.resume!r} is a checkpoint of {ckpt.get('method')!r}, not bam")
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
METHOD_LIMITS = {"num_local_crops": (0, 64), "local_size": (8, 1024), "global_scale": (1e-4, 1.0),
                 "local_scale": (1e-4, 1.0), "proj_hidden": (1, 1 << 16), "proj_dim": (1, 1 << 16),
                 "lam": (1e-4, 100.0), "tau": (1e-4, 100.0), "sinkhorn_iters": (1, 1000),
                 "top_k": (0, 10**9), "teacher_momentum": (0.0, 1.0), "lr": (1e-9, 100.0),
                 "weight_decay": (0.0, 10.0), "weight_decay_end": (0.0, 10.0),
                 "warmup_epochs": (0, 100_000), "jitter_strength": (1e-6, 10.0)}


def check_args(args):
    """Every numeric flag against LIMITS and METHOD_LIMITS (one line and exit 2 when outside)."""
    for name, (lo, hi) in {**LIMITS, **METHOD_LIMITS}.items():
        value = getattr(args, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and not (math.isfinite(v) and lo <= v <= hi):
                fail(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(args, name)
        if lo > hi:
            fail(f"--{name.replace('_', '-')} must be (min, max) with min <= max, got {lo} {hi}")


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
    x_all = data.pretrain_x.to(device)
    train_x, train_y = x_all[: len(data.train_y)], data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
    norm = lambda v: (v - mean) / std
    n_cls = len(data.classes)
    G, V = 2, 2 + args.num_local_crops  # global crops, all crops per image
    mask_vg = same_image(V * args.batch_size, G * args.batch_size, args.batch_size, device)  # built once
    probe = common.class_sorted(data.test_y, 128).to(device)  # labelled images for the attention analysis

    model = BAM(args, size).to(device).to(memory_format=torch.channels_last)
    if args.sync_bn:  # the backbones' BatchNorm over the global batch (the projector's sees it already)
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm  # same parameters and buffers, so checkpoints stay compatible
    lr = args.lr * args.batch_size / 256  # linear scaling rule
    student = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in student if p.ndim > 1]},  # weights: decayed
              {"params": [p for p in student if p.ndim <= 1], "no_decay": True}]  # biases and norms: not
    opt = (torch.optim.AdamW(groups, lr=lr) if args.optimizer == "adamw" else
           torch.optim.SGD(groups, lr=lr, momentum=0.9))
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
        run_dir = os.path.join(args.output_dir, f"bam__{args.dataset}__{args.seed}__{stamp}")
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
        print(f"bam | {args.dataset} {N} images {size}px | {device} amp={amp} | batch {args.batch_size}"
              + (f" = {world} processes x {b}" if world > 1 else "") + f" | {steps_per_epoch} steps/epoch | run dir {run_dir}")

    def kept():
        return (f"the last good checkpoint is {run_dir}/checkpoint.pt (epoch {last_good})" if last_good
                else "no checkpoint was written")

    def interrupted(*_):  # Ctrl-C: one line, where to resume from, exit status 130
        fail(f"interrupted; {kept()}" + (f"; resume with --resume {run_dir}/checkpoint.pt"
                                          if last_good else ""), status=130)
    signal.signal(signal.SIGINT, interrupted)

    def evaluate(epoch):
        """k-NN on backbone features; on two fixed global crops of the probe batch: the balanced target
        P and the source attention A, how balanced P is, its same-class mass, and the embedding spread.
        Returns (metrics, train features, test features)."""
        net = model.eval_backbone()
        train_f, test_f = [extract(net, v, norm, amp_dtype) for v in (train_x, test_x)]
        knn = common.knn_accuracy(train_f, train_y, test_f, test_y, n_cls, args.knn_k, args.knn_t)
        out = {"event": "eval", "epoch": epoch, "step": step, "knn_acc": knn}
        pg = torch.Generator(device).manual_seed(args.seed + 2)  # the same crops at every evaluation
        glob, _ = crops_of(test_x[probe], torch.rand(V, len(probe), NU, device=device, generator=pg), args, size)
        n = len(probe)
        model.eval()
        with torch.no_grad(), autocast(device, amp_dtype):
            z, zt = model(norm(glob), glob[:0])
        model.train()
        keys = z if zt is None else zt  # (2n, D)
        S, mask = keys @ keys.T, same_image(2 * n, 2 * n, n, device)
        P = sinkhorn(S, mask, args.lam, args.sinkhorn_iters)
        A = torch.softmax((z @ keys.T / args.tau).masked_fill(mask, float("-inf")), dim=1)
        y2 = test_y[probe].repeat(2)
        mass, chance = common.same_class_mass(torch.stack([P, A]), y2)
        out.update(same_class_target=mass[0].item(), same_class_source=mass[1].item(), same_class_chance=chance,
                   sinkhorn_row_dev=(P.sum(1) - 1).abs().max().item(),  # uniform: every row and column sums to 1
                   sinkhorn_col_dev=(P.sum(0) - 1).abs().max().item(),
                   embedding_std=z.std(0).mean().item(), embedding_std_uniform=1 / math.sqrt(z.shape[1]))
        order = torch.sort(y2, stable=True).indices  # both crops of each class together
        common.save_maps(os.path.join(run_dir, "figures", f"target_source_epoch{epoch:04d}.png"),
                         torch.stack([P, A])[:, order][:, :, order], y2[order])
        log(**out)
        print(" ".join(f"{k} " + (" ".join(f"{u:.3f}" for u in v) if isinstance(v, list) else
                                  f"{v:.4f}" if isinstance(v, float) else f"{v}") for k, v in out.items()))
        return out, train_f, test_f

    if ckpt is None and rank == 0:  # the other ranks go ahead and wait at the first all_gather
        vg = torch.Generator(device).manual_seed(args.seed + 1)  # a figure must not move the training RNG
        orig = train_x[:: max(1, len(train_x) // 8)][:8]  # spread over the set (folders are class-sorted)
        glob, local = crops_of(orig, torch.rand(V, len(orig), NU, device=device, generator=vg), args, size)
        pad = (size - local.shape[-1]) // 2
        local = F.pad(local, [pad, size - local.shape[-1] - pad] * 2, value=1.0)  # centred on white
        grid = torch.cat([orig.float() / 255, glob, local])  # originals, 2 global rows, local rows (padded)
        up = max(1, 96 // size)  # enlarge small images so a person can see the augmentation
        torchvision.utils.save_image(grid.repeat_interleave(up, 2).repeat_interleave(up, 3),
                                     os.path.join(run_dir, "figures", "views.png"), nrow=8)
        history["init"] = {k: v for k, v in evaluate(0)[0].items() if k not in ("event", "epoch", "step")}

    model.train()
    while epoch < args.epochs:
        t0, loss_sum = time.time(), torch.zeros((), device=device)
        bad_run = torch.zeros((), dtype=torch.long, device=device)  # consecutive non-finite losses
        bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first fatal step, -1: none
        patience = 10 if amp == "fp16" else 1  # fp16: the GradScaler skips steps before we give up
        perm = torch.randperm(N, device=device, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]  # the global batch, as on every rank
            u = torch.rand(V, args.batch_size, NU, device=device, generator=g)  # and its crops' randomness
            cos = 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))  # 1 -> 0 over the run
            for group in opt.param_groups:  # schedules are functions of the step (resumable)
                group["lr"] = (lr * (step + 1) / warmup_steps if step < warmup_steps else
                               lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) /
                                                        max(1, total_steps - warmup_steps))))
                group["weight_decay"] = 0.0 if group.get("no_decay") else (
                    args.weight_decay_end + (args.weight_decay - args.weight_decay_end) * cos)
            glob, local = crops_of(x_all[idx[shard]], u[:, shard], args, size)  # this rank's (2b, ...), (nb, ...)
            with autocast(device, amp_dtype):
                z, zt = train_model(norm(glob), norm(local))  # (V*B, D) student, teacher or None
            loss = bam_objective(z, zt, args.batch_size, args, mask_vg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if model.teacher is not None:  # momentum 0.995 -> 1, cosine (released scripts)
                m = 1 - (1 - args.teacher_momentum) * cos
                model.update_teacher(m)
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
                    print(f"epoch {epoch + 1}/{args.epochs} step {step} loss {loss.item():.4f} "
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
            log(event="epoch", epoch=epoch, step=step, loss=(loss_sum / steps_per_epoch).item(), lr=opt.param_groups[0]["lr"],
                seconds=seconds, images_per_sec=steps_per_epoch * args.batch_size / seconds)
            if args.eval_every and epoch % args.eval_every == 0 and epoch < args.epochs:
                evaluate(epoch)
            state = {
                "method": "bam", "args": asdict(args), "model": model.state_dict(),
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
    save_atomic(os.path.join(run_dir, "backbone.pt"), lambda f: torch.save(model.eval_backbone().state_dict(), f))
    summary = {"knn_acc": final["knn_acc"], "linear_acc": linear, "init": history.get("init"),
               "epochs": args.epochs, "images_per_sec": history["train_images"] / max(history["train_seconds"], 1e-9),
               "normalization": {"mean": data.mean, "std": data.std},
               **{k: v for k, v in final.items() if k not in ("event", "epoch", "step", "knn_acc")}}
    log(event="final", **summary)
    save_atomic(os.path.join(run_dir, "summary.json"), lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"done: knn_acc {summary['knn_acc']:.4f} linear_acc {linear:.4f} "
          f"(random init: knn_acc {history['init']['knn_acc']:.4f}) -> {run_dir}")
