r"""A step's inputs: the closure's output read against the contract — on this rank, or every rank's exchanged
with a process group — and the constraint Jacobian, given by the closure (whole or by parts) or formed.

:class:`InputReader` owns the Jacobian path (:mod:`sqpoptim._jacobian_path`: per-sample layer factors, an
explicit matrix or autograd products, chosen once and re-verified) and the process group. It is the only place
that calls the closure: once per step in :meth:`InputReader.read`, and for methods that need the closure at
nearby points (the adaptive step rule's Lipschitz estimates) in :meth:`InputReader.evaluate`.

With a process group each rank parses its own closure and forms its own g and J, then the ranks exchange them
(:mod:`sqpoptim._exchange`); whatever fails on one rank — a param group's settings, the closure, its parsing,
g, J — is raised on every rank, and nothing has changed when it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._agreement import LocalInputs
from ._closure import StepInputs
from ._distributed import RankGroup, strip_sharded
from ._exchange import exchange, form_locally
from ._gradient import flat_gradient
from ._jacobian import jacobian
from ._jacobian_path import JacobianPath
from ._layout import FlatLayout
from ._warnings import warn_user

__all__ = ["InputReader", "ReadInputs"]

# the optimizer's parser of a closure's output: (inputs, the c that ``step`` returns)
Parse = Callable[[Any, FlatLayout], tuple[StepInputs, Tensor]]


@dataclass
class ReadInputs:
    """What :meth:`InputReader.read` found: the parsed inputs, the ``c`` that ``step`` returns, the closure's raw
    output (``None`` with a process group), the layer recording (for the Jacobian path) and g when the exchange
    already formed it."""

    inputs: StepInputs
    c_out: Tensor
    raw: Any
    recorder: Any
    g: Tensor | None


class InputReader:
    """Reads the closure and forms J for one optimizer (see the module docstring)."""

    def __init__(self, jacobian_mode: str, chunk_size: int | None, process_group: Any) -> None:
        self.path = JacobianPath(jacobian_mode, chunk_size)  # validates jacobian_mode
        self.jacobian_mode = jacobian_mode
        self.chunk_size = chunk_size
        self.ranks = None if process_group is None else RankGroup(process_group)
        self._warned = [False]

    def read(
        self, closure: Callable[[], Any], layout: FlatLayout, *, check: Callable[[], None], parse: Parse, record: bool
    ) -> ReadInputs:
        """Call the closure once (``check``: the param groups' settings, first), parse its output; with a process
        group, exchange every rank's inputs. ``record``: let the Jacobian path record the layers' inputs."""
        if self.ranks is not None:
            inputs, c_out, g = self._exchanged(closure, layout, check=check, parse=parse)
            return ReadInputs(inputs, c_out, None, None, g)
        check()
        with self.path.recording(record) as recorder:
            out = closure()
        raw = strip_sharded(out)[0]
        inputs, c_out = parse(raw, layout)
        return ReadInputs(inputs, c_out, raw, recorder, None)

    def given_jacobian(self, inputs: StepInputs, layout: FlatLayout) -> Tensor | None:
        """J when the closure supplied it, whole or by parts (a :class:`~sqpoptim.Constraints` with only one of
        ``eq_jac``/``ineq_jac``: the other part formed from its values here); ``None``: the step's Jacobian path
        forms it."""
        if inputs.J_parts is None:
            return inputs.J
        m_eq = inputs.c.shape[0] - inputs.num_ineq
        J_eq, J_in = inputs.J_parts
        J_eq = J_eq if J_eq is not None else self.form_jacobian(inputs.c[:m_eq], layout)
        J_in = J_in if J_in is not None else self.form_jacobian(inputs.c[m_eq:], layout)
        return torch.cat([J_eq, J_in])

    def form_jacobian(self, c: Tensor, layout: FlatLayout) -> Tensor:
        """The explicit ``[m, n]`` Jacobian of ``c`` by the batched or looped backward (:mod:`sqpoptim._jacobian`)."""
        return jacobian(
            c, layout.params, layout.n, mode=self.jacobian_mode, chunk_size=self.chunk_size, warned=self._warned
        )

    def evaluate(
        self, closure: Callable[[], Any], layout: FlatLayout, *, check: Callable[[], None], parse: Parse
    ) -> tuple[StepInputs, Tensor, Tensor]:
        """``(inputs, g, J)`` at the current parameters — every rank's, exchanged, with a process group — for
        extra evaluations of the closure within a step (the inputs as parsed, J formed when not given)."""
        if self.ranks is not None:
            inputs, _, g = self._exchanged(closure, layout, check=check, parse=parse)
            J = inputs.J if inputs.J is not None else self.form_jacobian(inputs.c, layout)
            return inputs, g, J
        inputs, _ = parse(strip_sharded(closure())[0], layout)
        J = self.given_jacobian(inputs, layout)
        J = self.form_jacobian(inputs.c, layout) if J is None else J
        return inputs, flat_gradient(inputs.loss, layout), J

    def _exchanged(
        self, closure: Callable[[], Any], layout: FlatLayout, *, check: Callable[[], None], parse: Parse
    ) -> tuple[StepInputs, Tensor, Tensor]:
        """This rank's loss, c, g and J from its closure, then the exchange that gives every rank the same ones:
        ``(inputs, c to return, g)`` with the mean loss and gradient and the rows of every rank."""
        assert self.ranks is not None

        def form() -> LocalInputs:
            check()
            out, sharded = strip_sharded(closure())
            inputs, c_out = parse(out, layout)
            if inputs.num_ineq:
                raise ValueError("inequality constraints are not supported across several processes (process_group)")
            uses_c = inputs.c.shape[0] == c_out.shape[0]  # Adam(unc) only reports c
            m = inputs.c.shape[0]
            g = flat_gradient(inputs.loss, layout, retain_graph=inputs.J is None and m > 0)
            J = inputs.J if inputs.J is not None or not uses_c else self.form_jacobian(inputs.c, layout)
            return LocalInputs(inputs.loss.detach(), c_out, g, J, sharded, uses_c)

        local, error = form_locally(form)
        shared = exchange(self.ranks, local, error, layout.params, layout.n)
        assert local is not None
        if not local.uses_c:
            return StepInputs(shared.loss, shared.c.new_zeros(0), None), shared.c, shared.g
        if shared.c.shape[0] > layout.n:  # sharded rows: only now is m known (the same decision on every rank)
            raise ValueError(
                f"more constraints than parameters: m = {shared.c.shape[0]} > n = {layout.n} over all ranks; "
                "the linearised constraints J d = -c cannot have full row rank"
            )
        return StepInputs(shared.loss, shared.c, shared.J), shared.c, shared.g


def warn_if_distributed(name: str) -> None:
    """Without a process group every rank steps on its own: say so where that is likely a mistake."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            warn_user(
                f"torch.distributed is initialised with {world} ranks but {name} was given no process_group: "
                "each rank steps on its own gradient and constraints, and replicas drift apart (wrapping the "
                "model in DistributedDataParallel does not average the gradients this optimizer forms); pass "
                "process_group=torch.distributed.group.WORLD to step together",
                UserWarning,
            )
