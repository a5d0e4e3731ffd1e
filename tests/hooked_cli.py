"""``pyro-aevb`` with test hooks, for the crash and signal tests (the library itself has none).

Run as ``python tests/hooked_cli.py ARGS...``: the same command line as ``pyro-aevb ARGS...``, with

* ``PYRO_AEVB_TEST_KILL_AT_STEP=n``: SIGKILL this process right after step n's update;
* ``PYRO_AEVB_TEST_SIGNAL_AT_STEP=n:SIGTERM[:k]``: send it that signal there (default SIGINT), k times
  (default once: twice is a second Ctrl-C);
* ``PYRO_AEVB_TEST_KILL_IN_WRITE=NAME:n``: SIGKILL it in the middle of the n-th atomic write of the
  file NAME, once half its bytes reached the temporary file;
* under torchrun: ``PYRO_AEVB_TEST_KILL_RANK=r`` limits the step hooks to rank r, and
  ``PYRO_AEVB_TEST_KILL_GROUP_AT_STEP=n`` SIGKILLs the whole run after step n: every rank kills
  torchrun's agent (its parent) and itself.

The step hooks go in through ``train``'s ``callback``; the write hook wraps ``atomic_write``.
"""

import functools
import os
import signal
import sys

import pyro_aevb.commands.train as train_command
import pyro_aevb.training.checkpoint as checkpoint
from pyro_aevb.commands.cli import main


def at_step(step: int) -> None:
    rank = os.environ.get("RANK", "0")
    if os.environ.get("PYRO_AEVB_TEST_KILL_GROUP_AT_STEP") == str(step):
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("PYRO_AEVB_TEST_KILL_RANK", rank) != rank:
        return
    if os.environ.get("PYRO_AEVB_TEST_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    at, _, rest = os.environ.get("PYRO_AEVB_TEST_SIGNAL_AT_STEP", "").partition(":")
    name, _, times = rest.partition(":")
    if at == str(step):
        for _ in range(int(times or 1)):
            os.kill(os.getpid(), getattr(signal, name or "SIGINT"))


def kill_in_write(atomic_write, spec: str):
    name, n = spec.rsplit(":", 1)
    writes = {}

    def hooked(path, write):
        writes[path.name] = writes.get(path.name, 0) + 1
        if path.name != name or writes[path.name] != int(n):
            return atomic_write(path, write)

        def half_then_kill(f):
            write(f)
            f.flush()
            f.truncate(max(1, f.tell() // 2))
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        return atomic_write(path, half_then_kill)

    return hooked


if __name__ == "__main__":
    train_command.train = functools.partial(train_command.train, callback=at_step)
    if os.environ.get("PYRO_AEVB_TEST_KILL_IN_WRITE"):
        checkpoint.atomic_write = kill_in_write(checkpoint.atomic_write, os.environ["PYRO_AEVB_TEST_KILL_IN_WRITE"])
    sys.exit(main())
