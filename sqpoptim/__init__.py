"""sqpoptim: training neural networks under hard constraints.

Optimizers (all ``torch.optim.Optimizer`` subclasses; ``step(closure)`` with the closure returning
``(loss, c)`` or ``(loss, c, J)`` for equalities c = 0, or ``(loss, Constraints(eq=c_E, ineq=c_I))`` for
equalities and inequalities c_I <= 0):

* :class:`ProjectedAdamSQP` — projected stochastic Adam SQP (the SQP paper's SQP-Adam(con)).
* :class:`ProjectedHeavyBallSQP` — projected stochastic heavy-ball SQP (SQP-Heavyball(con)).
* :class:`StochasticSQP` — stochastic SQP, fixed or adaptive (Berahas et al. 2021) step sizes.
* Baselines: :class:`ConstrainedAdam` (Adam(con)), :class:`AdamUnc` (Adam(unc)), :class:`PenaltyAdam`,
  :class:`PrimalDual`.

Every optimizer takes ``process_group=`` to step as one across the ranks of a ``torch.distributed`` group: losses
and gradients averaged, constraints replicated or :class:`Sharded` over the ranks, replicas kept bit-identical
(see :mod:`sqpoptim._exchange`).

Output layers that enforce constraints on a network's predictions live in :mod:`sqpoptim.layers`.
:func:`fast_float32_products` computes float32 matrix products at bfloat16 speed where that keeps float32's
accuracy (CPUs with native bfloat16 arithmetic).
"""

from . import layers
from ._constraints import Constraints
from ._distributed import Sharded
from ._fast_float32 import fast_float32_products
from ._jacobian import JacobianFallbackWarning, PointwiseConstraints
from ._optimizer import ConstrainedOptimizer, InfeasibilityWarning, RankDeficiencyWarning
from .adam import ProjectedAdamSQP, adam_sqp_direction
from .baselines import AdamUnc, ConstrainedAdam, PenaltyAdam
from .heavy_ball import ProjectedHeavyBallSQP, heavy_ball_sqp_direction
from .primal_dual import PrimalDual
from .sqp import StochasticSQP, adaptive_step_size, sqp_direction

__version__ = "0.1.0"

__all__ = [
    "AdamUnc",
    "ConstrainedAdam",
    "ConstrainedOptimizer",
    "Constraints",
    "InfeasibilityWarning",
    "JacobianFallbackWarning",
    "PenaltyAdam",
    "PointwiseConstraints",
    "PrimalDual",
    "ProjectedAdamSQP",
    "ProjectedHeavyBallSQP",
    "RankDeficiencyWarning",
    "Sharded",
    "StochasticSQP",
    "adam_sqp_direction",
    "adaptive_step_size",
    "fast_float32_products",
    "heavy_ball_sqp_direction",
    "layers",
    "sqp_direction",
]
