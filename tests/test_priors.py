"""Priors: densities integrate to one and match hand computations, KLs are analytic only where they exist,
learned prior parameters train, save and reload, and a user's prior plugs in by import path."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import kl_divergence

import pyro
import pyro.distributions as dist
from pyro import poutine

import pyro_aevb
from pyro_aevb.config import RECIPE_DIR, Recipe, load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.errors import ConfigError
from pyro_aevb.infer.registry import kl_status
from pyro_aevb.evaluation.bounds import average_bound, log_weights
from pyro_aevb.generative.priors import PRIORS, FlowPrior, make_prior
from pyro_aevb.training.loop import train
from pyro_aevb.generative.vae import VAE, BernoulliDecoder, Encoder, build_vae

REPO = Path(__file__).resolve().parents[1]
MY_PRIOR = f"{REPO / 'models' / 'my_prior.py'}:laplace_prior"

#: (id, registry name, options): every prior, and both kinds of flow
CASES = [
    ("standard-normal", "standard-normal", {}),
    ("gaussian", "gaussian", {}),
    ("mog", "mog", {"components": 4}),
    ("vamp", "vamp", {"components": 3}),
    ("flow-maf", "flow", {"layers": 2}),
    ("flow-spline", "flow", {"layers": 2, "kind": "spline-coupling"}),
]
ANALYTIC = {"standard-normal", "gaussian"}  # the priors with a registered KL from the diagonal-Gaussian guide
LEARNED = [c for c in CASES if c[0] != "standard-normal"]


def ids(cases):
    return [c[0] for c in cases]


def tiny_vae(name, latent_dim, data_dim=4, seed=0, **options):
    """A VAE with 8 hidden units and the prior bound to it; every prior parameter is perturbed off its start."""
    torch.manual_seed(seed)
    prior = make_prior(name, latent_dim, **options)
    vae = VAE(prior, Encoder(data_dim, 8, latent_dim), BernoulliDecoder(latent_dim, 8, data_dim))
    if hasattr(prior, "bind"):
        prior.bind(vae)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return vae


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_shapes_of_samples_densities_and_the_model_site(case):
    _, name, options = case
    vae = tiny_vae(name, 3, **options)
    p = vae.prior()
    assert p.batch_shape == () and p.event_shape == (3,)
    assert p.sample((5,)).shape == (5, 3)
    assert p.log_prob(torch.randn(5, 3)).shape == (5,)
    assert p.log_prob(torch.randn(2, 5, 3)).shape == (2, 5)
    x = torch.rand(7, 4).bernoulli()
    site = poutine.trace(vae.model).get_trace(x).nodes["z"]
    assert site["fn"].batch_shape == (7,) and site["fn"].event_shape == (3,)
    assert site["value"].shape == (7, 3) and site["fn"].log_prob(site["value"]).shape == (7,)
    assert vae.sample(6).shape == (6, 4)


def _trapezoid_mass(prior, dim, half_width=12.0):
    n = 3001 if dim == 1 else 481
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    if dim == 1:
        return torch.trapezoid(prior().log_prob(t.float()[:, None]).double().exp(), t).item()
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1)  # (n, n, 2)
    density = prior().log_prob(grid.float().reshape(-1, 2)).double().exp().reshape(n, n)
    return torch.trapezoid(torch.trapezoid(density, t), t).item()


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("case", LEARNED, ids=ids(LEARNED))
def test_density_integrates_to_one(case, dim):
    _, name, options = case
    vae = tiny_vae(name, dim, **options)
    with torch.no_grad():
        mass = _trapezoid_mass(vae.prior, dim)
        z = torch.randn(100, dim)
        shift = (vae.prior().log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z).sum(-1)).abs().max().item()
    assert mass == pytest.approx(1.0, abs=1e-2)
    assert shift > 0.05  # not N(0, I): the perturbed prior is a real test of its density


@pytest.mark.parametrize("kind", FlowPrior.KINDS)
def test_flow_density_follows_parameter_updates(kind):
    """Pyro's transforms cache their last (input, output) by identity; a stale cache would hide an update."""
    prior = tiny_vae("flow", 3, kind=kind).prior
    z = torch.randn(10, 3)
    before = prior().log_prob(z)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fresh = make_prior("flow", 3, kind=kind)
    fresh.load_state_dict(prior.state_dict())
    after = prior().log_prob(z)  # the same tensor z
    assert torch.allclose(after, fresh().log_prob(z.clone()), atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-2)


