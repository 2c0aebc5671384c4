"""Per-sample gradient factors and their algebra.

A rule never materialises per-sample gradients unless that is cheaper. It
describes the per-sample gradient of a parameter at one use as a *factor*:

- :class:`LowRankGrad`: ``grad_b = reshape(concat_g(left[b,g]^T @ right[b,g]))``
  (linear layers, grouped convolutions on unfolded inputs);
- :class:`EmbeddingGrad`: ``grad_b = sum_t onehot(index[b,t]) grad[b,t]^T``;
- :class:`DenseGrad`: the per-sample gradients themselves, ``(B, *shape)``.

From factors we compute, for every sample b, squared norms, inner products
between two uses of the same parameter (tied weights) and the clipped sum
``sum_b coef[b] * grad_b`` as one matmul / index_add. All arithmetic is done in
at least float32 (float64 stays float64). The choice between the ghost-norm
(Gram) form and instantiation is taken per call from the real shapes and
recorded on the factor (``decision``) so reports can show it. A low-rank factor
whose norm is computed by instantiation is instantiated once (:func:`prepare`):
the same per-sample gradients give its norm and its clipped sum, which is then a
weighted sum over the batch instead of a second GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never bf16/fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(eq=False)
class LowRankGrad:
    left: torch.Tensor   # (B, G, T, m)
    right: torch.Tensor  # (B, G, T, n)
    shape: torch.Size    # parameter shape, numel == G*m*n
    decision: Optional[str] = field(default=None)

    @property
    def batch_size(self) -> int:
        return self.left.shape[0]

    def materialize(self) -> torch.Tensor:
        dt = compute_dtype(self.left, self.right)
        g = torch.matmul(self.left.to(dt).transpose(-1, -2), self.right.to(dt))
        return g.reshape(self.batch_size, *self.shape)


@dataclass(eq=False)
class EmbeddingGrad:
    index: torch.Tensor  # (B, T) integer
    grad: torch.Tensor   # (B, T, d); rows at padding_idx already zeroed
    shape: torch.Size    # (V, d)
    decision: Optional[str] = field(default="ghost")

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    def materialize(self) -> torch.Tensor:
        B, T, d = self.grad.shape
        dt = compute_dtype(self.grad)
        out = torch.zeros(B * self.shape[0], d, dtype=dt, device=self.grad.device)
        offs = (torch.arange(B, device=self.index.device) * self.shape[0]).unsqueeze(1)
        out.index_add_(0, (self.index + offs).reshape(-1), self.grad.reshape(-1, d).to(dt))
        return out.view(B, *self.shape)


@dataclass(eq=False)
class DenseGrad:
    grad: torch.Tensor  # (B, *shape)
    decision: Optional[str] = field(default="instantiate")
    # per-sample squared norms of ``grad``, computed with it while it is in cache (:func:`prepare`)
    sq: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.grad.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.grad.shape[1:]

    def materialize(self) -> torch.Tensor:
        return self.grad.to(compute_dtype(self.grad))


def use_ghost(T: int, m: int, n: int) -> bool:
    """Ghost (Gram) norm iff instantiating the per-sample gradients would hold more than 7/4 of the memory
    of the factors they replace: ``4 m n > 7 T (m + n)``.

    Instantiated gradients (B m n values, one GEMM of B T m n) give both the norm and the clipped sum
    (then a B m n weighted sum); the ghost norm costs B T^2 (m + n) on top of the clipped-sum GEMM
    (B T m n). So instantiation is the cheaper one at every T > 1 that matters, and the condition is
    about memory: the instantiated gradients replace the factors (B T (m + n) values) they come from."""
    return 4 * m * n > 7 * T * (m + n)


def norm_decision(T: int, m: int, n: int) -> str:
    """How the squared norm of a low-rank factor is computed: "outer" (T == 1),
    "ghost" (Gram matrices, :func:`use_ghost`) or "instantiate"."""
    if T == 1:
        return "outer"
    return "ghost" if use_ghost(T, m, n) else "instantiate"


def decide(f) -> Optional[str]:
    """The norm method of ``f`` (set on a low-rank factor from its current shapes)."""
    if isinstance(f, LowRankGrad):
        f.decision = norm_decision(f.left.shape[2], f.left.shape[-1], f.right.shape[-1])
    return f.decision


def prepare(f):
    """The form in which finalize computes with ``f``: a low-rank factor whose norm is computed by
    instantiation becomes its dense per-sample gradients (in the compute dtype), computed once and
    reused for the norm, cross terms and the clipped sum; any other factor is returned as it is."""
    if isinstance(f, LowRankGrad) and decide(f) == "instantiate":
        dense = DenseGrad(f.materialize(), "instantiate")
        dense.sq = sq_norm(dense)
        return dense
    return f


def _ghost_sq_norm(left: torch.Tensor, right: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``sum_{s,t} <l_s, l_t> <r_s, r_t>`` per sample. The Grams are symmetric: from T >= 2 * block only
    their upper block triangle is formed (diagonal blocks once, off-diagonal ones counted twice), which
    takes (k + 1) / 2k of the GEMM work with k = min(4, T // block) blocks (3/4 at T = 128)."""
    B, G, T, _ = left.shape
    L, R = left.reshape(B * G, T, -1), right.reshape(B * G, T, -1)
    k = min(4, T // block)
    if k < 2:
        return (torch.bmm(L, L.transpose(1, 2)) * torch.bmm(R, R.transpose(1, 2))).sum((1, 2)).view(B, G).sum(1)
    edges = [T * i // k for i in range(k + 1)]
    total = None
    for i in range(k):
        Li, Ri = L[:, edges[i]:edges[i + 1]], R[:, edges[i]:edges[i + 1]]
        for j in range(i, k):
            Lj, Rj = L[:, edges[j]:edges[j + 1]], R[:, edges[j]:edges[j + 1]]
            term = (torch.bmm(Li, Lj.transpose(1, 2)) * torch.bmm(Ri, Rj.transpose(1, 2))).sum((1, 2))
            term = term if i == j else 2 * term
            total = term if total is None else total + term
    return total.view(B, G).sum(1)


def sq_norm(f) -> torch.Tensor:
    """Per-sample squared Frobenius norm, shape (B,)."""
    if isinstance(f, LowRankGrad):
        dt = compute_dtype(f.left, f.right)
        left, right = f.left.to(dt), f.right.to(dt)
        B, G, T, m = left.shape
        n = right.shape[-1]
        if decide(f) == "outer":
            return (left.square().sum(-1) * right.square().sum(-1)).sum((1, 2))
        if f.decision == "ghost":
            return _ghost_sq_norm(left, right)
        return torch.matmul(left.transpose(-1, -2), right).square().sum((1, 2, 3))
    if isinstance(f, EmbeddingGrad):
        return inner(f, f)
    if isinstance(f, DenseGrad):
        if f.sq is not None:
            return f.sq
        g = f.materialize()
        return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).square()  # no squared copy
    raise TypeError(f"fxdp: unknown gradient factor {type(f).__name__}")


def _lowrank_inner(a: LowRankGrad, b: LowRankGrad) -> torch.Tensor:
    dt = compute_dtype(a.left, b.left)
    T1, T2 = a.left.shape[2], b.left.shape[2]
    m, n = a.left.shape[-1], a.right.shape[-1]
    if T1 * T2 * (m + n) < (T1 + T2) * m * n:
        gl = torch.matmul(a.left.to(dt), b.left.to(dt).transpose(-1, -2))
        gr = torch.matmul(a.right.to(dt), b.right.to(dt).transpose(-1, -2))
        return (gl * gr).sum((1, 2, 3))
    ga = torch.matmul(a.left.to(dt).transpose(-1, -2), a.right.to(dt))
    gb = torch.matmul(b.left.to(dt).transpose(-1, -2), b.right.to(dt))
    return (ga * gb).sum((1, 2, 3))


def _embedding_inner(a: EmbeddingGrad, b: EmbeddingGrad) -> torch.Tensor:
    dt = compute_dtype(a.grad, b.grad)
    same = (a.index.unsqueeze(2) == b.index.unsqueeze(1)).to(dt)          # (B, T1, T2)
    dots = torch.bmm(a.grad.to(dt), b.grad.to(dt).transpose(1, 2))      # (B, T1, T2)
    return (same * dots).sum((1, 2))


def _embedding_lowrank_inner(e: EmbeddingGrad, lr: LowRankGrad) -> torch.Tensor:
    # <sum_t onehot(x_t) g_t^T, sum_s l_s^T r_s> = sum_{t,s} l_s[x_t] <g_t, r_s>
    dt = compute_dtype(e.grad, lr.left)
    left, right = lr.left[:, 0].to(dt), lr.right[:, 0].to(dt)           # (B, S, V), (B, S, d)
    B, S, _ = left.shape
    T = e.index.shape[1]
    picked = torch.gather(left, 2, e.index.unsqueeze(1).expand(B, S, T))  # (B, S, T)
    dots = torch.bmm(right, e.grad.to(dt).transpose(1, 2))               # (B, S, T)
    return (picked * dots).sum((1, 2))


def _embedding_dense_inner(e: EmbeddingGrad, d: DenseGrad) -> torch.Tensor:
    # <sum_t onehot(x_t) g_t^T, D> = sum_t <g_t, D[x_t]>
    dt = compute_dtype(e.grad, d.grad)
    B, T = e.index.shape
    dense = d.grad.to(dt).reshape(B, e.shape[0], -1)
    rows = torch.gather(dense, 1, e.index.unsqueeze(-1).expand(B, T, dense.shape[-1]))
    return (rows * e.grad.to(dt)).sum((1, 2))


def inner(a, b) -> torch.Tensor:
    """Per-sample inner product <grad_a[b], grad_b[b]> of two uses of one parameter."""
    if isinstance(a, LowRankGrad) and isinstance(b, LowRankGrad) and a.left.shape[1] == b.left.shape[1] \
            and a.left.shape[-1] == b.left.shape[-1]:
        return _lowrank_inner(a, b)
    if isinstance(a, EmbeddingGrad) and isinstance(b, EmbeddingGrad):
        return _embedding_inner(a, b)
    if isinstance(a, EmbeddingGrad) and isinstance(b, LowRankGrad) and b.left.shape[1] == 1 \
            and b.left.shape[-1] == a.shape[0]:
        return _embedding_lowrank_inner(a, b)
    if isinstance(a, EmbeddingGrad) and isinstance(b, DenseGrad) and b.shape == a.shape:
        return _embedding_dense_inner(a, b)
    if isinstance(b, EmbeddingGrad) and isinstance(a, (LowRankGrad, DenseGrad)):
        return inner(b, a)
    ga, gb = a.materialize(), b.materialize()
    dt = compute_dtype(ga, gb)
    return (ga.to(dt).reshape(ga.shape[0], -1) * gb.to(dt).reshape(gb.shape[0], -1)).sum(1)


def mask_rows(t: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    if keep is None:
        return t
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros((), dtype=t.dtype, device=t.device))


def clipped_sum(f, coef: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_b coef[b] * grad_b`` in one matmul / index_add, shape ``f.shape``.

    ``keep`` (bool, (B,)) removes samples entirely, also where their factors
    hold NaN or inf (``0 * nan`` would otherwise poison the sum).
    """
    if isinstance(f, LowRankGrad):
        dt = compute_dtype(f.left, f.right, coef)
        B, G, T, m = f.left.shape
        n = f.right.shape[-1]
        left, right = mask_rows(f.left.to(dt), keep), mask_rows(f.right.to(dt), keep)
        c = coef.to(dt).view(B, 1, 1, 1)
        if m <= n:  # scale the smaller side
            left = left * c
        else:
            right = right * c
        if G == 1:  # the GEMM reads the transposed operand in place
            return torch.mm(left.reshape(B * T, m).t(), right.reshape(B * T, n)).reshape(f.shape)
        lhs = left.transpose(0, 1).reshape(G, B * T, m).transpose(1, 2)
        rhs = right.transpose(0, 1).reshape(G, B * T, n)
        return torch.bmm(lhs, rhs).reshape(f.shape)
    if isinstance(f, EmbeddingGrad):
        dt = compute_dtype(f.grad, coef)
        B, T, d = f.grad.shape
        g = mask_rows(f.grad.to(dt), keep) * coef.to(dt).view(B, 1, 1)
        out = torch.zeros(f.shape, dtype=dt, device=g.device)
        out.index_add_(0, f.index.reshape(-1), g.reshape(-1, d))
        return out
    if isinstance(f, DenseGrad):
        g = f.materialize()
        g = mask_rows(g, keep)
        return torch.tensordot(coef.to(g.dtype), g, dims=1)
    raise TypeError(f"fxdp: unknown gradient factor {type(f).__name__}")


def merge_factors(factors: list, at_least: int = 3) -> list:
    """One low-rank factor for many uses of a parameter with the same shapes (a recurrent weight used at
    every time step): ``sum_k L_k^T R_k == [L_1; ..; L_K]^T [R_1; ..; R_K]``, so the norm of the sum over
    uses -- cross terms included -- is one Gram (ghost) or instantiated norm over the T x B rows instead
    of K^2 pairwise inner products. Groups smaller than ``at_least`` are left as they are; merged factors
    are marked ``decision = "merged"``."""
    groups: dict = {}
    rest = []
    for f in factors:
        if isinstance(f, LowRankGrad):
            key = (f.left.shape[0], f.left.shape[1], f.left.shape[-1], f.right.shape[-1], tuple(f.shape))
            groups.setdefault(key, []).append(f)
        else:
            rest.append(f)
    out = list(rest)
    for group in groups.values():
        if len(group) < at_least:
            out.extend(group)
            continue
        dt = compute_dtype(*[g.left for g in group], *[g.right for g in group])
        left = torch.cat([g.left.to(dt) for g in group], 2)
        right = torch.cat([g.right.to(dt) for g in group], 2)
        for g in group:
            g.decision = "merged"
        out.append(LowRankGrad(left, right, group[0].shape))
    return out
