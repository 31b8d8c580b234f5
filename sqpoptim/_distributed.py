r"""The collectives of one constrained step across the ranks of a ``torch.distributed`` process group.

A step needs the objective gradient :math:`g_k` (an n-vector), the constraint values :math:`c_k` (m) and the
Jacobian :math:`J_k` (m×n); everything after that (the float64 Gram matrix :math:`J_kJ_k^\top`, its factor,
:math:`v_k`, :math:`u_k`, the moments) is computed from them. When every rank holds the same :math:`g_k, c_k,
J_k` and the same optimizer state, every rank computes the same step from the same numbers and the replicas
stay bit-identical without exchanging the step itself. This module makes the inputs equal, at these costs per
rank and step (P ranks, b bytes per parameter-dtype entry; "sent" is what a ring algorithm sends per rank):

===================================  ==============================================  ===========================
what                                 collective                                      sent per rank
===================================  ==============================================  ===========================
data parallel: :math:`g_k`, loss     one all-reduce of the flat [n + 1] vector        :math:`2\frac{P-1}{P}(n+1)b`
replicated rows (same c, J on all)   nothing; equality checked in the agreement       0
sharded rows (rank r owns c_r, J_r)  one all-gather of the rows [J_r | c_r]           :math:`(P-1)\max_r m_r (n+1) b`
agreement (refusal consensus)        one all-reduce of 12 + 2P int64                  :math:`2\frac{P-1}{P}(12+2P)8`
matrix-free product, sharded rows    :math:`J^\top w`: all-reduce of n;               :math:`2\frac{P-1}{P} n b`;
                                     :math:`Jx`: all-gather of :math:`m_r`            :math:`(P-1)\max_r m_r b`
===================================  ==============================================  ===========================

Sharded rows: why an all-gather of the rows. Every entry of the Gram matrix
:math:`G = JJ^\top`, :math:`G_{rs} = J_rJ_s^\top`, pairs rows of two ranks, so any exact dense scheme moves
:math:`(P-1)/P` of J to every rank (or streams it through a ring, the same bytes). The alternatives are

* zero-padding the local rows to m×n and all-reducing: twice the bytes of the all-gather (a ring all-reduce
  sends :math:`2(P-1)/P` of the buffer, an all-gather :math:`(P-1)/P`), for the same result;
* passing the rows around a ring so that rank r forms only its block row :math:`J_rJ^\top` (:math:`m_r m n`
  flops instead of :math:`m^2 n`), then all-gathering the float64 block rows (:math:`8(P-1)m^2/P` bytes more),
  and keeping only :math:`J_r`: every later product :math:`J^\top y` (normal step, each projection: two or three
  per step) is then an all-reduce of an n-vector and every :math:`Jx` an all-gather. It saves
  :math:`(1-1/P)m^2n` flops per rank for :math:`\approx 6\frac{P-1}{P}nb` more bytes per step.

The all-gather keeps the whole step local after one collective, and the step on every rank is the
single-process step on the union of the rows, in rank order (the test oracle). Its price is the redundant Gram
matrix: :math:`m^2n` flops on every rank, which pays off while :math:`m^2 n` is small against forming
:math:`J_r` (:math:`m_r` backward passes) and the bytes; :func:`gram_block_rows` is the block-row form for
when it is not (it needs the full J too, so it changes the flops, not the bytes). With the matrix-free path
(products instead of J) the sharded rows cost one all-reduce of an n-vector per :math:`J^\top w`, like a DDP
backward, and no J moves at all.

Data-parallel losses are averaged, as ``DistributedDataParallel`` averages gradients: with equal shard sizes and
each rank's loss the mean over its shard, the average is the mean over the union. (For unequal shards, scale
each rank's loss by its share of the global batch times P.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._jacobian import PointwiseConstraints

__all__ = ["RankGroup", "Sharded", "gram_block_rows", "strip_sharded"]


class Sharded:
    """Marks the constraints a closure returns as this rank's own rows.

    ``return loss, Sharded(c)`` (or ``Sharded(c), J`` with ``J`` this rank's rows, or
    ``Sharded(PointwiseConstraints(...))``): the step uses the rows of all ranks, in rank order, as if one
    process had returned their concatenation. A plain ``c`` means the rows are *replicated*: every rank returns
    the same c (and J), which the step checks. Constraints shared by all ranks can join a sharded set by being
    returned on one rank only (say rank 0, ahead of its own rows). Each rank may own any number of rows,
    zero included.
    """

    __slots__ = ("c",)

    def __init__(self, c: Tensor | PointwiseConstraints) -> None:
        if not isinstance(c, (Tensor, PointwiseConstraints)):
            raise TypeError(f"Sharded wraps a 1-D tensor or PointwiseConstraints; got {type(c).__name__}")
        self.c = c

    def __repr__(self) -> str:
        return f"Sharded({self.c!r})"


def strip_sharded(out: Any) -> tuple[Any, bool]:
    """A closure's output with a :class:`Sharded` marker replaced by what it wraps, and whether there was one."""
    if isinstance(out, (tuple, list)) and len(out) >= 2 and isinstance(out[1], Sharded):
        return (out[0], out[1].c, *out[2:]), True
    return out, False


