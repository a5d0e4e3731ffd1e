"""pyro-aevb: Auto-Encoding Variational Bayes (Kingma & Welling 2013) as Pyro model/guide pairs.

    >>> import pyro, pyro_aevb
    >>> vae = pyro_aevb.load("runs/default")           # a trained run directory
    >>> pyro.infer.TraceMeanField_ELBO().loss(vae.model, vae.guide, x)

The names below are imported on first use (PEP 562), so ``import pyro_aevb`` loads
neither PyTorch's heavy parts nor matplotlib nor ``pyro.infer.mcmc`` until asked.
"""

from __future__ import annotations

import importlib

from .version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "AEVBError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "Recipe": "config",
    "load_recipe": "config",
    "ESTIMATORS": "infer.registry",
    "kl_status": "infer.registry",
    "make_estimator": "infer.registry",
    "PRIORS": "generative.priors",
    "VAE": "generative.vae",
    "build_vae": "generative.vae",
    "Diffusion": "generative.diffusion",
    "build_model": "generative.registry",
    "average_bound": "evaluation.bounds",
    "log_likelihood": "evaluation.marginal_likelihood",
    "hmc_log_likelihood": "evaluation.appendix_d",
    "amortization_gap": "evaluation.amortization",
    "train": "training.loop",
    "load": "training.run_directory",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
