"""The training loop: recipes run, seeds reproduce, KL bookkeeping is honest, weight decay is a prior."""

import functools
import json

import pytest
import torch

import pyro.distributions as dist
from pyro_aevb.generative import priors
from pyro_aevb.config import RECIPE_DIR, Recipe, load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.training.loop import train
from pyro_aevb.training.schedule import kl_warmup_beta
from pyro_aevb.training.setup import prepare_data

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


@functools.lru_cache(maxsize=None)
def dataset(name, data_dir):
    return load_dataset(name, data_dir)


def tiny(recipe_name, data_dir, **overrides):
    base = {"max_samples": 300, "eval_every": 300, "checkpoint_every": 300, "eval_train_size": 500,
            "data_dir": str(data_dir)}
    return load_recipe(recipe_name, base | overrides)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_a_few_hundred_samples(name, shared_data, tmp_path):
    recipe = tiny(name, shared_data)
    result = train(recipe, tmp_path / "run", progress=False, dataset=dataset(recipe.dataset, str(shared_data)))
    row = result.metrics[-1]
    assert row["samples"] == 300 and row["step"] == 3
    assert torch.isfinite(torch.tensor([row["train_elbo"], row["test_elbo"]])).all()
    assert result.run_info["kl"] == ("analytic" if recipe.prior in ("standard-normal", "gaussian") else "monte-carlo")
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    if recipe.latent_dim == 2:
        assert (tmp_path / "run" / "figures" / "manifold.png").is_file()


def _state(result):
    return {k: v.clone() for k, v in result.vae.state_dict().items()}


def test_same_seed_same_run(tmp_path):
    recipe = load_recipe(None, {"max_samples": 2000, "eval_every": 1000, "hidden_dim": 64, "latent_dim": 5})
    a = train(recipe, tmp_path / "a", progress=False)
    b = train(recipe, tmp_path / "b", progress=False)
    for (k, va), vb in zip(_state(a).items(), _state(b).values()):
        assert torch.equal(va, vb), k
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)
    c = train(load_recipe(None, recipe.to_dict() | {"seed": 1}), tmp_path / "c", progress=False)
    assert not torch.equal(_state(a)["decoder.logits.2.bias"], _state(c)["decoder.logits.2.bias"])


def test_training_improves_the_bound(tmp_path):
    recipe = load_recipe(None, {"max_samples": 20_000, "eval_every": 4000, "hidden_dim": 200})
    rows = train(recipe, tmp_path / "r", progress=False).metrics
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] + 5, rows  # nats per datapoint
    assert rows[-1]["train_elbo"] > rows[0]["train_elbo"] + 5


class MixturePrior(torch.nn.Module):
    """A prior with no registered KL against the diagonal Gaussian guide."""

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("locs", torch.randn(3, latent_dim))

    def forward(self):
        mix = dist.Categorical(torch.ones(3))
        comp = dist.Normal(self.locs, torch.ones_like(self.locs)).to_event(1)
        return dist.MixtureSameFamily(mix, comp)


def test_kl_metadata_reports_monte_carlo_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(priors.PRIORS, "test-mixture", MixturePrior)
    recipe = load_recipe(None, {"prior": "test-mixture", "max_samples": 200, "eval_every": 200,
                                "hidden_dim": 32, "latent_dim": 2})
    result = train(recipe, tmp_path / "r", progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert result.run_info["kl"] == info["kl"] == "monte-carlo"
    assert "KL: Monte Carlo" in capsys.readouterr().out


def test_kl_warmup_schedule():
    recipe = Recipe(beta=0.5, kl_warmup=1000)
    assert [kl_warmup_beta(recipe, s) for s in (100, 250, 1000, 5000)] == [0.05, 0.125, 0.5, 0.5]
    assert kl_warmup_beta(Recipe(beta=2.0), 0) == 2.0


def test_dynamic_binarization_of_grey_data():
    recipe = Recipe(eval_train_size=300)
    data = prepare_data(recipe, torch.device("cpu"))
    assert data.dynamic_binarization and not data.dataset.binary
    for x in (data.train_eval, data.test):
        assert ((x == 0) | (x == 1)).all()
    again = prepare_data(recipe, torch.device("cpu"), data.dataset)
    assert torch.equal(again.test, data.test)  # the evaluation sets are fixed
    # The training images stay grey; each draw binarizes afresh with mean = the pixel intensity.
    x = data.train[:50]
    draws = torch.stack([torch.bernoulli(x) for _ in range(400)])
    assert (draws.mean(0) - x).abs().max() < 0.15
    assert not torch.equal(draws[0], draws[1])


def test_weight_decay_is_a_gaussian_prior_on_parameters():
    """Optimizer weight decay lambda == adding lambda/2 ||w||^2 to the loss, for Adagrad and Adam."""
    for opt_cls in (torch.optim.Adagrad, torch.optim.Adam):
        torch.manual_seed(0)
        w1 = torch.randn(5, requires_grad=True)
        w2 = w1.detach().clone().requires_grad_(True)
        target = torch.randn(5)
        o1, o2 = opt_cls([w1], lr=0.1, weight_decay=0.7), opt_cls([w2], lr=0.1)
        for _ in range(5):
            o1.zero_grad(); ((w1 - target) ** 2).sum().backward(); o1.step()  # noqa: E702
            o2.zero_grad(); (((w2 - target) ** 2).sum() + 0.7 / 2 * (w2 ** 2).sum()).backward(); o2.step()  # noqa: E702
        assert torch.allclose(w1, w2, atol=1e-6)


def test_evaluation_does_not_change_the_training_trajectory(tmp_path):
    base = {"max_samples": 1000, "hidden_dim": 32, "latent_dim": 2, "checkpoint_every": 1000}
    a = train(load_recipe(None, base | {"eval_every": 1000}), tmp_path / "a", progress=False)
    b = train(load_recipe(None, base | {"eval_every": 100}), tmp_path / "b", progress=False)
    assert len(b.metrics) == 10 and len(a.metrics) == 1
    for (k, va), vb in zip(_state(a).items(), _state(b).values()):
        assert torch.equal(va, vb), k
