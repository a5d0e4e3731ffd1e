"""Every estimator trains a model/guide pair written here, not the VAE class: other argument names, no
``num_data`` or ``beta`` keyword, N/M only in the plate. The objectives read N/M from the plate's scale
and pass the arguments through, as Pyro's ELBOs do.

The model is one-dimensional factor analysis, z_i ~ N(0, 1), x_i | z_i ~ N(w z_i, 1): its marginal is
N(0, w^2 + 1), so maximum likelihood gives w^2 = var(x) - 1 in closed form, and the guide family
q(z|x) = N(a x, s^2) holds the exact posterior. Every estimator here (the wake-sleep family included)
has that maximum as its fixed point.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pyro
import pyro.distributions as dist

from pyro_aevb.infer.registry import estimator_parameters, make_estimator

N, M, W_TRUE = 2000, 100, 2.0


class FactorAnalysis(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.a = nn.Parameter(torch.tensor(0.0))
        self.log_s = nn.Parameter(torch.tensor(0.0))

    def _rows(self, observations, total):
        return pyro.plate("rows", total or observations.shape[0], subsample=torch.arange(observations.shape[0]))

    def model(self, observations, total=None):
        with self._rows(observations, total):
            code = pyro.sample("code", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(self.w * code, 1.0).to_event(1), obs=observations)

    def guide(self, observations, total=None):
        with self._rows(observations, total):
            pyro.sample("code", dist.Normal(self.a * observations, self.log_s.exp()).to_event(1))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors of a hundred numbers: a second thread only costs here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, 1, generator=gen)
    return W_TRUE * z + torch.randn(N, 1, generator=gen)


ESTIMATORS = {  # name -> (options, steps, tolerance on |w|)
    "sgvb-a": ({}, 600, 0.1),
    "sgvb-b": ({}, 600, 0.1),
    "iwae": ({"num_particles": 5}, 600, 0.1),
    "wake-sleep": ({}, 600, 0.1),
    "reweighted-wake-sleep": ({"num_particles": 5}, 600, 0.1),
    "score-function": ({"baseline": "decaying-average", "num_particles": 5}, 1500, 0.15),
    "mcem": ({"leapfrog_steps": 5}, 600, 0.1),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_each_estimator_finds_the_maximum_likelihood_of_a_pair_written_here(name):
    options, steps, tolerance = ESTIMATORS[name]
    pyro.set_rng_seed(0)
    x = _data()
    w_ml = math.sqrt(x.var().item() - 1.0)
    pair = FactorAnalysis()
    estimator = make_estimator(name, **options)
    params = list(pair.parameters()) + estimator_parameters(estimator)
    optimizer = torch.optim.Adam(params, lr=0.03)
    extra = getattr(estimator, "needs_indices", False)
    for step in range(steps):
        idx = torch.randint(N, (M,))
        optimizer.zero_grad()
        kwargs = {"indices": idx} if extra else {}
        if hasattr(estimator, "differentiable_loss"):
            estimator.differentiable_loss(pair.model, pair.guide, x[idx], total=N, **kwargs).backward()
        else:
            estimator.loss_and_grads(pair.model, pair.guide, x[idx], total=N, **kwargs)
        optimizer.step()
    assert abs(pair.w.abs().item() - w_ml) < tolerance, (pair.w.item(), w_ml)


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n != "mcem"])
def test_each_estimator_reads_n_over_m_from_the_plate(name):
    """The same draws at N = 20 M and N = M: the loss scales by exactly N/M, with no num_data keyword."""
    options = ESTIMATORS[name][0]
    x, pair = _data()[:M], FactorAnalysis()
    losses = []
    for total in (20 * M, M):
        pyro.set_rng_seed(1)
        losses.append(make_estimator(name, **options).loss(pair.model, pair.guide, x, total=total))
    assert losses[0] == pytest.approx(20 * losses[1], rel=1e-6)
