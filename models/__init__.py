"""The recipes shipped with pyro-aevb: ``models/`` in the repository, the package ``pyro_aevb.recipes`` when
installed. Find one by name with ``pyro_aevb.load_recipe("mnist_nz20")``."""