def test_mixture_of_gaussians_matches_the_mixture_by_hand():
    prior = tiny_vae("mog", 3, components=4).prior
    z = torch.randn(50, 3) * 2
    log_w = torch.log_softmax(prior.logits, 0)  # (K,)
    log_n = torch.distributions.Normal(prior.locs, prior.log_scales.exp()).log_prob(z[:, None, :]).sum(-1)  # (50, K)
    expected = torch.logsumexp(log_w + log_n, -1)
    assert torch.allclose(prior().log_prob(z), expected, atol=1e-5)
    assert not torch.allclose(log_w, log_w.mean().expand(4))  # the perturbed weights are not uniform


def _reference_mixture(logits, loc, scale):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


@pytest.mark.parametrize("value_shape, batch_shape", [((7, 3), ()), ((5, 7, 3), (7,)), ((3,), (4,)), ((2, 1, 3), (6,))])
def test_diagonal_normal_mixture_is_mixture_same_family(value_shape, batch_shape):
    from pyro_aevb.generative.mixture import DiagonalNormalMixture

    torch.manual_seed(0)
    logits, loc, scale = torch.randn(4), torch.randn(4, 3) * 2, torch.rand(4, 3) + 0.1
    params = [t.clone().requires_grad_() for t in (logits, loc, scale)]
    fast = DiagonalNormalMixture(*params).expand(batch_shape)
    ref = _reference_mixture(logits, loc, scale).expand(batch_shape)
    assert isinstance(fast, DiagonalNormalMixture) and fast.batch_shape == ref.batch_shape
    assert fast.event_shape == (3,) and fast.sample((2,)).shape == (2, *batch_shape, 3)
    z = torch.randn(value_shape) * 3
    lp = fast.log_prob(z)
    assert lp.shape == ref.log_prob(z).shape and torch.allclose(lp, ref.log_prob(z), atol=1e-5)
    # the gradients of the parameters (the VampPrior learns through them) are MixtureSameFamily's, too
    lp.sum().backward()
    ref_params = [t.clone().requires_grad_() for t in (logits, loc, scale)]
    _reference_mixture(*ref_params).expand(batch_shape).log_prob(z).sum().backward()
    for a, b in zip(params, ref_params):
        assert torch.allclose(a.grad, b.grad, atol=1e-4)


def test_diagonal_normal_mixture_keeps_precision_at_narrow_components():
    # z next to a narrow, far component: the quadratic expansion cancels z^2 and mu^2 against 2 z mu
    from pyro_aevb.generative.mixture import DiagonalNormalMixture

    loc = torch.full((2, 50), 5.0)
    loc[1] = -5.0
    scale = torch.full((2, 50), 0.01)
    z = (loc[0] + 0.01 * torch.randn(100, 50)).float()
    exact = _reference_mixture(torch.zeros(2).double(), loc.double(), scale.double()).log_prob(z.double())
    fast = DiagonalNormalMixture(torch.zeros(2), loc, scale).log_prob(z)
    assert fast.dtype == torch.float32 and torch.allclose(fast.double(), exact, atol=1e-4, rtol=0)


