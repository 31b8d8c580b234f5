"""The ranks' agreement before a distributed step: refuse together, or go on together.

A distributed step must not let one rank's failure leave the others waiting in a collective, nor let one rank
apply a step the others refused. So each rank first does everything that can fail locally (the closure, its
parsing, the gradient and the Jacobian) and only then enters one small all-reduce of int64 flags and sizes,
before any large collective and before anything is applied. From the reduced vector every rank decides the same
thing: go on (with everyone's row counts, for the sharded all-gather), or raise the same exception, with the
same message, leaving parameters and optimizer state untouched. When a rank raised, its exception's message is
broadcast (a second, small collective taken only then) so that every rank raises it too.

What is agreed (one all-reduce, MAX, of ``12 + 2P`` int64):

* the lowest rank whose local work raised;
* n and the parameter dtype (a rank with another model would make the collectives mismatch);
* whether the constraints are sharded (:class:`~sqpoptim._distributed.Sharded`) or replicated;
* a checksum of the parameters' bits: replicas that drifted apart (different initialisations, a step taken on
  one rank only) are refused rather than averaged;
* for replicated constraints, each rank's row count and a checksum of c's and J's bits: replicated rows must be
  the same on every rank (the check costs one integer pass over J, no float work);
* per rank, its row count and which of (loss, c, g, J) hold NaN or inf, so the error names the rank.

Checksums add the bits of a tensor as int64 words weighted by their position (:func:`checksum`), so that a
changed entry or a permutation of rows is caught; they are not cryptographic and need not be.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._distributed import RankGroup

__all__ = ["Agreement", "LocalInputs", "agree", "checksum"]

_QUANTITIES = ("loss", "constraint values c", "gradient", "Jacobian J")
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_MASK = (1 << 62) - 1  # checksums are reduced to 62 bits so that their negation never overflows
_BLOCK = 4096
_MESSAGE_BYTES = 4096
_HEAD = 12  # fixed entries of the agreement vector before the per-rank slots


def checksum(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    r"""An int64 0-d tensor summarising the bits of ``tensors``: :math:`\sum_p (p+1)\,w_p \bmod 2^{62}` over
    the bytes of the tensors, concatenated, read as int64 words :math:`w_p` (a trailing part word as bytes).
    One integer pass (a matrix-vector product on the CPU); on the tensors' device (``device`` when there are
    none), without host synchronisation. Small tensors are concatenated first, so that a model's many biases
    cost one pass, not one each."""
    raws = []
    for t in tensors:
        if t.numel():
            raw = t.detach().contiguous().reshape(-1)
            raw = torch.view_as_real(raw).reshape(-1) if raw.is_complex() else raw
            raws.append(raw.view(torch.uint8))
    dev = raws[0].device if raws else device
    total = torch.zeros((), dtype=torch.int64, device=dev)
    weights = torch.arange(1, _BLOCK + 1, dtype=torch.int64, device=dev)
    offset = 0
    pending: list[Tensor] = []

    def add(raw: Tensor) -> None:
        nonlocal total, offset
        whole = raw.numel() // 8
        words = raw[: whole * 8].view(torch.int64)
        blocks = whole // _BLOCK
        if blocks:
            v = words[: blocks * _BLOCK].view(blocks, _BLOCK)
            within = v @ weights if v.device.type == "cpu" else (v * weights).sum(dim=1)
            starts = torch.arange(blocks, dtype=torch.int64, device=dev) * _BLOCK + offset
            total = total + within.sum() + (v.sum(dim=1) * starts).sum()
        tail = torch.cat([words[blocks * _BLOCK :], raw[whole * 8 :].to(torch.int64)])
        total = total + (tail * weights[: tail.numel()]).sum() + tail.sum() * (offset + blocks * _BLOCK)
        offset += blocks * _BLOCK + tail.numel()

    for raw in raws:
        if raw.numel() < 8 * _BLOCK:
            pending.append(raw)
            continue
        if pending:
            add(torch.cat(pending))
            pending = []
        add(raw)
    if pending:
        add(torch.cat(pending))
    return total & _MASK


def _nonfinite_flags(tensors: Sequence[Tensor | None]) -> list[bool]:
    """Which of ``tensors`` hold a NaN or inf. One fast pass (a sum) each and one host read; a sum that is not
    finite may also come from overflow, so only then the exact elementwise test decides."""
    live = [t.detach() for t in tensors if t is not None and t.numel()]
    if not live:
        return [False] * len(tensors)
    finite = iter(torch.stack([t.sum().to(torch.float64) for t in live]).isfinite().tolist())
    live_iter = iter(live)
    flags = []
    for t in tensors:
        if t is None or t.numel() == 0:
            flags.append(False)
            continue
        x = next(live_iter)
        flags.append(False if next(finite) else not bool(x.isfinite().all()))
    return flags


@dataclass
class LocalInputs:
    """One rank's step inputs before any exchange: its mean loss, constraint rows c, gradient g and, when the
    method uses the constraints (``uses_c``), their Jacobian J. A method that only reports c (Adam(unc)) has
    its rows gathered for the report but neither checked nor used."""

    loss: Tensor
    c: Tensor
    g: Tensor
    J: Tensor | None
    sharded: bool
    uses_c: bool = True


@dataclass
class Agreement:
    """What every rank agreed on: the row count of each rank (all equal for replicated rows)."""

    counts: list[int]


def _exception_class(exc: BaseException) -> type[Exception]:
    """The first builtin class in ``exc``'s hierarchy: what the other ranks can rebuild from a name."""
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins" and issubclass(cls, Exception):
            return cls
    return RuntimeError


