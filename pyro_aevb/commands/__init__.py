"""The ``pyro-aevb`` command line: the parser (:mod:`~pyro_aevb.commands.cli`), one module per subcommand,
and their shared plumbing (:mod:`~pyro_aevb.commands.common`).

May import everything else in the package; nothing imports it.
"""
