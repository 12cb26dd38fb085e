"""transfusion.py: the fusion and final blocks against their equations, JSD, targets, the subspace check."""

import math

import torch

import common
import transfusion as tf
from conftest import union_of_subspaces


def _block_by_hand(block, X, final):
    """The block's equations, one entry at a time."""
    Y = torch.nn.functional.layer_norm(X, X.shape[1:], block.ln.weight, block.ln.bias)
    Q, K = Y @ block.q.weight.T + block.q.bias, Y @ block.k.weight.T + block.k.bias
    Q, K = Q / Q.norm(dim=1, keepdim=True), K / K.norm(dim=1, keepdim=True)
    N = len(X)
    C = [[(Q[i] @ K[j]).item() for j in range(N)] for i in range(N)]
    score = {"relu": lambda c, i: max(c, 0.0),
             "centred": lambda c, i: max(c - sum(C[i]) / N, 0.0),
             "square": lambda c, i: c * c}[block.score]
    R = torch.tensor([[0.0 if i == j else score(C[i][j], i) for j in range(N)] for i in range(N)])
    if block.empty == "uniform":
        R = R + 1e-10 * (1 - torch.eye(N))
        A = R / R.sum(1, keepdim=True)
    else:
        A = R / (R.sum(1, keepdim=True) + block.eps)
    if final:
        return X, A
    V = Y @ block.v.weight.T + block.v.bias
    return X + A @ V, A


@torch.no_grad()
def test_blocks_match_their_equations():
    torch.manual_seed(0)
    X = torch.randn(7, 6)
    for score in ("relu", "centred", "square"):
        for final in (False, True):
            for tied in (False, True):
                for empty in ("zero", "uniform"):
                    block = tf.FusionBlock(6, score, final, empty=empty, tied=tied)
                    out, A = block(X)
                    ref_out, ref_A = _block_by_hand(block, X, final)
                    assert torch.allclose(A, ref_A, atol=1e-5) and torch.allclose(out, ref_out, atol=1e-5)
                    assert (A >= 0).all() and (A.diagonal() == 0).all()
                    sums = A.sum(1)  # rows sum to 1, or 0 if no score is positive
                    assert torch.all(((sums - 1).abs() < 1e-4) | ((sums == 0) & (empty == "zero")))
                    if tied:
                        assert block.k is block.q


def test_row_with_no_positive_score_is_zero_or_uniform_and_the_loss_is_log_2():
    for empty, row in (("zero", torch.zeros(3)), ("uniform", torch.tensor([0, 0.5, 0.5]))):
        block = tf.FusionBlock(4, "relu", final=True, empty=empty)
        with torch.no_grad():  # keys = -queries: every off-diagonal cosine of identical tokens is -1
            block.k.weight.copy_(-block.q.weight)
            block.k.bias.copy_(-block.q.bias)
        X = (torch.ones(3, 4) + torch.arange(4.0)).requires_grad_()
        _, A = block(X)
        assert torch.allclose(A[0], row)
        loss = tf.jsd_loss(A, tf.target_affinity(torch.tensor([0, 1, 0])))
        loss.backward()  # finite, and finite gradients (zero: nothing moves a dead ReLU row)
        assert torch.isfinite(loss) and torch.isfinite(X.grad).all()
        if empty == "zero":  # the dead row is the "none" outcome: the maximum, log 2
            assert abs(tf.jsd(torch.cat([A[0], 1 - A[0].sum(0, True)]), torch.tensor([0, 0, 1.0, 0])).item()
                       - math.log(2)) < 1e-6


def test_head_outputs_adjacency_of_every_block():
    head = tf.TransFusionHead(10, tf.Args(width=8, fusion_blocks=2))
    h = torch.randn(6, 10)
    maps = head(h, every_block=True)
    assert maps.shape == (3, 6, 6) and torch.equal(maps[-1], head(h))
    perm = torch.randperm(6)  # permutation-equivariant: no positional information
    assert torch.allclose(head(h[perm]), head(h)[perm][:, perm], atol=1e-6)


def test_no_row_starts_dead():
    """Default head at initialisation, on a batch of two noisy views of random points: the loss has a
    non-zero gradient with respect to every row's score of its partner, in every block."""
    torch.manual_seed(0)
    n, D = 64, 32
    h, _ = union_of_subspaces(n, D=D, K=8)()
    head = tf.TransFusionHead(D, tf.Args(width=D))
    x, cosines = head.stem(h), []
    for block in [*head.blocks, head.final]:  # the head's forward, block by block, keeping C
        y = block.ln(x)
        C = block.cosines(y)
        C.retain_grad()
        cosines.append(C)
        A = block.adjacency(C)
        x = x if block.final else x + A @ block.v(y)
    tf.jsd_loss(A, tf.target_affinity(torch.arange(n).repeat(2))).backward()
    partner = (torch.arange(2 * n) + n) % (2 * n)
    for C in cosines:
        assert (C.grad[torch.arange(2 * n), partner] != 0).all()


