r"""From each rank's own step inputs to the inputs of the step every rank takes.

Each rank forms its own :math:`(f_r, c_r, g_r, J_r)` from its closure; then, in this order,

1. the agreement round (:func:`sqpoptim._agreement.agree`): every rank refuses together or goes on together;
2. one all-reduce of :math:`[g_r;\ f_r]` divided by P: the averaged gradient and loss;
3. for sharded constraints, one all-gather of :math:`[J_r \mid c_r]`: all rows in rank order (replicated
   constraints are already the same everywhere, which the agreement checked).

After that every rank holds bit-identical :math:`(f, c, g, J)` and computes the same step. Nothing before the
agreement changes any state, so a refusal leaves every rank as it was.

Deviations from a single process. A step rejected by the damping (:mod:`sqpoptim._damping`) has formed g and J
first (one process skips them), because the judgement needs every rank's c. The step reads the agreement on
the host, so with a process group ``sync_free`` saves the other host reads but not this one, and non-finite
inputs raise at once on every rank instead of being reported later. The loss is averaged in the parameters'
dtype. The gradient is formed after the closure rather than overlapped with its backward pass (as
``DistributedDataParallel`` does with its buckets): overlapping needs a second agreement before the
all-reduce starts, and on a CPU rank with one thread there is nothing to overlap with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ._agreement import LocalInputs, agree
from ._distributed import RankGroup

__all__ = ["GlobalInputs", "exchange", "form_locally"]


@dataclass
class GlobalInputs:
    """The step's inputs, the same on every rank: mean loss, all constraint rows, mean gradient, all rows of J
    (``None`` when the constraints are not used or J is to be formed), and each rank's row count."""

    loss: Tensor
    c: Tensor
    g: Tensor
    J: Tensor | None
    counts: list[int]


def form_locally(form: Callable[[], LocalInputs]) -> tuple[LocalInputs | None, Exception | None]:
    """Run this rank's part of the step, keeping an exception for the agreement instead of raising it: a rank
    that raised alone would leave the others waiting in the next collective."""
    try:
        return form(), None
    except Exception as exc:  # re-raised on every rank by the agreement
        return None, exc


def exchange(
    group: RankGroup, local: LocalInputs | None, error: Exception | None, params: Sequence[Tensor], n: int
) -> GlobalInputs:
    """Steps 1-3 of the module docstring. Raises the agreed error on every rank, or returns the global inputs."""
    agreement = agree(group, local, error, params, n)
    assert local is not None  # agree raised otherwise
    flat = _with_loss(local.g, local.loss)
    group.average_(flat)
    g, loss = flat[:-1], flat[-1].to(local.loss.dtype)
    c, J = local.c, local.J if local.uses_c else None
    if local.sharded:
        c, J = group.gather_constraints(c, J, agreement.counts)
    return GlobalInputs(loss, c, g, J, agreement.counts)


def _with_loss(g: Tensor, loss: Tensor) -> Tensor:
    """``[g; f]`` in g's dtype: the buffer of the one all-reduce."""
    out = g.new_empty(g.shape[0] + 1)
    out[:-1] = g
    out[-1] = loss.detach().reshape(())
    return out
