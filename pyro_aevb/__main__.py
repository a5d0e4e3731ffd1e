"""``python -m pyro_aevb ...`` is the ``pyro-aevb`` command."""

import sys

from .commands.cli import main

sys.exit(main())
