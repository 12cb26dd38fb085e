"""bam.py: Sinkhorn target, loss against a loop, gradient paths, EMA teacher, multi-crop, short training."""

import json
import math
import os

import torch

import bam
import common
from conftest import TINY, run_cli, run_dir_of


def _similarities(n, d=8, seed=0):
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    return z, z @ z.T


def test_sinkhorn_rows_mask_and_columns():
    B = 6
    z, S = _similarities(2 * B)
    mask = bam.same_image(2 * B, 2 * B, B, "cpu")
    assert mask.sum() == 2 * B * 2 and mask.diagonal().all()  # itself and its other global crop
    devs = []
    for iters in (1, 3, 10, 50):
        P = bam.sinkhorn(S, mask, 0.05, iters)
        assert torch.allclose(P.sum(1), torch.ones(2 * B), atol=1e-5)
        assert torch.equal(P[mask], torch.zeros(int(mask.sum())))
        devs.append((P.sum(0) - 1).abs().max().item())
    assert devs[0] > devs[1] > devs[2] > devs[3] and devs[3] < devs[0] / 10  # columns approach uniform


def test_sinkhorn_is_finite_for_small_lambda_under_bf16():
    B = 16
    z, _ = _similarities(2 * B, 32)
    mask = bam.same_image(2 * B, 2 * B, B, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        S = z @ z.T  # bf16 under autocast
        assert S.dtype == torch.bfloat16
        P = bam.sinkhorn(S, mask, 0.01, 3)
    assert P.dtype == torch.float32 and torch.isfinite(P).all()
    assert torch.allclose(P.sum(1), torch.ones(2 * B), atol=1e-4)


def test_loss_matches_a_loop():
    # 2 images, 2 global crops + 1 local crop: rows of z are crop-major (crop v of image i at v * B + i)
    B, G, V, tau, lam = 2, 2, 3, 0.5, 0.3
    z, _ = _similarities(V * B, 4, seed=3)
    keys = z[: G * B]
    target = bam.sinkhorn(keys @ keys.T, bam.same_image(G * B, G * B, B, "cpu"), lam, 3)
    total, count = 0.0, 0
    for g in range(G):
        for v in range(V):
            if v == g:
                continue
            for i in range(B):
                others = [k for k in range(G * B) if k % B != i]  # keys of other images only
                logits = [float(z[v * B + i] @ keys[k]) / tau for k in others]
                log_norm = math.log(sum(math.exp(l) for l in logits))
                total += -sum(float(target[g * B + i, k]) * (l - log_norm) for k, l in zip(others, logits))
                count += 1
    assert count == G * (V - 1) * B
    assert abs(bam.bam_loss(z, keys, target, B, tau).item() - total / count) < 1e-5


def test_gradient_flows_only_through_the_source():
    B = 4
    z = torch.randn(3 * B, 8, requires_grad=True)
    zn = torch.nn.functional.normalize(z, dim=1)
    keys = zn[: 2 * B]
    target = bam.sinkhorn(keys @ keys.T, bam.same_image(2 * B, 2 * B, B, "cpu"), 0.05, 3)
    assert not target.requires_grad  # stop-gradient target
    bam.bam_loss(zn, keys, target, B, 0.1).backward()
    grad = z.grad.clone()
    z.grad = None  # the same loss with the target as a plain constant gives the same gradient
    zn = torch.nn.functional.normalize(z, dim=1)
    bam.bam_loss(zn, zn[: 2 * B], target.clone(), B, 0.1).backward()
    assert torch.allclose(grad, z.grad) and grad[: 2 * B].abs().sum() > 0 and grad[2 * B:].abs().sum() > 0


def _args(**kw):
    return bam.Args(backbone="resnet18", proj_hidden=32, proj_dim=16, num_local_crops=2, proj_last_bn=False, **kw)


def test_ema_teacher_gets_no_gradient_and_moves_by_the_ema_rule():
    torch.manual_seed(0)
    args = _args(ema_teacher=True)
    model = bam.BAM(args, 16)
    glob, local = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)
    z, zt = model(glob, local)
    assert z.shape == (8, 16) and zt.shape == (8, 16) and not zt.requires_grad  # teacher: every crop
    assert torch.allclose(z, zt, atol=1e-6)  # before any update the teacher is the student
    bam.bam_objective(z, zt, 2, args, bam.same_image(8, 4, 2, "cpu")).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.backbone.parameters())
    t_before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.projector.parameters()]:
            p.add_(0.1)
    s_now = [*model.backbone.parameters(), *model.projector.parameters()]
    model.update_teacher(0.9)
    for t, t0, s in zip(model.teacher.parameters(), t_before, s_now):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)
    assert model.eval_backbone() is model.teacher["backbone"]