def test_diagonal_normal_mixture_follows_torchs_expand_and_dtype_rules():
    from pyro_aevb.generative.mixture import DiagonalNormalMixture

    mix = DiagonalNormalMixture(torch.zeros(3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
                                torch.ones(3, 2, dtype=torch.float64))
    assert mix.expand((6,)).expand((4, 6)).batch_shape == (4, 6)
    for bad in [(5,), (1,)]:  # a batch of 6 expands neither to 5 nor to 1, as in torch
        with pytest.raises(RuntimeError, match="cannot expand"):
            mix.expand((6,)).expand(bad)
    assert mix.log_prob(torch.zeros(2)).dtype == torch.float64  # float64 parameters, float32 value


def test_hmc_log_likelihood_runs_with_the_mixture_priors():
    # the Appendix D estimator needs a transform for the prior's support: real_vector, not MixtureSameFamily's
    from pyro_aevb import hmc_log_likelihood

    # (mog's density is the same class: one prior keeps the test short)
    vae = tiny_vae("vamp", 2, components=3)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    pyro.set_rng_seed(0)
    with torch.no_grad():  # importance sampling with 20,000 draws: exact to ~0.01 nats in two dimensions
        exact = torch.logsumexp(log_weights(vae.model, vae.guide, x, num_particles=20000), 0) - math.log(20000)
    estimate = hmc_log_likelihood(vae.local_pair()[0], x, num_samples=100, warmup_steps=100, points_per_chain=2)
    assert estimate.shape == (2,) and torch.allclose(estimate.double(), exact.double(), atol=0.3)


def test_mixture_priors_score_a_plate_of_particles_as_mixture_same_family():
    # the shape importance sampling sees: (K particles, N datapoints) under Pyro's plate, the prior expanded
    for name, options in [("vamp", {"components": 6}), ("mog", {"components": 3})]:
        vae = tiny_vae(name, 3, **options)
        p = vae.prior()
        args = (p._params[0], p._params[1], p._params[2])
        z = torch.randn(20, 8, 3)
        assert torch.allclose(p.expand((8,)).log_prob(z), _reference_mixture(*args).expand((8,)).log_prob(z),
                              atol=1e-5)


def test_vamp_prior_is_the_encoders_mixture_at_the_pseudo_inputs():
    vae = tiny_vae("vamp", 3, components=5)
    z = torch.randn(50, 3)
    loc, scale = vae.encoder(vae.prior.pseudo_inputs)  # (K, Nz) each
    log_n = torch.distributions.Normal(loc, scale).log_prob(z[:, None, :]).sum(-1)  # (50, K)
    expected = torch.logsumexp(log_n, -1) - math.log(5)
    assert torch.allclose(vae.prior().log_prob(z), expected, atol=1e-5)


def test_vamp_prior_with_one_pseudo_input_is_the_encoders_gaussian():
    vae = tiny_vae("vamp", 2, components=1)
    u = vae.prior.pseudo_inputs  # (1, D)
    loc, scale = vae.encoder(u)
    z = torch.randn(30, 2)
    q = dist.Normal(loc[0], scale[0]).to_event(1)
    assert torch.allclose(vae.prior().log_prob(z), q.log_prob(z), atol=1e-6)


def test_vamp_pseudo_inputs_are_created_by_bind_and_start_at_data():
    vae = tiny_vae("vamp", 2, data_dim=6, components=7)
    prior = vae.prior
    assert prior.pseudo_inputs.shape == (7, 6)
    # The encoder is shared, not a submodule of the prior: its parameters appear once.
    assert [k for k in vae.state_dict() if k.startswith("prior.")] == ["prior.pseudo_inputs"]
    assert len(list(vae.parameters())) == len({id(p) for p in vae.parameters()})
    x = torch.rand(20, 6)
    prior.initialize_from_data(x)
    rows = [int(torch.nonzero((x == u).all(1))[0]) for u in prior.pseudo_inputs]  # each u_k is a row of x
    assert len(set(rows)) == 7
    random_init = tiny_vae("vamp", 2, data_dim=6, components=7, init="random").prior
    before = random_init.pseudo_inputs.clone()
    random_init.initialize_from_data(x)
    assert torch.equal(random_init.pseudo_inputs, before)


@pytest.mark.parametrize("name", ["standard-normal", "gaussian", MY_PRIOR], ids=["standard-normal", "gaussian",
                                                                                 "user-laplace"])
def test_registered_kl_matches_monte_carlo(name):
    prior = make_prior(name, 3, scale=0.7) if name == MY_PRIOR else tiny_vae(name, 3).prior
    torch.manual_seed(1)
    q = dist.Normal(torch.randn(3), torch.rand(3) + 0.3).to_event(1)
    p = prior()
    z = q.sample((200_000,))
    terms = (q.log_prob(z) - p.log_prob(z)).double()
    mc, se = terms.mean().item(), terms.std().item() / math.sqrt(terms.numel())
    assert abs(kl_divergence(q, p).item() - mc) < 4 * se, (kl_divergence(q, p).item(), mc, se)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_kl_status_and_bounds_for_every_prior(case):
    label, name, options = case
    vae = tiny_vae(name, 2, **options)
    x = torch.rand(10, 4).bernoulli()
    assert kl_status(vae.model, vae.guide, x) == ("analytic" if name in ANALYTIC else "monte-carlo")
    for analytic in (True, False):
        bound = average_bound(vae.model, vae.guide, x, num_particles=3, analytic_kl=analytic)
        assert math.isfinite(bound.mean) and math.isfinite(bound.se) and bound.n == 10
    with torch.no_grad():
        w = log_weights(vae.model, vae.guide, x, num_particles=5)
    assert w.shape == (5, 10) and torch.isfinite(w).all()


@functools.lru_cache(maxsize=None)
def mnist5k():
    return load_dataset("mnist-5k", None)


def tiny_recipe(prior, **prior_options):
    return load_recipe(None, {"prior": prior, "prior_options": prior_options, "max_samples": 200, "eval_every": 200,
                              "checkpoint_every": 200, "eval_train_size": 500, "hidden_dim": 32, "latent_dim": 2})


TRAIN_CASES = [(name, {}) for name in PRIORS] + [("flow", {"kind": "spline-coupling"})]  # registry defaults


@pytest.mark.parametrize("name, options", TRAIN_CASES, ids=[*PRIORS, "flow-spline"])
def test_every_prior_trains_and_its_parameters_are_saved_and_reloaded(name, options, tmp_path):
    torch.set_num_threads(1)
    recipe, data = tiny_recipe(name, **options), mnist5k()
    # The starting point, built here so that the test knows it: train() starts from exactly this state.
    pyro.set_rng_seed(3)
    start = build_vae(recipe, data.dim)
    if hasattr(start.prior, "initialize_from_data"):
        start.prior.initialize_from_data(data.train)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    result = train(recipe, tmp_path / "run", progress=False, dataset=data, initial_state=initial)

    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["kl"] == ("analytic" if name in ANALYTIC else "monte-carlo")
    assert math.isfinite(info["final"]["test_elbo"])
    trained = result.vae.prior
    for key, param in trained.named_parameters():  # every prior parameter moved
        assert not torch.equal(param.detach(), initial[f"prior.{key}"]), key
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert {k for k in saved if k.startswith("prior.")} == {f"prior.{k}" for k in trained.state_dict()}

    loaded = pyro_aevb.load(tmp_path / "run")
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.prior.state_dict()[key], value), key
    z = torch.randn(16, 2)
    with torch.no_grad():
        assert torch.allclose(loaded.prior().log_prob(z), trained().log_prob(z), atol=1e-6)
    if name == "vamp":
        assert loaded.prior._encoder[0] is loaded.encoder  # the reloaded prior uses the reloaded encoder


