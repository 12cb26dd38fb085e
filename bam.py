"""BAM: unsupervised representation learning by balanced self-attention matching.

Daniel Shalam, Simon Korman, "Unsupervised Representation Learning by Balanced Self Attention
Matching", ECCV 2024, arXiv:2408.02014.

Instead of matching the features of two views, BAM matches their self-attention vectors: each
crop's distribution of similarities to the OTHER images of the batch. Every image gets 2 global
crops and a few small local crops. The target is the attention of a global crop made balanced
(entropy-regularised self optimal transport: a few Sinkhorn iterations on exp(S / lambda)) and
taken without gradient; the source is the plain softmax attention (temperature tau) of every other
crop of the same image; the loss is their cross-entropy. No negatives, memory bank or asymmetric
encoder are needed; an EMA teacher (as in the released scripts) is one flag away. Only the
backbone is kept for evaluation.

    python bam.py --batch-size 512 --dataset cifar10
    python bam.py --dataset synthetic --epochs 1        # offline smoke run
    torchrun --nproc-per-node 8 bam.py --batch-size 4096 --sync-bn   # the batch is global
"""

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
from typing import Literal, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro

import common

METHOD = "bam"  # names the run directories; a checkpoint of another method is refused


@dataclasses.dataclass
class Args:
    # ---- generic: identical in deepfusion.py, transfusion.py and bam.py
    dataset: Literal["cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder",
                     "synthetic"] = "cifar10"
    """dataset; imagefolder reads DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*"""
    data_dir: str = "data"
    """where datasets are downloaded to / read from"""
    download: bool = True
    """download torchvision datasets that are missing from --data-dir"""
    cache: bool = True
    """keep decoded image folders in a cache file beside them (rebuilt when the folder changes)"""
    data_on: Literal["auto", "device", "host"] = "auto"
    """where the uint8 images live: device memory, or pinned host memory copied per batch (auto:
    the device if they fit)"""
    image_size: Optional[int] = None
    """resize images to this side length (default: native size; 32 for image folders)"""
    backbone: Literal["resnet18", "resnet50"] = "resnet18"
    """torchvision ResNet; images <= 64 px get the CIFAR stem (3x3 conv, no max-pool)"""
    num_samples: Optional[int] = None
    """use a seeded, class-balanced subset of N training images (default: all)"""
    batch_size: int = 512
    """images per optimisation step, over all processes (each contributes several views)"""
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
    """under torchrun: backbone BatchNorm statistics over the global batch, not each rank's shard"""
    # ---- method: BAM
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
    """non-affine BatchNorm on the projector output (released code's MlpProjHead; see README:
    without it ResNet-18 collapsed in our checks)"""
    lam: float = 0.05
    """entropic regularisation lambda of the Sinkhorn target exp(S / lambda)"""
    tau: float = 0.1
    """softmax temperature of the source attention"""
    sinkhorn_iters: int = 3
    """Sinkhorn iterations (each: key marginals, then query marginals)"""
    top_k: int = 0
    """keep k target columns per image, those largest on average over its global crops (released
    code, --top_k_sink); 0 = off, as in the paper"""
    ema_teacher: bool = False
    """EMA teacher embeds every crop, gives targets and keys (released scripts); off: one network"""
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


# ================================================================================== the method: BAM


def projector(d, hidden, out, last_bn):
    """3-layer MLP with GELU (paper), optionally ending in a non-affine BatchNorm (released code;
    ours as default: it centres every output dimension over the batch, which kept ResNet-18 from
    collapsing to one point in our CPU checks). The caller L2-normalises the output."""
    layers = [nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
              nn.Linear(hidden, out)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(out, affine=False)] if last_bn else []))


