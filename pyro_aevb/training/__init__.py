"""The training runtime: the loop, its setup, the step (eager, JIT, compiled, CUDA graph), the NaN guard,
checkpoints, run directories and the CPU allocator setting.

Imports :mod:`pyro_aevb.config`, :mod:`pyro_aevb.data`, :mod:`pyro_aevb.generative`,
:mod:`pyro_aevb.infer`, :mod:`pyro_aevb.evaluation` and :mod:`pyro_aevb.plots` from this package.
"""
