#!/usr/bin/env bash
# The layer papers' headline tables with the fast layers (implicit gradients, globalised iterations):
# HardNet++ Table I: the paper's data (800/100/100 initial states), batch 16, 5,000 iterations (the paper states
# no budget); the layer's defaults (Levenberg-Marquardt to 1e-6, implicit gradient), beside the MLP and the
# soft penalty.
seeds mpc paper 5000 hardnet-pp,adam-unc,soft mini
# ENFORCE Table 3 (C3: 200 variables, 150 quadratic equalities): the paper's program at size small (2,000
# training / 100 test instances), batch 200, 2,000 iterations (4.8 % of the paper's 42,000: one ENFORCE step from
# an untrained backbone costs 1-4 s on this CPU, BENCHMARKS.md), beside the MLP and the soft penalty.
seeds nonconvex_quadratic small 2000 enforce,adam-unc,soft mini
# KKT-Hardnet on C1 (ENFORCE's function fitting, full batch, 5,000 epochs = 10 % of the paper's): no NaN.
seeds enforce_fitting small 5000 kkt-hardnet full
# KKT-Hardnet Table 6: the paper's budget (1,200 epochs of mini-batches of 64 = 30,000 iterations) and warm
# start (eta = 75), beside the MLP and the PINN (omega = 1).
seeds pooling paper 30000 kkt-hardnet:eta=75,adam-unc,soft mini