def _sinkhorn_by_hand(S, B, lam, iters):
    """Plain-space Sinkhorn on float64 lists, same-image entries 0; columns then rows, `iters` times."""
    rows, cols = S.shape
    P = [[0.0 if r % B == c % B else math.exp(float(S[r, c]) / lam) for c in range(cols)] for r in range(rows)]
    for _ in range(iters):
        for c in range(cols):
            total = sum(P[r][c] for r in range(rows))
            for r in range(rows):
                P[r][c] /= total
        for r in range(rows):
            total = sum(P[r])
            P[r] = [p / total for p in P[r]]
    return torch.tensor(P)


def _loss_by_hand(z, keys, target, B, tau):
    """Mean over target crops g, other crops v and images i of -sum_k P_g[i, k] log A_v[i, k]."""
    V, G = len(z) // B, len(keys) // B
    total, count = 0.0, 0
    for g in range(G):
        for v in [v for v in range(V) if v != g]:
            for i in range(B):
                others = [k for k in range(G * B) if k % B != i]
                logits = [float(z[v * B + i] @ keys[k]) / tau for k in others]
                log_norm = math.log(sum(math.exp(l) for l in logits))
                total += -sum(float(target[g * B + i, k]) * (l - log_norm) for k, l in zip(others, logits))
                count += 1
    return total / count


def test_top_k_keeps_the_columns_of_the_mean_over_global_crops():
    B, G, K, k = 3, 2, 6, 2
    P = torch.rand(G * B, K, generator=torch.Generator().manual_seed(4))
    P = P / P.sum(1, keepdim=True)
    kept = bam.keep_top_k(P, k, G)
    for i in range(B):
        mean = [(P[i, c].item() + P[B + i, c].item()) / 2 for c in range(K)]
        top = sorted(range(K), key=lambda c: -mean[c])[:k]
        for g in range(G):
            row = [P[g * B + i, c].item() if c in top else 0.0 for c in range(K)]
            assert torch.allclose(kept[g * B + i], torch.tensor(row) / sum(row), atol=1e-6)
    assert torch.equal(bam.keep_top_k(P, 0, G), P) and torch.equal(bam.keep_top_k(P, K, G), P)
    own = torch.zeros_like(P).scatter_(1, P.topk(k, 1).indices, 1) * P  # each row's own top-k differs here
    assert not torch.allclose(kept, own / own.sum(1, keepdim=True))


def test_objective_with_teacher_and_top_k_matches_a_direct_evaluation():
    """Teacher: Sinkhorn over every crop's teacher row (local ones too) against the teacher's global
    keys; its global rows (top-k of the mean over global crops) are the targets of the student's queries."""
    B, V, G, D, lam, tau = 3, 3, 2, 4, 0.5, 0.5
    gen = torch.Generator().manual_seed(5)
    z, zt = [torch.nn.functional.normalize(torch.randn(V * B, D, generator=gen), dim=1) for _ in range(2)]
    mask = bam.same_image(V * B, G * B, B, "cpu")
    for top_k in (0, 2):
        args = bam.Args(lam=lam, tau=tau, sinkhorn_iters=3, top_k=top_k)
        P = _sinkhorn_by_hand(zt @ zt[: G * B].T, B, lam, 3)[: G * B]  # rows of all 3 crops, then global rows
        if top_k:
            P = torch.stack([row * torch.isin(torch.arange(G * B), ((P[i % B] + P[B + i % B]) / 2).topk(top_k).indices)
                             for i, row in enumerate(P)])
            P = P / P.sum(1, keepdim=True)
        expected = _loss_by_hand(z, zt[: G * B], P, B, tau)
        assert abs(bam.bam_objective(z, zt, B, args, mask).item() - expected) < 1e-5
        # Sinkhorn over the global rows alone (the rule before) gives another value
        P_glob = _sinkhorn_by_hand(zt[: G * B] @ zt[: G * B].T, B, lam, 3)
        if not top_k:
            assert abs(_loss_by_hand(z, zt[: G * B], P_glob, B, tau) - expected) > 1e-3
    # without a teacher the student is its own teacher: keys z[:2B], Sinkhorn over all of z's rows
    args = bam.Args(lam=lam, tau=tau, sinkhorn_iters=3)
    P = _sinkhorn_by_hand(z @ z[: G * B].T, B, lam, 3)[: G * B]
    assert abs(bam.bam_objective(z, None, B, args, mask).item() - _loss_by_hand(z, z[: G * B], P, B, tau)) < 1e-5


