"""Hessian-guided mixed precision: sensitivities of every linear under every candidate format from
one calibration pass (cached), inter-block dependencies measured on a probe set, a multiple-choice
knapsack under the user's budget, and the build and measurement of the chosen plan."""
