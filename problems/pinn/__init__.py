"""Physics-informed tasks: the constraints are residuals of a differential equation at fixed points.

* :mod:`~problems.pinn.spring` — the damped spring (an ODE; a tanh MLP);
* :mod:`~problems.pinn.chemistry` — a linear reaction network with a mass balance (an ODE system);
* :mod:`~problems.pinn.burgers` — viscous Burgers over a family of initial conditions (a PDE; operator learning);
* :mod:`~problems.pinn.darcy` — Darcy flow with a Fourier neural operator (a PDE on a grid);
* :mod:`~problems.pinn.manifold_toy` — outputs on the unit circle (the penalty-vs-Lagrangian toy; no
  derivatives, but trained like the others: an objective, point constraints on the model, mini-batches).

Their reference solutions come from :mod:`problems.reference` (Burgers, Darcy) or closed forms (spring,
chemistry, manifold toy).
"""
