"""Strip outputs, execution counts and run-time metadata from notebooks before committing them.

    python notebooks/strip_outputs.py                 # every notebook in notebooks/
    python notebooks/strip_outputs.py path/to/nb.ipynb
    python notebooks/strip_outputs.py --check         # exit 1 if any notebook carries outputs (CI, pre-commit)

Each code cell keeps its source only: ``outputs`` are emptied, ``execution_count`` set to null and the
per-cell ``execution`` timings and ``collapsed``/``scrolled`` view state dropped. The notebook's metadata
keeps the kernel spec and the language name only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled", "ExecuteTime")
NOTEBOOK_METADATA_KEPT = ("kernelspec",)


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strip ``nb`` in place; return True if anything changed."""
    changed = False
    for cell in nb.cells:
        for key in CELL_METADATA_DROPPED:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs = []
            cell.execution_count = None
            changed = True
    metadata = {key: nb.metadata[key] for key in NOTEBOOK_METADATA_KEPT if key in nb.metadata}
    metadata["language_info"] = {"name": nb.metadata.get("language_info", {}).get("name", "python")}
    if metadata != nb.metadata:
        nb.metadata = nbformat.from_dict(metadata)
        changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook needs stripping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{'needs stripping' if args.check else 'stripped'}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