def test_multi_crop_shapes_and_per_crop_randomness():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(3, 1, 1, 1)
    glob, local = bam.crops_of(x, torch.rand(6, 3, bam.NU), bam.Args(num_local_crops=4), 32)
    assert glob.shape == (6, 3, 32, 32) and local.shape == (12, 3, 16, 16)
    flat = [tuple(c.flatten()[:64].tolist()) for c in torch.cat([glob, torch.nn.functional.interpolate(local, 32)])]
    assert len(set(flat)) == 18  # every crop of every (identical) image its own draw
    none = bam.crops_of(x, torch.rand(2, 3, bam.NU), bam.Args(num_local_crops=0), 32)[1]
    assert none.shape == (0, 3, 16, 16)


def test_solarize():
    x = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    kw = dict(scale=(1, 1), ratio=(1, 1), flip_p=0, jitter_p=0, gray_p=0)
    out = bam.augment(x, torch.rand(2, bam.NU), 8, solarize_p=1.0, **kw)
    assert torch.allclose(out, torch.full_like(out, 1 - 200 / 255))


def _train(args, steps, B=32, seed=0):
    """A few steps on synthetic 16 px images; returns the losses and the final embedding spread."""
    torch.manual_seed(seed)
    x = common.load_dataset("synthetic", "unused", image_size=16, num_samples=B).train_x
    model = bam.BAM(args, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.04)
    g = torch.Generator().manual_seed(seed)
    V = 2 + args.num_local_crops
    mask = bam.same_image(V * B, 2 * B, B, "cpu")
    losses = []
    for _ in range(steps):
        glob, local = bam.crops_of(x, torch.rand(V, B, bam.NU, generator=g), args, 16)
        z, _ = model((glob - 0.5) / 0.25, (local - 0.5) / 0.25)
        keys = z[: 2 * B]
        target = bam.sinkhorn(z.detach() @ keys.detach().T, mask, args.lam, 3)[: 2 * B]
        loss = bam.bam_loss(z, keys, target, B, args.tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, z.std(0).mean().item()


def test_a_few_steps_decrease_the_loss_without_collapse():
    args = bam.Args(proj_hidden=64, proj_dim=32, num_local_crops=1)
    losses, spread = _train(args, 15)
    assert all(math.isfinite(l) for l in losses)
    assert sum(losses[-3:]) < sum(losses[:3]) - 1.0, losses
    assert spread > 0.5 / math.sqrt(32)  # uniform on the sphere: 1 / sqrt(D); collapse: 0
    # the paper's projector without the final BatchNorm drifts towards one point here (see README)
    _, spread_no_bn = _train(bam.Args(proj_hidden=64, proj_dim=32, num_local_crops=1, proj_last_bn=False), 15)
    assert spread_no_bn < spread / 3


def test_cli_without_teacher(tmp_path):
    p = run_cli("bam.py", *TINY, "--num-local-crops", "1", "--proj-hidden", "64", "--proj-dim", "32",
                "--eval-every", "0", "--output-dir", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.load(open(os.path.join(run_dir_of(tmp_path), "summary.json")))
    assert s["sinkhorn_row_dev"] < 1e-4 and s["embedding_std"] > 0
