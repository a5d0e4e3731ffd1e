"""A computation recorded once as a graph of ATen operations (``make_fx``) and compiled by TorchInductor.

Both the training step (:mod:`pyro_aevb.training.tracing`) and the importance-sampled likelihood
(:mod:`pyro_aevb.evaluation.marginal_likelihood`) run the same Pyro model and guide thousands of times
on tensors of one shape. Recording the operations of one call skips Pyro's Python machinery on every
later call, and compiling the recording fuses the element-wise work around the matrix products
(``tanh``, the Bernoulli log-density over every pixel, the reductions) into C++ loops. Random draws
go through ATen's generator (``fallback_random``), so a seed gives the noise the eager call draws.

.. warning:: A recording has static shapes and control flow. Operations whose output shape depends
   on tensor values cannot be recorded faithfully: :func:`record` refuses them
   (``NotImplementedError``) and callers fall back to the eager computation.
"""

from __future__ import annotations

import contextlib
import logging

import torch

#: operations whose result's shape depends on tensor values (with a boolean index, for aten.index*)
_DATA_DEPENDENT = ("aten.nonzero", "aten.masked_select", "aten.argwhere", "aten.unique", "aten._unique",
                   "aten.unique_consecutive")
_INDEXING = ("aten.index.Tensor", "aten.index_put", "aten.index_put_", "aten._index_put_impl_")


def data_dependent_shape(graph: torch.fx.GraphModule) -> str | None:
    """The first operation of a ``make_fx`` graph whose output shape depends on the data, or None.

    ``make_fx`` records such a shape as the constant it had at trace time (``x[mask]`` with 21 true
    entries becomes a view of 21 elements), so replaying the graph would break or be wrong."""
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target).rsplit(".default", 1)[0]
        if name.startswith(_DATA_DEPENDENT):
            return name
        if name in _INDEXING:
            indices = node.args[1] if len(node.args) > 1 else ()
            for index in indices if isinstance(indices, (list, tuple)) else (indices,):
                value = getattr(index, "meta", {}).get("val")
                if value is not None and value.dtype in (torch.bool, torch.uint8):
                    return f"{name} with a boolean mask"
    return None


def record(fn, *example_inputs) -> torch.fx.GraphModule:
    """``fn``'s operations on ``example_inputs`` as an ATen graph; ``NotImplementedError`` for a shape
    that the data decides (the graph would replay it wrong)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(fn)(*example_inputs)
    data_dependent = data_dependent_shape(graph)
    if data_dependent is not None:
        raise NotImplementedError(f"a shape depends on the data: {data_dependent}")
    return graph


def compile_graph(graph: torch.fx.GraphModule):
    """TorchInductor on a recorded graph: one compiled function (``fullgraph``), the graph's shapes fixed
    (``dynamic=False``), ATen's random numbers (``fallback_random``)."""
    return torch.compile(graph, dynamic=False, fullgraph=True, options={"fallback_random": True})


@contextlib.contextmanager
def quiet_compiler():
    """TorchInductor's C++ build warns "No CUDA runtime is found" on CPU machines: keep that out of the way."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
