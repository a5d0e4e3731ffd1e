import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_aevb.config import RECIPE_DIR, Recipe, load_recipe, make_recipe, parse_override, valid_keys
from pyro_aevb.errors import ConfigError

REQUIRED_KEYS = """dataset data_dir latent_dim hidden_dim likelihood prior estimator num_particles
batch_size optimizer lr weight_decay beta kl_warmup max_samples eval_every seed device
checkpoint_every""".split()


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(valid_keys())


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        make_recipe({"latent_dims": 3})
    msg = str(e.value)
    assert "latent_dims" in msg and "did you mean 'latent_dim'" in msg
    assert all(k in msg for k in REQUIRED_KEYS)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("latent_dim", "20", ["latent_dim", "int", "str"]),
        ("latent_dim", 2.5, ["latent_dim", "int"]),
        ("lr", "fast", ["lr", "float"]),
        ("batch_size", 0, ["batch_size", "> 0"]),
        ("beta", -1.0, ["beta", "> 0"]),
        ("kl_warmup", -5, ["kl_warmup", ">= 0"]),
        ("optimizer", "sgd", ["optimizer", "adagrad", "adam"]),
        ("likelihood", "poisson", ["likelihood", "bernoulli", "gaussian"]),
        ("device", "tpu", ["device", "cpu", "cuda"]),
        ("seed", True, ["seed", "int", "bool"]),
    ],
)
def test_bad_values(key, value, words):
    with pytest.raises(ConfigError) as e:
        make_recipe({key: value})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_set_overrides_are_type_checked():
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("estimator=sgvb-a") == ("estimator", "sgvb-a")
    assert parse_override("data_dir=/tmp/x") == ("data_dir", "/tmp/x")
    recipe = load_recipe(None, ["latent_dim=3", "lr=1"])  # an int is a valid float
    assert recipe.latent_dim == 3 and recipe.lr == 1.0 and isinstance(recipe.lr, float)
    with pytest.raises(ConfigError, match="latent_dim.*int"):
        load_recipe(None, ["latent_dim=0.5"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe(None, ["latent_dim"])


def test_resolved_recipe_round_trips_through_toml():
    recipe = load_recipe("mnist_nz20", ["beta=0.5", 'description="say \\"hi\\""'])
    again = make_recipe(tomllib.loads(recipe.to_toml()))
    assert again == recipe


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("latent_dim = 3\nlr = = 2\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.toml")


def test_every_shipped_recipe_parses():
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
    assert {"mnist5k", "mnist_nz3", "mnist_nz5", "mnist_nz10", "mnist_nz20", "mnist_nz200",
            "frey_nz2", "frey_nz5", "frey_nz10", "frey_nz20"} <= set(names)
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


def test_default_recipe_matches_defaults():
    """`pyro-aevb train` with no recipe runs what models/mnist5k.toml says."""
    shipped = load_recipe("mnist5k")
    assert shipped.to_dict() | {"description": ""} == Recipe().to_dict() | {"description": ""}


_values = st.one_of(st.integers(-5, 10**9), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                    st.lists(st.integers(), max_size=2), st.none())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(valid_keys()), st.text(max_size=10)), _values, max_size=6))
def test_fuzz_recipes_accept_or_config_error(overrides):
    try:
        recipe = make_recipe(overrides)
    except ConfigError:
        return
    assert isinstance(recipe, Recipe)


def test_options_tables_are_checked_against_the_factory(monkeypatch):
    from pyro_aevb.infer import registry as estimators

    def fancy(num_particles=1, temperature=1.0, mode="a"):
        raise AssertionError("not built by the parser")

    monkeypatch.setitem(estimators.ESTIMATORS, "fancy", fancy)
    recipe = load_recipe(None, ["estimator=fancy", "estimator_options.temperature=2", "estimator_options.mode=b"])
    assert recipe.estimator_options == {"temperature": 2.0, "mode": "b"}
    assert make_recipe(tomllib.loads(recipe.to_toml())) == recipe  # tables survive the round trip
    with pytest.raises(ConfigError, match=r"unknown key 'temp' in \[estimator_options\].*temperature, mode"):
        load_recipe(None, ["estimator=fancy", "estimator_options.temp=2"])
    with pytest.raises(ConfigError, match="estimator_options.mode.*str"):
        make_recipe({"estimator": "fancy", "estimator_options": {"mode": 3}})
    with pytest.raises(ConfigError, match="valid keys: none"):
        make_recipe({"prior_options": {"components": 3}})  # standard-normal takes no options
    with pytest.raises(ConfigError, match="is a table"):
        parse_override("prior_options=3")
