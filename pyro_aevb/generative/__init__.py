"""The generative models: p(z) p(x|z) with the amortized q(z|x), as Pyro model/guide pairs.

Imports only :mod:`pyro_aevb.errors` from this package.
"""
