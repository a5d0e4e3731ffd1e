"""Evaluation of a trained model/guide pair: per-datapoint bounds, the importance-sampled marginal
likelihood, the paper's Appendix D estimator, PSIS and ArviZ diagnostics, the amortization gap.

Imports :mod:`pyro_aevb.infer` and :mod:`pyro_aevb.errors` from this package.
"""
