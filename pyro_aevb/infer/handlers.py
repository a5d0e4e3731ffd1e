"""Poutine handlers the objectives share.

:class:`NonReparam` draws the guide's latent sites without a reparameterised
path, which turns Pyro's pathwise gradient into the score-function one (the
REINFORCE estimator of :mod:`pyro_aevb.infer.score_function`) and gives wake-sleep
and reweighted wake-sleep draws of z that carry no gradient into the guide.
"""

from __future__ import annotations

import copy

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample


def without_rsample(fn: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """A shallow copy of ``fn`` whose ``has_rsample`` is False, so Pyro samples it with ``.sample()`` (no path).

    ``Independent`` (and Pyro's masked/expanded wrappers) answer ``has_rsample``
    from their ``base_dist`` through a read-only property: copy the wrapper and
    recurse into the base.
    """
    if not fn.has_rsample:
        return fn
    new = copy.copy(fn)
    if isinstance(getattr(type(fn), "has_rsample", None), property):
        if not hasattr(fn, "base_dist"):
            raise NotImplementedError(f"cannot turn off reparameterisation of {type(fn).__name__}")
        new.base_dist = without_rsample(fn.base_dist)
    else:
        new.has_rsample = False
    assert not new.has_rsample
    return new


class NonReparam(Messenger):
    """Latent sample sites are drawn without a reparameterised path: z ~ q, detached.

    Use it *around* an inference call (outside every plate, so it acts after the
    plates have broadcast the site's distribution). It leaves alone observed
    sites, subsample sites and sites whose value is already given (e.g. the
    model's replayed z). ``infer``, a function of the site's message, returns
    entries merged into the site's ``infer`` dict (e.g. baseline options).
    """

    def __init__(self, infer=None):
        super().__init__()
        self.infer = infer

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or msg["done"] or isinstance(msg["fn"], _Subsample):
            return
        msg["fn"] = without_rsample(msg["fn"])
        if self.infer is not None:
            msg["infer"] = {**(msg["infer"] or {}), **self.infer(msg)}