def test_every_prior_has_a_recipe():
    for name in PRIORS:
        recipe = load_recipe(RECIPE_DIR / f"prior_{name.replace('-', '_')}.toml")
        assert recipe.prior == name and recipe.dataset == "binarized-mnist" and recipe.latent_dim == 20


def test_user_prior_from_a_file_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the documented form: a path relative to the working directory
    recipe = Recipe(prior="models/my_prior.py:laplace_prior", prior_options={"scale": 0.7}, max_samples=200,
                    eval_every=200, checkpoint_every=200, eval_train_size=500, hidden_dim=32, latent_dim=2)
    result = train(recipe, tmp_path / "run", progress=False, dataset=mnist5k())
    assert type(result.vae.prior).__name__ == "LaplacePrior"
    assert torch.equal(result.vae.prior.scale, torch.full((2,), 0.7))
    assert result.run_info["kl"] == "analytic"  # torch registers the Normal -> Laplace KL
    assert math.isfinite(result.metrics[-1]["test_elbo"])


def test_user_prior_in_a_recipe():
    recipe = load_recipe(None, {"prior": MY_PRIOR, "prior_options": {"scale": 0.5}})
    assert recipe.prior_options == {"scale": 0.5}
    with pytest.raises(ConfigError, match=r"unknown key 'scal' in \[prior_options\].*scale"):
        load_recipe(None, {"prior": MY_PRIOR, "prior_options": {"scal": 0.5}})


