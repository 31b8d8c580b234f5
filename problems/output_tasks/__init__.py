"""Output-constraint tasks: the model's outputs must satisfy ``h(x, y) = 0`` and ``g(x, y) <= 0`` per input.

* :mod:`~problems.output_tasks.task` — :class:`LayerProblem` (the :class:`~problems.Problem` interface plus
  what an output layer needs) and :class:`LayeredModel` (a backbone followed by a layer);
* :mod:`~problems.output_tasks.regression` — supervised regression with output constraints (shared by the
  KKT-Hardnet tasks);
* :mod:`~problems.output_tasks.enforce_fitting`, :mod:`~problems.output_tasks.nonconvex` — the ENFORCE tasks;
* :mod:`~problems.output_tasks.mpc` — HardNet++'s learned MPC;
* :mod:`~problems.output_tasks.kkt_examples`, :mod:`~problems.output_tasks.pooling` — the KKT-Hardnet tasks.

Their reference optima come from :mod:`problems.reference`.
"""
