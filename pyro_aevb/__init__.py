"""pyro-aevb: Auto-Encoding Variational Bayes (Kingma & Welling 2013) as Pyro model/guide pairs.

    >>> import pyro_aevb
    >>> vae = pyro_aevb.load("runs/default")           # a trained run directory
    >>> pyro.infer.TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
"""

__version__ = "0.1.0"

from .config import Recipe, load_recipe  # noqa: E402
from .errors import AEVBError, CheckpointError, ConfigError, DataError  # noqa: E402
from .estimators import ESTIMATORS, kl_status, make_estimator  # noqa: E402
from .priors import PRIORS  # noqa: E402
from .run import load  # noqa: E402
from .vae import VAE, build_vae  # noqa: E402

__all__ = [
    "AEVBError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ESTIMATORS",
    "PRIORS",
    "Recipe",
    "VAE",
    "build_vae",
    "kl_status",
    "load",
    "load_recipe",
    "make_estimator",
]