USER_PRIORS = '''
import torch
from torch import nn
import pyro.distributions as dist

class Prior(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make
    def forward(self):
        return self.make()

def student_t(latent_dim, df: float = 3.0):
    return Prior(lambda: dist.StudentT(df, torch.zeros(latent_dim), 1.0).to_event(1))

def wrong_event(latent_dim):
    return Prior(lambda: dist.Normal(torch.zeros(latent_dim + 1), 1.0).to_event(1))

def no_to_event(latent_dim):
    return Prior(lambda: dist.Normal(torch.zeros(latent_dim), 1.0))

def batched(latent_dim):
    return Prior(lambda: dist.Normal(torch.zeros(4, latent_dim), 1.0).to_event(1))

def returns_tensor(latent_dim):
    return Prior(lambda: torch.zeros(latent_dim))

def not_a_module(latent_dim):
    return dist.Normal(torch.zeros(latent_dim), 1.0).to_event(1)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_priors.py").write_text(USER_PRIORS)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # file paths are relative to the working directory
    return tmp_path


def test_user_prior_from_an_importable_module(user_module):
    prior = make_prior("user_priors:student_t", 2, df=4.0)
    assert prior().event_shape == (2,)
    vae = VAE(prior, Encoder(4, 8, 2), BernoulliDecoder(2, 8, 4))
    assert kl_status(vae.model, vae.guide, torch.rand(3, 4).bernoulli()) == "monte-carlo"
    by_file = make_prior(f"{user_module / 'user_priors.py'}:student_t", 2)
    expected = 2 * dist.StudentT(3.0).log_prob(torch.tensor(0.0)).item()  # the default df, in each of 2 dimensions
    assert by_file().log_prob(torch.zeros(2)).item() == pytest.approx(expected)


@pytest.mark.parametrize("name, message", [
    ("user_priors:wrong_event", r"event_shape \(3,\), expected \(2,\).*to_event"),
    ("user_priors:no_to_event", r"event_shape \(\), expected \(2,\).*to_event\(1\)"),
    ("user_priors:batched", r"batch_shape \(4,\), expected \(\)"),
    ("user_priors:returns_tensor", r"returned Tensor, not a distribution.*pyro.distributions"),
    ("user_priors:not_a_module", r"returned Independent, not a torch.nn.Module"),
    ("user_priors:NOT_CALLABLE", r"NOT_CALLABLE is a int, not callable"),
    ("user_priors:missing", r"has no attribute 'missing'.*student_t"),
    ("no_such_module_xyz:prior", r"cannot import module 'no_such_module_xyz'.*PYTHONPATH.*file path"),
    ("broken:prior", r"importing 'broken' failed: RuntimeError: boom"),
    ("broken.py:prior", r"running broken.py failed: RuntimeError: boom"),
    ("nowhere/missing.py:prior", r"file nowhere/missing.py not found"),
    ("student-t", r"unknown prior 'student-t'; valid priors: standard-normal, gaussian, mog, vamp, flow"),
    (":prior", r"not of the form module:factory"),
], ids=["wrong-event", "no-to-event", "batched", "tensor", "not-module", "not-callable", "missing-attr",
        "no-module", "import-fails", "file-fails", "no-file", "unknown-name", "empty-module"])
def test_bad_user_priors_fail_with_one_line(user_module, name, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_prior(name, 2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, options, message", [
    ("flow", {"kind": "glow"}, r"kind = 'glow' is not valid; choose one of: affine-autoregressive, spline-coupling"),
    ("flow", {"hidden_dim": 2}, r"hidden_dim = 2 is below latent_dim = 5"),
    ("vamp", {"init": "zeros"}, r"init = 'zeros' is not valid"),
    ("mog", {"components": 0}, r"components must be >= 1"),
])
def test_bad_prior_options_fail_with_one_line(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_prior(name, 5, **options)
