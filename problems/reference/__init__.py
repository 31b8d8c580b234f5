"""Reference solvers: the oracles the tasks' data and metrics are built from, kept apart from the tasks.

* :mod:`~problems.reference.burgers_solver` — periodic viscous Burgers, Fourier pseudo-spectral with Radau;
* :mod:`~problems.reference.darcy_solver` — Gaussian random fields and a finite-volume Darcy solver (and the
  same operator in torch, so a prediction's residual is the solver's);
* :mod:`~problems.reference.mpc_solver` — the learned MPC's convex QCQP (SLSQP polished by Newton, KKT check);
* :mod:`~problems.reference.nlp_solver` — local optima of the nonconvex programs (scipy's SLSQP and
  trust-constr, several starts).

Each is tested against an independent solution (closed forms, manufactured solutions, other scipy solvers).
"""