def test_jsd_properties():
    p = torch.tensor([[0.2, 0.3, 0.5]])
    assert tf.jsd(p, p).abs().item() < 1e-7
    a, b = torch.tensor([[0.5, 0.5, 0, 0]]), torch.tensor([[0, 0, 0.3, 0.7]])
    assert abs(tf.jsd(a, b).item() - math.log(2)) < 1e-6  # disjoint supports
    q = torch.tensor([[0.6, 0.1, 0.3]])
    assert abs(tf.jsd(p, q).item() - tf.jsd(q, p).item()) < 1e-7
    m = (p + q) / 2
    kl = lambda x, y: sum(float(xi * math.log(xi / yi)) for xi, yi in zip(x[0], y[0]) if xi > 0)
    assert abs(tf.jsd(p, q).item() - (0.5 * kl(p, m) + 0.5 * kl(q, m))) < 1e-6


def test_loss_matches_a_loop():
    torch.manual_seed(1)
    A = torch.rand(6, 6).fill_diagonal_(0)
    A = A / A.sum(1, keepdim=True)
    A[2] = 0  # a dead row counts as the "none" outcome: JSD log 2
    T = tf.target_affinity(torch.tensor([0, 1, 2, 0, 1, 2]))

    def jsd(p, q):
        m = [(x + y) / 2 for x, y in zip(p, q)]
        kl = lambda x: sum(xi * math.log(xi / mi) for xi, mi in zip(x, m) if xi > 0)
        return 0.5 * kl(p) + 0.5 * kl(q)

    rows = []
    for i in range(6):
        p, q = A[i].tolist(), T[i].tolist()
        rows.append(jsd(p + [max(0.0, 1 - sum(p))], q + [0.0]))
    assert abs(rows[2] - math.log(2)) < 1e-6
    assert abs(tf.jsd_loss(A, T, "rows").item() - sum(rows) / 6) < 1e-6
    entries = [jsd([A[i, j].item(), 1 - A[i, j].item()], [T[i, j].item(), 1 - T[i, j].item()])
               for i in range(6) for j in range(6) if i != j]
    assert abs(tf.jsd_loss(A, T, "elementwise").item() - sum(entries) / len(entries)) < 1e-6


def test_target_affinity_views_and_labels():
    views = tf.target_affinity(torch.arange(3).repeat(2))  # B = 3 images, two views each
    expected = torch.zeros(6, 6)
    for i in range(6):
        expected[i, (i + 3) % 6] = 1
    assert torch.equal(views, expected)
    labels = torch.tensor([0, 0, 1, 2, 0, 0, 1, 2][:4]).repeat(2)  # class 2 has one image in the batch
    T = tf.target_affinity(labels)
    assert torch.allclose(T.sum(1), torch.ones(8)) and (T.diagonal() == 0).all()
    assert torch.allclose(T[0], torch.tensor([0, 1, 0, 0, 1, 1, 0, 0]) / 3)
    assert torch.equal(T[3], torch.eye(8)[7])  # its only partner is its own other view
    lonely = tf.target_affinity(torch.tensor([0, 1, 1]))  # no partner at all: the row stays 0
    assert torch.equal(lonely[0], torch.zeros(3))
    A = torch.full((3, 3), 0.5).fill_diagonal_(0)
    assert abs(tf.jsd_loss(A, lonely).item() - tf.jsd(A[1:], lonely[1:]).mean().item()) < 1e-6


def test_final_adjacency_becomes_block_diagonal_on_a_union_of_subspaces():
    """The theory's setting, with the default formulation: the head alone, trained with the views
    target, puts most of each row on the row's own subspace, and no row dies; untrained, it does not."""
    torch.manual_seed(0)
    batch = union_of_subspaces(64)
    head = tf.TransFusionHead(64, tf.Args(width=64, fusion_blocks=2))
    T = tf.target_affinity(torch.arange(64).repeat(2))

    def analysis():
        h, y = batch()
        head.eval()  # the stem's BatchNorm with its running statistics, as in the file's analysis
        with torch.no_grad():
            A = head(h)
        head.train()
        return common.same_class_mass(A, y), tf.dead_rows(A).item()

    (before, chance), _ = analysis()
    assert abs(before.item() - chance) < 0.15
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(300):
        loss = tf.jsd_loss(head(batch()[0]), T)
        opt.zero_grad()
        loss.backward()
        opt.step()
    (after, chance), dead = analysis()
    assert after.item() > 0.6 and after.item() > chance + 0.3 and dead == 0, (after, chance, dead)
