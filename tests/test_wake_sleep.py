r"""Wake-sleep (pyro_aevb.infer.wake_sleep) against closed forms of the linear-Gaussian model.

The guide is q(z|x) = N(A x + c, diag s^2) with parameters (A, c, log s). The
sleep phase draws (z, x) from p(z) p(x|z), z ~ N(0, I), x = W z + b + sigma eps,
so E[x] = b, Cov(x) = C = W W^T + sigma^2 I, E[z x^T] = W^T, and with
mu = A x + c:

.. math::

    E[\partial_c \log q] = -(A b + c) / s^2,
    \qquad
    E[\partial_A \log q] = \operatorname{diag}(s^{-2})\,[W^T - A (C + b b^T) - c\, b^T],

    E[\partial_{\log s} \log q] = \frac{\operatorname{diag}[(I - A W)(I - A W)^T + \sigma^2 A A^T] + (A b + c)^2}{s^2} - 1.

The sleep loss is -(N/S) sum_s log q(z_s|x_s), so its expected gradient is
-N E[grad log q]. The wake phase's expected theta-gradient is the gradient of
the closed-form E_q[log p(x, z)] in (W, b) at fixed q.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine

from linear_gaussian import DTYPE, LinearGaussian, _plate
from pyro_aevb.config import load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.infer.registry import make_estimator
from pyro_aevb.training.loop import train
from pyro_aevb.infer.wake_sleep import dream, sleep_log_q

M, NUM_DATA = 5, 10


pytestmark = pytest.mark.usefixtures("float64_single_thread")
class LinearGuide(nn.Module):
    """q(z|x) = N(A x + c, diag exp(log_s)^2), with the VAE's plate/beta structure."""

    def __init__(self, k: int = 2, d: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = nn.Parameter(0.3 * torch.randn(k, d, generator=g, dtype=DTYPE))
        self.c = nn.Parameter(torch.tensor([0.1, -0.2], dtype=DTYPE))
        self.log_s = nn.Parameter(torch.tensor([0.6, 0.8], dtype=DTYPE).log())

    def params(self, x):
        return x @ self.A.T + self.c, self.log_s.exp().expand(x.shape[0], -1)

    def __call__(self, x, num_data=None, beta=1.0):
        loc, scale = self.params(x)
        with _plate(x, num_data):
            with poutine.scale(scale=beta):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def expected_sleep_gradient(lg: LinearGaussian, q: LinearGuide) -> list[torch.Tensor]:
    """E_{(z,x) ~ p}[grad_{A, c, log s} log q(z|x)], the closed forms of the module docstring."""
    with torch.no_grad():
        W, b, A, c = lg.W, lg.b, q.A, q.c
        s2 = (2 * q.log_s).exp()
        d, k = W.shape
        C = W @ W.T + lg.sigma**2 * torch.eye(d)
        mean_mu = A @ b + c
        g_c = -mean_mu / s2
        g_A = (W.T - A @ (C + torch.outer(b, b)) - torch.outer(c, b)) / s2[:, None]
        I_AW = torch.eye(k) - A @ W
        second = (I_AW @ I_AW.T + lg.sigma**2 * A @ A.T).diagonal() + mean_mu**2
        g_log_s = second / s2 - 1
    return [g_A, g_c, g_log_s]


def test_sleep_gradient_matches_closed_form():
    lg, q = LinearGaussian(), LinearGuide()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    S, batches = 4000, 20
    est = make_estimator("wake-sleep", sleep_samples=S)
    params = [q.A, q.c, q.log_s]
    expected = [-NUM_DATA * g for g in expected_sleep_gradient(lg, q)]  # loss = -(N/S) sum log q
    grads = []
    for i in range(batches):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(i)
        est.differentiable_loss(lg.model, q, x, num_data=NUM_DATA).backward()  # wake gives phi nothing
        grads.append([p.grad.clone() for p in params])
    for j, name in enumerate(["A", "c", "log_s"]):
        g = torch.stack([b[j] for b in grads])
        mean, se = g.mean(0), g.std(0) / math.sqrt(batches)
        z = (mean - expected[j]) / se
        rel = (mean - expected[j]).norm() / expected[j].norm()
        print(f"\nsleep d(loss)/d({name}): max |z| = {z.abs().max().item():.2f}, rel. error {rel.item():.2e}, "
              f"|expected| {expected[j].norm().item():.3f}")
        assert z.abs().max() < 4.5
        assert rel < 0.05


def test_wake_gradient_and_loss_match_closed_form():
    lg, q = LinearGaussian(), LinearGuide()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    particles, batches = 1000, 20
    est = make_estimator("wake-sleep", num_particles=particles)
    loc, scale = (t.detach() for t in q.params(x))
    elbo = (NUM_DATA / M) * lg.closed_form_elbo(x, loc, scale).sum()  # KL(q||p) has no W, b
    expected = torch.autograd.grad(-elbo, [lg.W, lg.b])
    grads, values = [], []
    for i in range(batches):
        lg.W.grad = lg.b.grad = None
        pyro.set_rng_seed(i)
        loss = est.differentiable_loss(lg.model, q, x, num_data=NUM_DATA)
        loss.backward()
        values.append(loss.item())
        grads.append([lg.W.grad.clone(), lg.b.grad.clone()])
    for j, name in enumerate(["W", "b"]):
        g = torch.stack([b[j] for b in grads])
        mean, se = g.mean(0), g.std(0) / math.sqrt(batches)
        z = (mean - expected[j]) / se
        print(f"\nwake d(loss)/d({name}): max |z| = {z.abs().max().item():.2f}, "
              f"rel. error {((mean - expected[j]).norm() / expected[j].norm()).item():.2e}")
        assert z.abs().max() < 4.5
    values = torch.tensor(values)
    se = values.std().item() / math.sqrt(batches)
    print(f"mean loss {values.mean().item():.4f} +- {se:.4f}, closed-form -ELBO {-elbo.item():.4f}")
    assert abs(values.mean().item() + elbo.item()) < 4 * se  # the reported loss is the -ELBO estimate


def test_dreams_come_from_the_model_without_gradient():
    lg = LinearGaussian()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    S = 20000
    trace, x_dream = dream(lg.model, x, S, num_data=NUM_DATA)
    z = trace.nodes["z"]["value"]
    assert x_dream.shape == (S, 3) and z.shape == (S, 2)
    assert not x_dream.requires_grad and not z.requires_grad
    resid = x_dream - (z @ lg.W.T + lg.b).detach()  # x | z ~ N(W z + b, sigma^2)
    assert abs(resid.std().item() - lg.sigma) < 0.02
    assert ((x_dream.mean(0) - lg.b).abs() < 4 * x_dream.std(0) / math.sqrt(S)).all()
    assert trace.nodes["x"]["infer"]["was_observed"]


def test_num_data_scales_loss_and_sleep():
    lg, q = LinearGaussian(), LinearGuide()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    est = make_estimator("wake-sleep")
    values = {}
    for n in (None, 10 * M):
        pyro.set_rng_seed(5)
        values[n] = (est.loss(lg.model, q, x, num_data=n), )
        pyro.set_rng_seed(5)
        values[n] += (sleep_log_q(lg.model, q, x, num_data=n).item(),)
    assert values[10 * M][0] == pytest.approx(10 * values[None][0], rel=1e-10)
    assert values[10 * M][1] == pytest.approx(10 * values[None][1], rel=1e-10)


def test_beta_is_accepted_and_ignored():
    lg, q = LinearGaussian(), LinearGuide()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    est = make_estimator("wake-sleep")
    pyro.set_rng_seed(1)
    a = est.differentiable_loss(lg.model, q, x, beta=0.2)
    pyro.set_rng_seed(1)
    b = est.differentiable_loss(lg.model, q, x)
    assert a.item() == b.item()


@functools.lru_cache(maxsize=None)
def _dataset(name, data_dir=None):
    return load_dataset(name, data_dir)


@pytest.mark.parametrize("options", [{}, {"sleep_samples": 37}], ids=["S=M", "S=37"])
def test_trains_the_tiny_default_recipe(tmp_path, options):
    torch.set_default_dtype(torch.float32)
    recipe = load_recipe(None, {"estimator": "wake-sleep", "estimator_options": options, "max_samples": 300,
                                "eval_every": 300, "hidden_dim": 32, "latent_dim": 2, "eval_train_size": 500})
    row = train(recipe, tmp_path / "run", progress=False, dataset=_dataset("mnist-5k")).metrics[-1]
    assert row["samples"] == 300 and math.isfinite(row["train_elbo"]) and math.isfinite(row["test_elbo"])


def test_trains_the_gaussian_decoder(tmp_path, shared_data):
    torch.set_default_dtype(torch.float32)
    recipe = load_recipe("frey_nz2", {"estimator": "wake-sleep", "max_samples": 300, "eval_every": 300,
                                      "hidden_dim": 32, "data_dir": str(shared_data)})
    row = train(recipe, tmp_path / "run", progress=False,
                dataset=_dataset("frey-faces", str(shared_data))).metrics[-1]
    assert math.isfinite(row["train_elbo"]) and math.isfinite(row["test_elbo"])
