r"""Constraint-enforcing output layers: map a network's raw output onto :math:`\{h = 0,\ b_l \le g \le b_u\}`.

All layers take one :class:`OutputConstraints` (or a bare equality callable ``h(x, y)``), are ``nn.Module``\ s
without side effects in ``forward``, and return diagnostics as values from ``project``::

    from sqpoptim.layers import EnforceProjection, OutputConstraints

    layer = EnforceProjection(OutputConstraints(h=lambda x, y: y.sum(-1, keepdim=True) - x))
    y = layer(x, net(x))                   # [B, n], feasible to the layer's tolerance
    res = layer.project(x, net(x))         # res.y, res.iterations, res.residual, res.converged, ...

* :class:`HardNetAffine` — HardNet's closed form for affine constraints (one step, exact).
* :class:`EnforceProjection` — ENFORCE's AdaNP (repeated NP steps, equalities); :func:`adanp_activation` is
  the paper's activation rule for the training loop.
* :class:`HardNetPP` — HardNet++ (equalities and two-sided inequalities): a globalised Levenberg–Marquardt
  iteration by default (``method="lm"``), the paper's damped linearisations with ``method="paper"``.
* :class:`KKTHardNet` — Newton on the projection's KKT system with Fischer–Burmeister slacks, globalised by
  default (``method="newton"``), the paper's iteration with ``method="paper"``.

The iterative layers differentiate at their output by default (``gradient="implicit"``: one linear solve per
backward, no graph of the iterations); ``gradient="unrolled"`` backpropagates through every iteration, as the
papers train. With only ``h``/``g`` given, Jacobians come from :mod:`torch.func` on the batched function
(forward or reverse mode, whichever takes fewer passes), and ENFORCE and HardNet++ form them once per call and
update them by Broyden's rule (``jacobian="auto"``); ``h_jac``/``g_jac`` give cheaper exact ones.
"""

from ._base import ProjectionResult, ProjectionWarning
from ._constraints import ConstraintEvaluation, OutputConstraints
from ._enforce import EnforceProjection, adanp, adanp_activation, np_step
from ._hardnet import HardNetAffine, parallel_step
from ._hardnet_pp import HardNetPP, hardnet_pp
from ._kkt import KKTHardNet

__all__ = [
    "ConstraintEvaluation",
    "EnforceProjection",
    "HardNetAffine",
    "HardNetPP",
    "KKTHardNet",
    "OutputConstraints",
    "ProjectionResult",
    "ProjectionWarning",
    "adanp",
    "adanp_activation",
    "hardnet_pp",
    "np_step",
    "parallel_step",
]
