"""The generative models by name: recipe key ``model`` (``"vae"``, the default, or ``"diffusion"``)."""

from __future__ import annotations

from ..errors import ConfigError
from .diffusion import build_diffusion, diffusion_options
from .vae import build_vae


def vae_options(data_dim: int = 0) -> dict:
    """The VAE takes no ``[model_options]``: its keys are the recipe's own (hidden_dim, activation, prior, ...)."""
    return {}


#: recipe key ``model`` -> (builder(recipe, data_dim), the ``[model_options]`` factory with their defaults)
MODELS = {"vae": (build_vae, vae_options), "diffusion": (build_diffusion, diffusion_options)}

#: estimators the diffusion model trains with: its time-sampled pair is an objective, not a model to dream from
DIFFUSION_ESTIMATORS = ("sgvb-a", "sgvb-b")


def build_model(recipe, data_dim: int):
    """The model/guide container a recipe describes: a :class:`~pyro_aevb.generative.vae.VAE` or a
    :class:`~pyro_aevb.generative.diffusion.Diffusion`."""
    if recipe.model not in MODELS:
        raise ConfigError(f"unknown model '{recipe.model}'; valid models: {', '.join(MODELS)}")
    return MODELS[recipe.model][0](recipe, data_dim)
