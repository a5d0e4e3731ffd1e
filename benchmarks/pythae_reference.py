"""pythae's own VAE reproduction (89.78 nats, K = 200), run here, and its weights scored by pyro-aevb.

pythae (github.com/clementchadebec/benchmark_VAE) reports a test NLL of 89.78 (K = 200 importance
samples, mean of 5 rounds) for a 784-400-40 ReLU VAE on statically binarized MNIST, made by its
``examples/scripts/reproducibility/vae.py``: Adam lr 1e-4, 500 epochs, ``MultiStepLR`` (epochs 200,
350, 500, 750, 1000; gamma 10^(-1/5)), batch 100, the best model by the validation loss. This script
runs that training unchanged but for the data path, one thread, and a checkpoint of the best model so
far every 20 epochs; scores a checkpoint with pythae's own ``get_nll``; and turns a checkpoint into a
pyro-aevb run directory (recipe ``vae_mnist_nll``: the same network), so ``pyro-aevb evaluate`` scores
the very same weights with this project's estimator.

pythae is not a dependency of pyro-aevb: the ``train`` and ``nll`` steps run in an environment with
pythae (``python -m venv --system-site-packages ENV && ENV/bin/pip install pythae``); ``import`` runs
in pyro-aevb's own environment and reads only the tensors (``torch.load(weights_only=True)``).

    ENV/bin/python benchmarks/pythae_reference.py train OUT --data-dir ../shared/data
    ENV/bin/python benchmarks/pythae_reference.py nll OUT/VAE_training_*/final_model --data-dir ../shared/data
    python benchmarks/pythae_reference.py import OUT/VAE_training_*/final_model RUN_DIR
    pyro-aevb evaluate RUN_DIR --num-samples 200 --seed 0 --json --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

#: pythae's parameter names -> this project's (the same 784-400-40 network; the decoder's sigmoid is
#: pythae's output layer, the Bernoulli logits here)
NAMES = {
    "encoder.layers.0.0.weight": "encoder.hidden.0.weight", "encoder.layers.0.0.bias": "encoder.hidden.0.bias",
    "encoder.embedding.weight": "encoder.loc.weight", "encoder.embedding.bias": "encoder.loc.bias",
    "encoder.log_var.weight": "encoder.log_var.weight", "encoder.log_var.bias": "encoder.log_var.bias",
    "decoder.layers.0.0.weight": "decoder.logits.0.weight", "decoder.layers.0.0.bias": "decoder.logits.0.bias",
    "decoder.layers.1.0.weight": "decoder.logits.2.weight", "decoder.layers.1.0.bias": "decoder.logits.2.bias",
}


def _amat(data_dir: str, split: str) -> np.ndarray:
    return np.loadtxt(Path(data_dir) / "binarized_mnist" / f"binarized_mnist_{split}.amat")


def _networks():
    """pythae's reproduction networks (vae.py), written compactly: the same layers and outputs."""
    import torch.nn as nn
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self, args):
            BaseEncoder.__init__(self)
            self.input_dim, self.latent_dim = args.input_dim, args.latent_dim
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(int(np.prod(args.input_dim)), 400), nn.ReLU())])
            self.depth = 1
            self.embedding = nn.Linear(400, self.latent_dim)
            self.log_var = nn.Linear(400, self.latent_dim)

        def forward(self, x, output_layer_levels=None):
            h = self.layers[0](x.reshape(-1, int(np.prod(self.input_dim))))
            return ModelOutput(embedding=self.embedding(h), log_covariance=self.log_var(h))

    class Decoder(BaseDecoder):
        def __init__(self, args):
            BaseDecoder.__init__(self)
            self.input_dim = args.input_dim
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(args.latent_dim, 400), nn.ReLU()),
                                         nn.Sequential(nn.Linear(400, int(np.prod(args.input_dim))), nn.Sigmoid())])
            self.depth = 2

        def forward(self, z, output_layer_levels=None):
            out = self.layers[1](self.layers[0](z))
            return ModelOutput(reconstruction=out.reshape((z.shape[0],) + self.input_dim))

    return Encoder, Decoder


def _model(config=None):
    from pythae.models import VAE, VAEConfig

    config = config or VAEConfig(input_dim=(784,), latent_dim=40, reconstruction_loss="bce")
    Encoder, Decoder = _networks()
    return VAE(model_config=config, encoder=Encoder(config), decoder=Decoder(config))