def _rebuild(name: str, message: str) -> Exception:
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # builtins with other constructor signatures (UnicodeDecodeError, ...)
            pass
    return RuntimeError(message)


def _share_failure(group: RankGroup, source: int, error: BaseException | None, device: torch.device) -> Exception:
    """Broadcast the failing rank's exception (class name and message) and build it on every rank."""
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if group.rank == source:
        assert error is not None
        text = f"{_exception_class(error).__name__}\n" + (
            f"rank {source} raised in step(): {type(error).__name__}: {error}"
        )
        data = text.encode("utf-8")[:_MESSAGE_BYTES]
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = group.broadcast_(buf.to(device), source)
    name, _, message = bytes(buf.tolist()).rstrip(b"\0").decode("utf-8", errors="replace").partition("\n")
    return _rebuild(name, message)


def agree(
    group: RankGroup, local: LocalInputs | None, error: BaseException | None, params: Sequence[Tensor], n: int
) -> Agreement:
    """The agreement round (see the module docstring). ``local`` is ``None`` exactly when ``error`` is set.

    Returns the agreed row counts, or raises on every rank the same exception; in both cases every rank took
    part in the same collectives."""
    P, r = group.world, group.rank
    device = params[0].device if params else torch.device("cpu")
    ctrl = group.control_device(device)
    dtype = params[0].dtype if params else torch.float32
    code = _DTYPES.index(dtype) + 1 if dtype in _DTYPES else len(_DTYPES) + 1
    head = torch.zeros(_HEAD, dtype=torch.int64, device=ctrl)
    slots = torch.zeros(2 * P, dtype=torch.int64, device=ctrl)
    head[0] = -(r if error is not None else P)
    if local is not None:  # a failing rank leaves the rest zero: the failure is decided first
        head[1], head[2] = n, -n
        head[3], head[4] = code, -code
        head[5], head[6] = int(local.sharded), -int(local.sharded)
        rows = [] if (local.sharded or not local.uses_c) else [local.c] + ([] if local.J is None else [local.J])
        s = torch.stack([checksum(params, device), checksum(rows, device)]).to(ctrl)
        head[7:11] = torch.stack([s[0], -s[0], s[1], -s[1]])
        slots[r] = local.c.shape[0]
        bad = _nonfinite_flags([local.loss, local.c, local.g, local.J])
        slots[P + r] = sum(int(b) << i for i, b in enumerate(bad))
    vec = torch.cat([head, slots])
    group.all_reduce_(vec, op=dist.ReduceOp.MAX)
    v = vec.tolist()  # the one host read of the agreement
    first_failure = -v[0]
    if first_failure < P:
        raise _share_failure(group, first_failure, error, ctrl)
    assert local is not None
    counts = v[_HEAD : _HEAD + P]
    if v[1] != -v[2] or v[3] != -v[4]:
        raise ValueError(
            "the ranks' parameters differ in size or dtype (n from "
            f"{-v[2]} to {v[1]}); every rank must step the same model"
        )
    if v[5] != -v[6]:
        raise ValueError(
            "some ranks returned Sharded(c) and others a plain c; the closure must say the same on every rank"
        )
    if v[7] != -v[8]:
        raise RuntimeError(
            "the parameters are not identical on all ranks before this step (different initialisation, or a step "
            "taken on some ranks only); broadcast them from one rank, e.g. "
            "`for p in model.parameters(): torch.distributed.broadcast(p.data, 0)`, or load the same checkpoint"
        )
    flags = v[_HEAD + P :]
    if any(flags):
        where = [
            f"the {name} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            for i, name in enumerate(_QUANTITIES)
            if (ranks := [s for s in range(P) if flags[s] >> i & 1])
        ]
        raise FloatingPointError(
            f"non-finite values (NaN or inf) in {'; '.join(where)} at this step; the step was refused on every "
            "rank and the parameters and optimizer state are unchanged"
        )
    if not local.sharded and local.uses_c:
        if min(counts) != max(counts):
            raise ValueError(
                f"replicated constraints: the ranks returned {min(counts)} to {max(counts)} rows; return "
                "Sharded(c) when each rank has its own rows"
            )
        if v[9] != -v[10]:
            raise ValueError(
                "replicated constraints differ across ranks (c or J is not bit-identical on every rank); compute "
                "them from the same points on every rank, or return Sharded(c) when each rank has its own rows"
            )
    return Agreement(counts)