class BAM(nn.Module):
    """Student backbone + projector; with --ema-teacher also a teacher copy without gradient."""

    def __init__(self, args, image_size):
        super().__init__()
        self.backbone, d = make_backbone(args.backbone, image_size)
        self.projector = projector(d, args.proj_hidden, args.proj_dim, args.proj_last_bn)
        self.teacher = None
        if args.ema_teacher:
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                          "projector": copy.deepcopy(self.projector)})
            self.teacher.requires_grad_(False)

    def forward(self, glob, local):
        """This rank's crops (2b and nb rows) -> (z, zt): embeddings (V*B, D) of every crop of the
        global batch by the student, and by the teacher (no gradient) or None. The backbone runs
        once per crop size; the projector sees the global batch (its BatchNorm too). In eval mode
        nothing couples the samples, so each process embeds just the crops it is given."""
        def embed(net, x):
            h = net["backbone"](x.contiguous(memory_format=torch.channels_last))  # this rank's rows
            h = gather(h, len(x) // (len(glob) // 2)) if self.training else h
            return F.normalize(net["projector"](h).float(), dim=1)

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
    image = lambda n: torch.arange(n, device=device) % B
    return image(rows)[:, None] == image(cols)[None, :]


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
    """--top-k, the released code's rule: for image i, the k columns with the largest MEAN over its
    G global crops' target rows; each of those rows keeps its own values there, renormalised to 1.
    P (G*B, K), crop-major. k = 0 (or >= K): P unchanged."""
    if not k or k >= P.shape[1]:
        return P
    idx = P.view(G, -1, P.shape[1]).mean(0).topk(k, dim=1).indices.repeat(G, 1)  # (G*B, k)
    kept = torch.zeros_like(P).scatter_(1, idx, P.gather(1, idx))
    return kept / kept.sum(1, keepdim=True)


def bam_objective(z, zt, B, args, mask):
    """The loss of one step. z (V*B, D): student embeddings of every crop (crop-major); zt: the EMA
    teacher's embeddings of every crop, or None (one network: the student is its own teacher).
    As the released code: keys = the global crops' rows of the teacher side (student keys carry
    gradient); the Sinkhorn target runs over EVERY crop's teacher-side row against those keys, and
    its global rows are the targets. mask: same_image(V*B, G*B, B)."""
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
    """Multi-crop (DINO-style recipe of the paper): global crop 1 blur p 1.0; global crop 2 blur
    p 0.1, solarise p 0.2; local crops blur p 0.5; no blur at <= 64 px. u (V, B, NU): every crop's
    uniforms. Returns (globals (2B, 3, S, S), locals (nB, 3, s, s)), crop-major: row v * B + i is
    crop v of image i."""
    s, blur, gs = args.jitter_strength, size > 64, args.global_scale
    kw = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s))
    glob = torch.cat([augment(x, u[0], size, gs, blur_p=1.0 * blur, **kw),
                      augment(x, u[1], size, gs, blur_p=0.1 * blur, solarize_p=0.2, **kw)])
    local = augment(x.repeat(args.num_local_crops, 1, 1, 1), u[2:].reshape(-1, NU),
                    args.local_size or size // 2, args.local_scale, blur_p=0.5 * blur, **kw)
    return glob, local  # local: one call for all local crops


# Every numeric flag of the method, its accepted range (both ends included); see check_args.
METHOD_LIMITS = {"num_local_crops": (0, 64), "local_size": (8, 1024),
                 "global_scale": (1e-4, 1.0), "local_scale": (1e-4, 1.0),
                 "proj_hidden": (1, 1 << 16), "proj_dim": (1, 1 << 16),
                 "lam": (1e-4, 100.0), "tau": (1e-4, 100.0), "sinkhorn_iters": (1, 1000),
                 "top_k": (0, 10**9), "teacher_momentum": (0.0, 1.0), "lr": (1e-9, 100.0),
                 "weight_decay": (0.0, 10.0), "weight_decay_end": (0.0, 10.0),
                 "warmup_epochs": (0, 100_000), "jitter_strength": (1e-6, 10.0)}


# ======================================================================== shared plumbing: BEGIN
# Identical in deepfusion.py, transfusion.py and bam.py (tests/test_shared.py checks it). Nothing
# here is the method: batched augmentation, the ResNet, torchrun, argument checks, run directory,
# checkpoints. A reader learning the method may skip to `if __name__ == "__main__":` at the end.
#
# Augmentation. torchvision's SimCLR pipeline is RandomResizedCrop -> HorizontalFlip ->
# ColorJitter -> Grayscale -> GaussianBlur (-> Solarize). Every sample draws its own parameters,
# but the work is a few batched tensor ops:
# * crop, resize, flip and blur are linear along each image axis: per sample one (size x H) matrix
#   per axis, and the view is Ry @ x @ Rx^T. Resizing uses a triangle filter widened when
#   downscaling, i.e. antialiased like PIL's.
# * brightness, saturation, hue (a rotation in YIQ space, the usual GPU approximation of the HSV
#   hue shift) and grayscale are 3x3 colour matrices, contrast blends with the mean grey level: one
#   per-sample affine map x -> M x + o (colour_matrices). torchvision draws a random order of the
#   four jitter ops; in this linear model they commute, so no order is drawn (only torchvision's
#   clamping after every op depends on it).
# Differences from torchvision: boxes are not rounded to whole pixels; one clamp to [0, 1] at the
# end; blur before the colour ops (commutes with them up to the clamping); hue is the YIQ rotation.
# Randomness: a sample's row u of NU uniforms, drawn for the whole global batch at once, so a view
# depends on its image and its row alone and a rank that augments its shard makes the views one
# process would. Columns: crop (TRIES area tries, TRIES log-aspect tries, y, x), flip, blur, blur
# sigma, colour (jitter on, brightness, contrast, saturation, hue, grayscale), solarize.

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
TRIES = 10  # RandomResizedCrop's attempts at a box that fits
U_CROP, U_COLOUR = 2 * TRIES + 2, 6
NU = U_CROP + 3 + U_COLOUR + 1


def colour_basis():
    """(3, 3, 3): 1 g^T (every channel := grey level g^T x), I - 1 g^T (the chroma of x) and the
    chroma rotated by 90 degrees in the (I, Q) plane: T^-1 [[0, 0, 0], [0, 0, -1], [0, 1, 0]] T."""
    T = torch.tensor(RGB2YIQ, dtype=torch.float64)
    grey = torch.ones(3, 1, dtype=torch.float64) * T[:1]
    rot = torch.tensor([[0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64)
    return torch.stack([grey, torch.eye(3, dtype=torch.float64) - grey,
                        torch.linalg.inv(T) @ rot @ T]).float()


COLOUR_BASIS = colour_basis()


def crop_boxes(u, scale, ratio):
    """RandomResizedCrop boxes from u (B, 2T + 2), fractions of the side: (y0, x0, h, w), each (B,).
    As torchvision: area ~ U(scale), log aspect ~ U(log ratio); the first of T tries that fits,
    else the whole image."""
    T = (u.shape[1] - 2) // 2
    area = scale[0] + (scale[1] - scale[0]) * u[:, :T]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, T:2 * T]
    w, h = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)  # index of the first fitting try (0 if none fits)
    w, h = [torch.where(fits.any(1), v.gather(1, first)[:, 0], 1.0) for v in (w, h)]
    return u[:, -2] * (1 - h), u[:, -1] * (1 - w), h, w


def resample_matrix(start, length, n_in, n_out, flip=None):
    """Per-sample (n_out x n_in) matrices that resample [start, start + length) (fractions of the
    side) onto n_out pixels with a triangle filter of width max(1, input px per output px); where
    flip (B,) is true, in mirrored order."""
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
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1)
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
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 1]; sample i's crop box, flip, colour
    jitter, grayscale, blur and solarisation all come from its uniforms u[i] (u: (B, NU))."""
    B, _, H, W = x.shape
    box, flip, blur, sigma, colour, solar = u.split((U_CROP, 1, 1, 1, U_COLOUR, 1), dim=1)
    y0, x0, h, w = crop_boxes(box, scale, ratio)
    Ry, Rx = resample_matrix(y0, h, H, size), resample_matrix(x0, w, W, size, flip[:, 0] < flip_p)
    if blur_p > 0:  # one sigma ~ U(0.1, 2) per sample for both axes, as torchvision's GaussianBlur
        Gb, blur = blur_matrix(0.1 + 1.9 * sigma[:, 0], size), blur[:, :, None] < blur_p
        Ry, Rx = torch.where(blur, Gb @ Ry, Ry), torch.where(blur, Gb @ Rx, Rx)
    # columns, then rows, in the layouts that need no copies (fastest of four measured on one CPU
    # thread); 1 / 255 folded into Rx
    v = torch.bmm(x.reshape(B, 3 * H, W).float(), Rx.transpose(1, 2).contiguous().div_(255))
    v = torch.matmul(Ry[:, None], v.view(B, 3, H, size)).view(B, 3, size * size)
    M, o = colour_matrices(v.view(B, 3, size, size), colour, jitter, jitter_p, gray_p)
    v = torch.baddbmm(o[:, :, None], M, v).view(B, 3, size, size).clamp_(0, 1)  # M v + o
    if solarize_p > 0:  # RandomSolarize(threshold 128 / 255 ~ 0.5)
        v = torch.where((solar < solarize_p)[:, :, None, None] & (v >= 0.5), 1 - v, v)
    return v


def make_backbone(name, image_size):
    """torchvision ResNet with fc = Identity; CIFAR stem for small images. -> (net, feature dim)."""
    net = getattr(torchvision.models, name)()
    if image_size <= 64:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
    return net, dim


# torch 2.14 deprecates torch.distributed.nn.functional for a private module; it is still the
# public, autograd-aware form of the collectives (torch >= 2.4), so that warning is silenced
warnings.filterwarnings("ignore", "torch.distributed.nn.functional", FutureWarning)


def gather(h, views):
    """Rows of every rank in the order one process with the whole batch has them, view-major over
    the global batch: (views * b, D) on each of W ranks -> (views * W * b, D). Autograd-aware: each
    rank computes the same loss over the global batch, so a rank's rows receive the sum of W equal
    gradients, which DDP's averaging divides back: the step is the one-process step."""
    if not (dist.is_available() and dist.is_initialized()):
        return h
    parts = torch.distributed.nn.functional.all_gather(h)  # W x (views * b, D)
    return torch.stack(parts).unflatten(1, (views, -1)).transpose(0, 1).flatten(0, 2)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the global batch's training statistics over all ranks (--sync-bn), through
    autograd-aware all_reduce: nn.SyncBatchNorm's job, which refuses CPU tensors (untestable here).
    Same state_dict as BatchNorm2d; in eval mode, or in one process, it is BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        sum_ = lambda t: torch.distributed.nn.functional.all_reduce(t.sum((0, 2, 3)))  # all ranks
        n, xf = x.numel() // x.shape[1] * dist.get_world_size(), x.float()
        mean = sum_(xf) / n
        var = sum_((xf - mean[:, None, None]) ** 2) / n  # two passes: as exact as one process's
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm2d
        scale = self.weight * (var + self.eps).rsqrt()
        return (xf * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


def fail(msg, status=2, every_rank=False):
    """One line on stderr and exit: 2 for bad input, 1 for a failed run. Under torchrun every rank
    meets the same error and rank 0 prints it; every_rank: an error of this rank alone."""
    if every_rank or int(os.environ.get("RANK", 0)) == 0:
        print("error: " + " ".join(str(msg).split()), file=sys.stderr)
    raise SystemExit(status)


# Every generic numeric flag's accepted range, both ends included (the method's: METHOD_LIMITS).
# Upper bounds keep a typo from exhausting memory or overflowing.
LIMITS = {"image_size": (8, 1024), "num_samples": (1, 10**9), "batch_size": (2, 1 << 16),
          "epochs": (1, 100_000), "seed": (0, 2**32 - 3), "eval_every": (0, 100_000),
          "linear_epochs": (1, 100_000), "knn_k": (1, 100_000), "knn_t": (1e-4, 100.0),
          "log_every": (1, 10**9), "stop_epoch": (1, 100_000)}
CHECKPOINT_KEYS = {"method", "args", "model", "optimizer", "scaler", "epoch", "step", "history",
                   "rng"}


def check_args(args):
    """Every numeric flag finite and inside its range; (min, max) pairs ordered. Else exit 2."""
    for name, (lo, hi) in {**LIMITS, **METHOD_LIMITS}.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and not (math.isfinite(v) and lo <= v <= hi):
                fail(f"{flag} must be in [{lo}, {hi}], got {v}")
        if isinstance(value, tuple) and value[0] > value[1]:
            fail(f"{flag} must be (min, max) with min <= max, got {value[0]} {value[1]}")


def parse_args():
    """tyro CLI whose errors are one line. With --resume the checkpoint's arguments are the
    defaults, so only the flags given now change anything. -> (args, checkpoint or None)."""
    def cli(default=None):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return tyro.cli(Args, default=default)
        except SystemExit as e:
            if e.code:  # tyro draws a box; keep its first sentence on one line
                text = " ".join(re.sub(r"[\u2500-\u257f]", " ", err.getvalue()).split())
                fail(text.split(" For full helptext")[0])
            raise

    args, ckpt = cli(), None
    if args.resume is not None:
        try:
            ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
            assert isinstance(ckpt, dict) and "args" in ckpt and "model" in ckpt
        except FileNotFoundError:
            fail(f"checkpoint {args.resume!r} does not exist")
        except Exception as e:
            fail(f"cannot read checkpoint {args.resume!r} (truncated, or not written by this "
                 f"script): {type(e).__name__} {(str(e).strip().splitlines() or [''])[0][:160]}")
        if ckpt.get("method") != METHOD:
            fail(f"{args.resume!r} is a checkpoint of {ckpt.get('method')!r}, not {METHOD}")
        missing = sorted(CHECKPOINT_KEYS - set(ckpt))
        unknown = [f"--{u.replace('_', '-')}" for u in sorted(
            set(ckpt["args"]) - {f.name for f in dataclasses.fields(Args)})]
        if missing or unknown:
            fail(f"checkpoint {args.resume!r} was written by another version of this script: "
                 + (f"it lacks {', '.join(missing)}" if missing else
                    f"unknown argument(s) {', '.join(unknown)}"))
        # one-off flags (--stop-epoch) are not inherited
        args = cli(Args(**{**ckpt["args"], "resume": args.resume, "stop_epoch": None}))
        for name in ("dataset", "data_dir", "image_size", "num_samples", "batch_size"):
            if getattr(args, name) != ckpt["args"][name] and int(os.environ.get("RANK", 0)) == 0:
                print(f"note: resuming with --{name.replace('_', '-')} {getattr(args, name)}; "
                      f"the run so far used {ckpt['args'][name]}", file=sys.stderr)
    check_args(args)
    return args, ckpt


def keep_freed_memory():
    """CPU with glibc: keep freed memory for reuse instead of returning it to the OS. By default
    glibc unmaps the few-MB tensors of a step when freed, and the next step page-faults them in
    again (measured: the batched augmentation ran at half speed on CPU)."""
    with contextlib.suppress(OSError):  # not glibc (macOS, Windows, musl): nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def save_atomic(path, write):
    """write(file) into path + ".tmp", fsync, rename, fsync the directory: a crash never leaves a
    truncated file. A failed write (disk full) ends the run in one line, the old file intact."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        fail(f"could not write {path}: {e}; its previous version (if any) is intact", status=1)


class Run:
    """Everything around the training step: torchrun, device, AMP, data, run directory, progress
    lines, metrics.jsonl, checkpoints and resume, the non-finite watch, Ctrl-C, evaluation. Only
    rank 0 writes, logs and evaluates."""

    def __init__(self, args, ckpt):
        self.args, self.ckpt, B = args, ckpt, args.batch_size
        # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK. --batch-size is the global batch: each rank
        # draws the global batch and its randomness, then augments and encodes its shard of b images
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if B % self.world:
            fail(f"--batch-size {B} (the global batch) must be divisible by the {self.world} "
                 "processes")
        b = B // self.world
        self.shard = slice(self.rank * b, (self.rank + 1) * b)  # this rank's images of a batch
        cuda = torch.cuda.is_available()
        dev = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
        if dev.type == "cuda" and not cuda:
            fail("--device cuda but no CUDA device is available")
        if dev.type == "cpu":
            keep_freed_memory()
        if self.world > 1:  # NCCL on GPUs, gloo on CPU; 1 h: the others wait while rank 0 evaluates
            if dev.type == "cuda":
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
        self.device = dev
        self.amp = {"auto": "off" if dev.type == "cpu" else
                    "bf16" if torch.cuda.is_bf16_supported() else "fp16"}.get(args.amp, args.amp)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[self.amp]
        torch.manual_seed(args.seed)  # the same on every rank: initial weights, order, views
        self.g = torch.Generator(dev).manual_seed(args.seed)  # data order and augmentation
        try:  # rank 0 loads (downloads) first, then the others
            data = common.load_on_ranks(self.rank, self.world, args.dataset, args.data_dir,
                                        args.download, args.image_size, args.num_samples,
                                        seed=args.seed, cache=args.cache)
        except common.UsageError as e:  # own: this rank alone failed (e.g. --data-dir not shared)
            fail(e, every_rank=getattr(e, "own", False))
        self.N, self.size, self.data = len(data.pretrain_x), data.pretrain_x.shape[-1], data
        if B > self.N:
            fail(f"--batch-size {B} is larger than the training set ({self.N} images)")
        self.steps_per_epoch = self.N // B  # the last partial batch is dropped
        self.x, self.data_on = common.place(data.pretrain_x, dev, args.data_on)  # uint8 images
        self.train_x, self.train_y = self.x[: len(data.train_y)], data.train_y.to(dev)
        self.test_x = common.place(data.test_x, dev, self.data_on)[0]
        self.test_y = data.test_y.to(dev)
        data.pretrain_x = data.train_x = data.test_x = None  # placed above (pinning copies them)
        mean, std = [torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (data.mean, data.std)]
        self.norm = lambda v: (v - mean) / std

    def autocast(self):  # bf16 or fp16 (--amp), or fp32 with autocast off
        return torch.autocast(self.device.type, self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def images(self, idx, x=None):  # uint8 images x[idx] (default: the training set) on the device
        return common.batch(self.x if x is None else x, idx, self.device)

    def rand(self, *shape, seed=1):  # uniforms (*shape, NU) for figures: not the training RNG
        g = torch.Generator(self.device).manual_seed(self.args.seed + seed)
        return torch.rand(*shape, NU, device=self.device, generator=g)

    def figure(self, name):
        return os.path.join(self.dir, "figures", name)

    def start(self, model, opt, scaler, backbone, analyse):
        """Resume (weights, optimizer, scaler, counters, RNG) or make a run directory. backbone: the
        module evaluated and saved; analyse(epoch, test features) -> the method's own metrics.
        Returns the module to train: under torchrun in DDP, with --compile compiled."""
        a, ckpt = self.args, self.ckpt
        self.model, self.opt, self.scaler, self.backbone, self.analyse = (
            model, opt, scaler, backbone, analyse)
        if a.sync_bn:  # the backbone's BatchNorm over the global batch (heads see it already)
            for m in model.modules():
                if type(m) is nn.BatchNorm2d:
                    m.__class__ = GlobalBatchNorm  # same parameters and buffers
        self.epoch, self.step, self.history = 0, 0, {"train_seconds": 0.0, "train_images": 0}
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                fail(f"checkpoint {a.resume!r} does not match this model: {str(e).splitlines()[0]}")
            scaler.load_state_dict(ckpt["scaler"])
            self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            self.g.set_state(ckpt["rng"]["data"].to(self.g.get_state().device))
            if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
            self.dir = os.path.dirname(os.path.abspath(a.resume))
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.dir = os.path.join(a.output_dir, f"{METHOD}__{a.dataset}__{a.seed}__{stamp}")
            while os.path.exists(self.dir):
                self.dir += "_"
        self.last_good, self.fresh = self.epoch, ckpt is None and self.rank == 0
        if self.rank == 0:
            self.make_run_dir()
        signal.signal(signal.SIGINT, lambda *_: fail(  # Ctrl-C: one line, how to resume, exit 130
            f"interrupted; {self.kept()}" + (f"; resume with --resume {self.dir}/checkpoint.pt"
                                              if self.last_good else ""), status=130))
        # DDP averages gradients over ranks (and starts every rank from rank 0's weights)
        net = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        return torch.compile(net) if a.compile else net

    def make_run_dir(self):  # args.json (with every earlier part of a resumed run), metrics.jsonl
        try:
            os.makedirs(os.path.join(self.dir, "figures"), exist_ok=True)
            for name in ("checkpoint.pt", "backbone.pt", "summary.json"):  # left by a killed run
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.dir, name + ".tmp"))
            path, earlier = os.path.join(self.dir, "args.json"), []
            if self.ckpt is not None:
                with contextlib.suppress(OSError, ValueError), open(path) as f:
                    old = json.load(f)
                    earlier = old.pop("earlier", []) + [{**old, "until_epoch": self.epoch}]
            with open(path, "w") as f:
                json.dump({**dataclasses.asdict(self.args), "earlier": earlier}, f, indent=2)
            self.metrics = open(os.path.join(self.dir, "metrics.jsonl"), "a")
        except OSError as e:
            fail(f"cannot write the run directory {self.dir!r}: {e.strerror or e}")
        a, W = self.args, self.world
        shards = f" = {W} processes x {a.batch_size // W}" if W > 1 else ""
        print(f"{METHOD} | {a.dataset} {self.N} images {self.size}px on {self.data_on} | "
              f"{self.device} amp={self.amp} | batch {a.batch_size}{shards} | "
              f"{self.steps_per_epoch} steps/epoch | run dir {self.dir}")

    def log(self, **kv):
        self.metrics.write(json.dumps(kv) + "\n")
        self.metrics.flush()

    def kept(self):
        return (f"the last good checkpoint is {self.dir}/checkpoint.pt (epoch {self.last_good})"
                if self.last_good else "no checkpoint was written")

    def batches(self, views):
        """One epoch of global batches, the same on every rank: (indices (B,), their views' uniforms
        (views, B, NU)). Resets the epoch's sums and the non-finite watch."""
        B, dev = self.args.batch_size, self.device
        self.t0, self.i, self.sums = time.time(), 0, {}
        self.bad_run = torch.zeros((), dtype=torch.long, device=dev)  # non-finite losses in a row
        self.bad_step = torch.full((), -1, dtype=torch.long, device=dev)  # first fatal step or -1
        perm = torch.randperm(self.N, device=dev, generator=self.g)
        for i in range(self.steps_per_epoch):
            yield perm[i * B:(i + 1) * B], torch.rand(views, B, NU, device=dev, generator=self.g)

    def step_done(self, loss, **stats):
        """After each step: epoch sums and the non-finite watch, on the device; every --log-every
        steps a progress line (the loop's only host syncs). fp16: the GradScaler skips steps with a
        non-finite loss, so the run stops after 10 in a row."""
        for k, v in {"loss": loss, **stats}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.bad_run = torch.where(torch.isfinite(loss.detach()), 0, self.bad_run + 1)
        fatal = (self.bad_step < 0) & (self.bad_run >= (10 if self.amp == "fp16" else 1))
        self.bad_step = torch.where(fatal, self.step + 1, self.bad_step)
        self.step, self.i, a = self.step + 1, self.i + 1, self.args
        if self.step % a.log_every and self.i < self.steps_per_epoch:
            return
        if self.bad_step.item() >= 0:  # the same on every rank, so all of them stop here
            fail(f"non-finite loss at step {self.bad_step.item()} (epoch {self.epoch + 1}); "
                 f"stopping: {self.kept()}", status=1)
        if self.rank == 0:
            ips = self.i * a.batch_size / (time.time() - self.t0)
            eta = (a.epochs * self.steps_per_epoch - self.step) * a.batch_size / ips / 60
            means = "".join(f"{k} {(v / self.i).item():.4f} " for k, v in self.sums.items()
                            if k != "loss")
            lr = self.opt.param_groups[0]["lr"]
            print(f"epoch {self.epoch + 1}/{a.epochs} step {self.step} loss {loss.item():.4f} "
                  f"{means}lr {lr:.4g} {ips:.0f} img/s eta {eta:.1f} min")

    def epoch_done(self):
        """Non-finite weights check, the epoch's record, evaluation when due, checkpoint,
        --stop-epoch."""
        a, steps = self.args, self.steps_per_epoch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self.t0
        self.history["train_seconds"] += seconds
        self.history["train_images"] += steps * a.batch_size
        self.epoch += 1
        bad = [k for k, v in self.model.state_dict().items()
               if v.is_floating_point() and not v.isfinite().all()]
        if bad:  # a blown-up last update can leave NaN weights after a finite loss; DDP: all ranks
            fail(f"non-finite weights after epoch {self.epoch} ({len(bad)} tensors, e.g. {bad[0]});"
                 f" stopping: {self.kept()}", status=1)
        if self.rank == 0:
            self.log(event="epoch", epoch=self.epoch, step=self.step,
                     **{k: (v / steps).item() for k, v in self.sums.items()},
                     lr=self.opt.param_groups[0]["lr"], seconds=seconds,
                     images_per_sec=steps * a.batch_size / seconds)
            if a.eval_every and self.epoch % a.eval_every == 0 and self.epoch < a.epochs:
                self.evaluate(self.epoch)
            rng = {"torch": torch.get_rng_state(), "data": self.g.get_state().cpu(),
                   "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}
            state = {"method": METHOD, "args": dataclasses.asdict(a),
                     "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "scaler": self.scaler.state_dict(),
                     "epoch": self.epoch, "step": self.step, "history": self.history, "rng": rng}
            save_atomic(os.path.join(self.dir, "checkpoint.pt"), lambda f: torch.save(state, f))
            self.last_good = self.epoch
        if a.stop_epoch is not None and a.stop_epoch <= self.epoch < a.epochs:
            if self.rank == 0:
                print(f"stopped after epoch {self.epoch} (--stop-epoch); resume with "
                      f"--resume {self.dir}/checkpoint.pt")
            raise SystemExit(0)

    def evaluate(self, epoch):
        """k-NN on backbone features and the method's own analysis; logged and printed."""
        ex = lambda x: common.extract(self.backbone, x, self.norm, self.device, self.amp_dtype)
        self.feats = ex(self.train_x), ex(self.test_x)  # kept for the final linear probe
        knn = common.knn_accuracy(self.feats[0], self.train_y, self.feats[1], self.test_y,
                                  len(self.data.classes), self.args.knn_k, self.args.knn_t)
        out = {"event": "eval", "epoch": epoch, "step": self.step, "knn_acc": knn,
               **self.analyse(epoch, self.feats[1])}
        self.log(**out)
        fmt = lambda v: (" ".join(f"{u:.3f}" for u in v) if isinstance(v, list) else
                         f"{v:.4f}" if isinstance(v, float) else f"{v}")
        print(" ".join(f"{k} {fmt(v)}" for k, v in out.items()))
        if epoch == 0:
            self.history["init"] = {k: out[k] for k in list(out)[3:]}  # all but event, epoch, step
        return out

    def finish(self):
        """Rank 0: final k-NN and analysis, the linear probe, backbone.pt and summary.json."""
        if self.rank > 0:
            raise SystemExit(0)  # training is done; rank 0 evaluates alone
        a, h, d, final = self.args, self.history, self.data, self.evaluate(self.args.epochs)
        linear = common.linear_probe(self.feats[0], self.train_y, self.feats[1], self.test_y,
                                     len(self.data.classes), a.linear_epochs, a.seed)
        save_atomic(os.path.join(self.dir, "backbone.pt"),
                    lambda f: torch.save(self.backbone.state_dict(), f))
        summary = {"knn_acc": final["knn_acc"], "linear_acc": linear, "init": h.get("init"),
                   "epochs": a.epochs, "normalization": {"mean": d.mean, "std": d.std},
                   "images_per_sec": h["train_images"] / max(h["train_seconds"], 1e-9),
                   **{k: final[k] for k in list(final)[4:]}}  # the method's analysis
        self.log(event="final", **summary)
        save_atomic(os.path.join(self.dir, "summary.json"),
                    lambda f: f.write(json.dumps(summary, indent=2).encode()))
        print(f"done: knn_acc {summary['knn_acc']:.4f} linear_acc {linear:.4f} (random init: "
              f"knn_acc {h['init']['knn_acc']:.4f}) -> {self.dir}")
# ========================================================================== shared plumbing: END



if __name__ == "__main__":
    args, ckpt = parse_args()
    run = Run(args, ckpt)  # torchrun, device, AMP, seed, data (see the shared plumbing)
    size, norm, B = run.size, run.norm, args.batch_size
    G, V = 2, 2 + args.num_local_crops  # global crops, all crops per image
    model = BAM(args, size).to(run.device, memory_format=torch.channels_last)
    student = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in student if p.ndim > 1]},  # weights: decayed
              {"params": [p for p in student if p.ndim <= 1], "no_decay": True}]  # biases, norms
    opt = (torch.optim.AdamW(groups, lr=args.lr) if args.optimizer == "adamw" else
           torch.optim.SGD(groups, lr=args.lr, momentum=0.9))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == "fp16")  # fp16 only
    total, warmup = args.epochs * run.steps_per_epoch, args.warmup_epochs * run.steps_per_epoch

    def get_lr(step):  # linear warm-up, then cosine decay to 0; linear scaling: lr x batch / 256
        peak = args.lr * args.batch_size / 256
        if step < warmup:
            return peak * (step + 1) / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    def get_cos(step):  # 1 -> 0 over the run: weight decay and teacher momentum (released code)
        return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))

    mask = same_image(V * B, G * B, B, run.device)  # built once
    probe = common.class_sorted(run.test_y, 128)  # labelled images for the attention analysis

    def analyse(epoch, test_f):
        """On two fixed global crops of the probe images: the balanced target P and the source
        attention A, how balanced P is, its same-class mass, and the embedding spread."""
        u = run.rand(V, len(probe), seed=2)  # the same crops at every evaluation
        glob, _ = crops_of(run.images(probe, run.test_x), u, args, size)
        n = len(probe)
        model.eval()
        with torch.no_grad(), run.autocast():
            z, zt = model(norm(glob), glob[:0])
        model.train()
        keys = z if zt is None else zt  # (2n, D)
        S, m = keys @ keys.T, same_image(2 * n, 2 * n, n, run.device)
        P = sinkhorn(S, m, args.lam, args.sinkhorn_iters)
        A = torch.softmax((z @ keys.T / args.tau).masked_fill(m, float("-inf")), dim=1)
        y2 = run.test_y[probe].repeat(2)
        mass, chance = common.same_class_mass(torch.stack([P, A]), y2)
        order = torch.sort(y2, stable=True).indices  # both crops of each class together
        common.save_maps(run.figure(f"target_source_epoch{epoch:04d}.png"),
                         torch.stack([P, A])[:, order][:, :, order], y2[order])
        return {"same_class_target": mass[0].item(), "same_class_source": mass[1].item(),
                "same_class_chance": chance,  # a balanced P: every row and column sums to 1
                "sinkhorn_row_dev": (P.sum(1) - 1).abs().max().item(),
                "sinkhorn_col_dev": (P.sum(0) - 1).abs().max().item(),
                "embedding_std": z.std(0).mean().item(),
                "embedding_std_uniform": 1 / math.sqrt(z.shape[1])}

    train_model = run.start(model, opt, scaler, model.eval_backbone(), analyse)
    if run.fresh:  # what the augmentation does, and the random-init baseline
        orig = run.images(torch.arange(0, run.N, max(1, run.N // 8))[:8])  # spread over the classes
        glob, local = crops_of(orig, run.rand(V, len(orig)), args, size)
        common.save_views(run.figure("views.png"), [orig.float() / 255, glob, local])
        run.evaluate(0)
    while run.epoch < args.epochs:
        for idx, u in run.batches(V):  # the global batch and its crops' uniforms (V, B, NU)
            cos = get_cos(run.step)
            for group in opt.param_groups:
                group["lr"] = get_lr(run.step)
                group["weight_decay"] = 0.0 if group.get("no_decay") else (
                    args.weight_decay_end + (args.weight_decay - args.weight_decay_end) * cos)
            glob, local = crops_of(run.images(idx[run.shard]), u[:, run.shard], args, size)
            with run.autocast():
                z, zt = train_model(norm(glob), norm(local))  # (V*B, D) student; teacher or None
            loss = bam_objective(z, zt, B, args, mask)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if model.teacher is not None:  # momentum 0.995 -> 1, cosine (released scripts)
                model.update_teacher(1 - (1 - args.teacher_momentum) * cos)
            run.step_done(loss)  # non-finite watch; progress line every --log-every steps
        run.epoch_done()  # non-finite weights check, evaluation when due, checkpoint
    run.finish()  # final k-NN, linear probe, backbone.pt, summary.json
