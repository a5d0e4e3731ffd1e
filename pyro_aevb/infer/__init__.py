"""The inference objectives: the estimator registry, the shared trace utility, the poutine handlers,
and one module per objective (SGVB A/B, wake-sleep, reweighted wake-sleep, score function, IWAE, MCEM).

Imports only :mod:`pyro_aevb.errors` from this package: the objectives know nothing of the VAE.
"""