def _ring_all_reduce_bytes(nbytes: int, world: int) -> int:
    return 2 * (world - 1) * nbytes // world


class RankGroup:
    """The ranks of one process group, the collectives a step uses, and the bytes they send.

    ``sent_bytes`` accumulates what this rank sent, estimated for ring algorithms (see the module docstring);
    ``calls`` counts collectives. Small control vectors travel on the CPU with the gloo backend and on the
    parameters' device otherwise (NCCL needs CUDA tensors).
    """

    def __init__(self, group: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process_group")
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.sent_bytes = 0
        self.calls = 0

    def control_device(self, like: torch.device) -> torch.device:
        """Where small control vectors (the agreement) live for this backend."""
        return torch.device("cpu") if self.backend == "gloo" else like

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _count(self, nbytes: int) -> None:
        self.sent_bytes += nbytes
        self.calls += 1

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, t: Tensor, op: Any = None) -> Tensor:
        """In-place all-reduce (sum by default)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        self._count(_ring_all_reduce_bytes(t.numel() * t.element_size(), self.world))
        return t

    def average_(self, flat: Tensor) -> Tensor:
        """In place: the mean over ranks of ``flat`` (one all-reduce). Every rank receives the same bits."""
        return self.all_reduce_(flat).div_(self.world)

    def broadcast_(self, t: Tensor, src: int) -> Tensor:
        if self.world > 1:
            dist.broadcast(t, src=self._global(src), group=self.group)
        self._count(t.numel() * t.element_size() if src == self.rank else 0)
        return t

    def gather_rows(self, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """All-gather of row blocks of different heights: rank r contributes ``rows`` ``[counts[r], k]``; every
        rank gets their concatenation in rank order, ``[sum(counts), k]``.

        gloo's all-gather needs equal shapes, so blocks are zero-padded to the largest height: the padding is
        sent too, which costs nothing for balanced shards."""
        if rows.shape[0] != counts[self.rank]:
            raise ValueError(f"rank {self.rank}: {rows.shape[0]} rows but the agreed count is {counts[self.rank]}")
        height = max(counts)
        if self.world == 1 or height == 0:
            self._count(0)
            return rows
        tail = rows.shape[1:]
        if rows.shape[0] == height:
            local = rows.contiguous()
        else:
            local = rows.new_zeros((height, *tail))
            local[: rows.shape[0]] = rows
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        self._count((self.world - 1) * local.numel() * local.element_size())
        if all(k == height for k in counts):
            return torch.cat(parts)
        return torch.cat([p[:k] for p, k in zip(parts, counts)])

    def gather_constraints(self, c: Tensor, J: Tensor | None, counts: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """The sharded rows of every rank: ``(c, J)`` of all ranks in rank order, in one all-gather of
        ``[J_r | c_r]`` when c and J share a dtype (two otherwise; J ``None``: c alone)."""
        if J is None:
            return self.gather_rows(c.unsqueeze(1), counts).squeeze(1), None
        if c.dtype == J.dtype:
            both = self.gather_rows(torch.cat([J, c.unsqueeze(1)], dim=1), counts)
            return both[:, -1].contiguous(), both[:, :-1]
        return self.gather_rows(c.unsqueeze(1), counts).squeeze(1), self.gather_rows(J, counts)


def gram_block_rows(group: RankGroup, J: Tensor, counts: Sequence[int], weight: Tensor | None = None) -> Tensor:
    r"""The float64 Gram matrix :math:`G = JWJ^\top` of the assembled J, each rank forming only its block row
    :math:`G_{r,:} = J_rWJ^\top` (:math:`m_r m n` flops instead of :math:`m^2 n`) and all-gathering the block
    rows (:math:`8(P-1)\max_r m_r\, m` bytes sent per rank).

    ``J`` is the assembled ``[m, n]`` matrix whose rows ``counts[r]`` at offset :math:`\sum_{s<r}` counts[s]
    belong to rank r. The block rows are computed by :func:`sqpoptim._linalg.gram`'s kernel, so each entry is
    the one the full product gives up to the order of float64 additions; G is symmetrised from the lower
    triangle so that every rank factors the same symmetric matrix."""
    from ._linalg import _GRAM_CHUNK_BYTES

    m, n = J.shape
    start = sum(counts[: group.rank])
    mine = J[start : start + counts[group.rank]]
    block = J.new_zeros((mine.shape[0], m), dtype=torch.float64)
    chunk = max(1, _GRAM_CHUNK_BYTES // (8 * max(m, 1)))
    for lo in range(0, n, chunk):
        A = mine[:, lo : lo + chunk].to(torch.float64)
        B = J[:, lo : lo + chunk].to(torch.float64)
        block.addmm_(A if weight is None else A * weight[lo : lo + chunk].to(torch.float64), B.T)
    G = group.gather_rows(block, counts)
    return torch.tril(G) + torch.tril(G, -1).T
