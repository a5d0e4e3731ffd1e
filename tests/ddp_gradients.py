"""Run under torchrun with 2 processes by tests/test_distributed.py: the data-parallel gradient against the
single-process one, for the same global minibatch and the same latent noise (the guide's z replayed
from draws made here), and the parameters after 50 such steps. Rank 0 prints one JSON line."""

import copy
import json

import torch
from pyro import poutine

from pyro_aevb.config import load_recipe
from pyro_aevb.data import Dataset
from pyro_aevb.training import distributed
from pyro_aevb.training.setup import build_run, make_optimizer
from pyro_aevb.training.steps import EagerStep

w = distributed.init()


def with_z(guide, z):
    """The guide with its latent site z set to the given draws (still a sample site, for the ELBO)."""
    trace = poutine.Trace()
    trace.add_node("z", name="z", type="sample", is_observed=False, value=z, infer={})
    return poutine.replay(guide, trace=trace)


gen = torch.Generator().manual_seed(0)
train = torch.bernoulli(torch.rand(400, 30, generator=gen), generator=gen)
dataset = Dataset(name="tiny", train=train, test=train[:50], image_shape=(5, 6), binary=True)
recipe = load_recipe(None, {"hidden_dim": 12, "latent_dim": 3, "batch_size": 8, "fast_path": "off",
                            "optimizer": "adam", "lr": 0.01, "eval_train_size": 50})
run = build_run(recipe, dataset=dataset)
reference = copy.deepcopy(run.vae)  # the single process, on rank 0
ref_optimizer = make_optimizer(recipe, reference.parameters())
step = EagerStep(run, skip_nonfinite=False, fast_path="off")  # inside DistributedDataParallel
m = recipe.batch_size // w.size
first_gradient_error, noise = None, torch.Generator().manual_seed(1)
for k in range(50):
    idx = torch.randperm(400, generator=noise)[: recipe.batch_size]
    z = torch.randn(recipe.batch_size, 3, generator=noise)
    mine = slice(w.rank * m, (w.rank + 1) * m)
    model, guide = run.vae.model.forward, run.vae.guide.forward
    run.vae.local_pair = lambda z=z[mine]: (model, with_z(guide, z))
    step(idx[mine], 1.0)
    ref_optimizer.zero_grad()
    ref_model, ref_guide = reference.local_pair()
    loss = run.estimator.differentiable_loss(ref_model, with_z(ref_guide, z), train[idx],
                                             num_data=400)
    loss.backward()
    if k == 0:
        first_gradient_error = max(((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
                                   for p, q in zip(run.vae.parameters(), reference.parameters()))
    ref_optimizer.step()
parameter_error = max(((p - q).abs().max() / q.abs().max()).item()
                      for p, q in zip(run.vae.parameters(), reference.parameters()))
moved = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), build_run(recipe, dataset).vae.parameters()))
if w.main:
    print(json.dumps({"world_size": w.size, "first_gradient_error": first_gradient_error,
                      "parameter_error_after_50": parameter_error, "moved": moved}))
distributed.shutdown()