def train(args) -> None:
    from pythae.data.preprocessors import DataProcessor
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    torch.set_num_threads(args.threads)
    processor = DataProcessor()
    train_set, valid_set = (processor.to_dataset(processor.process_data(_amat(args.data_dir, s)).reshape(-1, 1, 28, 28))
                            for s in ("train", "valid"))
    config = BaseTrainerConfig(
        output_dir=str(args.out), per_device_train_batch_size=100, per_device_eval_batch_size=100,
        num_epochs=args.epochs, learning_rate=1e-4, steps_saving=20, steps_predict=None, no_cuda=True,
        scheduler_cls="MultiStepLR",
        scheduler_params={"milestones": [200, 350, 500, 750, 1000], "gamma": 10 ** (-1 / 5)})
    model = _model()
    torch.manual_seed(123)  # vae.py's seed, where vae.py sets it: after the model is built
    BaseTrainer(model=model, train_dataset=train_set, eval_dataset=valid_set, training_config=config).train()


def nll(args) -> None:
    """pythae's ``get_nll`` (K = 200 by default), ``--rounds`` times, as vae.py reports it."""
    torch.set_num_threads(args.threads)
    model = _model()
    state = torch.load(Path(args.checkpoint) / "model.pt", weights_only=True)["model_state_dict"]
    model.load_state_dict(state)
    model.eval()
    test = torch.tensor(_amat(args.data_dir, "test"), dtype=torch.float)
    if args.max_datapoints:
        test = test[: args.max_datapoints]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        rounds = [float(model.get_nll(test, n_samples=args.num_samples)) for _ in range(args.rounds)]
    print(json.dumps({"checkpoint": str(args.checkpoint), "estimator": "pythae get_nll", "num_samples": args.num_samples,
                      "n": len(test), "rounds": rounds, "mean": float(np.mean(rounds)), "std": float(np.std(rounds)),
                      "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "machine": platform.processor() or platform.machine()}))


def import_checkpoint(args) -> None:
    """A pythae checkpoint as a pyro-aevb run directory (checkpoint.pt and best.pt: the same weights)."""
    from pyro_aevb.config import load_recipe
    from pyro_aevb.generative.vae import build_vae
    from pyro_aevb.training.checkpoint import save_checkpoint

    state = torch.load(Path(args.checkpoint) / "model.pt", weights_only=True)["model_state_dict"]
    if set(state) != set(NAMES):
        raise SystemExit(f"{args.checkpoint}: not pythae's 784-400-40 VAE (parameters {sorted(state)})")
    recipe = load_recipe("vae_mnist_nll")
    vae = build_vae(recipe, 784)
    ours = {NAMES[k]: v for k, v in state.items()}
    ours.update({k: v for k, v in vae.state_dict().items() if k.startswith("prior.")})  # N(0, I), as pythae's
    vae.load_state_dict(ours)  # strict: every parameter mapped
    out = Path(args.run_dir)
    if out.exists():
        raise SystemExit(f"{out} already exists: choose another run directory")
    out.mkdir(parents=True)
    payload = {"model": vae.state_dict(), "step": 0, "recipe": recipe.to_dict(), "image_shape": [28, 28],
               "data_dim": 784}
    for name in ("checkpoint.pt", "best.pt"):
        save_checkpoint(out / name, **payload)
    (out / "pythae.json").write_text(json.dumps({"imported_from": str(Path(args.checkpoint).resolve())}) + "\n")
    print(f"wrote {out} (pythae's weights under recipe vae_mnist_nll); score it with "
          f"`pyro-aevb evaluate {out} --num-samples 200`")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("train", help="pythae's vae.py (needs pythae)")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=500)
    p.set_defaults(func=train)
    p = sub.add_parser("nll", help="pythae's get_nll on a checkpoint (needs pythae)")
    p.add_argument("checkpoint")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-datapoints", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=nll)
    p = sub.add_parser("import", help="a pythae checkpoint as a pyro-aevb run directory")
    p.add_argument("checkpoint")
    p.add_argument("run_dir")
    p.set_defaults(func=import_checkpoint)
    for p in sub.choices.values():
        p.add_argument("--data-dir", default=os.environ.get("PYRO_AEVB_DATA", "../shared/data"))
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
