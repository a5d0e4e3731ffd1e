"""The AEVB paper's Figure 2 curves, read from the vector drawing in its PDF -> models/figure2_paper.csv.

Kingma & Welling (arXiv:1312.6114v10, page 7) drew Figure 2 as vector paths: every curve is a polyline
whose vertices are the plotted points, and every panel has its major tick marks. This script renders
the page to SVG (``pdftocairo``, Debian's poppler-utils), takes the 36 coloured polylines of the nine
panels (red: AEVB, green: wake-sleep; dashed: test, solid: train), maps each panel's coordinates to
(log10 training samples, bound) by a straight-line fit through its tick marks (x: 10^5 ... 10^8; y:
-150 ... -100 for MNIST, 0 ... 1600 for Frey Face; the fit's residuals are printed), and writes each
curve resampled at log10 samples = 5.00, 5.05, ..., linearly interpolated between its vertices, where
the printed figure shows it: inside the panel's frame (MNIST: x to 10^8.4, y from -150 to -95; Frey
Face: x to 10^8, y from 0 to 1600). The PDF's paths run on outside the frames (every MNIST curve starts
near -240 at 10^5), but the printed figure clips them there, so no reading is given.

    python benchmarks/paper_figure2.py 1312.6114v10.pdf models/figure2_paper.csv

The PDF is arXiv's version 10 (1 May 2014); one copy is in the GitHub repository
CHENHUI-X/Deep-Learning-Classic-Papers ("Auto-Encoding Variational Bayes.pdf", commit b4edffb).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

MNIST = ("mnist_nz3", "mnist_nz5", "mnist_nz10", "mnist_nz20", "mnist_nz200")  # left to right, top row
FREY = ("frey_nz2", "frey_nz5", "frey_nz10", "frey_nz20")  # bottom row
STEP = 0.05
SVG = "{http://www.w3.org/2000/svg}"


def svg_paths(pdf: Path, page: int = 7) -> list[tuple[str, bool, np.ndarray]]:
    """(stroke colour, dashed, (n, 2) vertices) of every stroked path on the page."""
    with tempfile.TemporaryDirectory() as tmp:
        svg = Path(tmp) / "page.svg"
        subprocess.run(["pdftocairo", "-svg", "-f", str(page), "-l", str(page), str(pdf), str(svg)], check=True)
        tree = ET.parse(svg)
    paths = []
    for p in tree.iter(SVG + "path"):
        colour = re.search(r"stroke:(rgb\([^)]*\))", p.get("style", ""))
        if colour:
            # the longest subpath: a curve is one "M ... L ..." run (dashes are a style, not subpaths)
            subpaths = [s for s in re.split(r"M ", p.get("d")) if s.strip()]
            numbers = [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", max(subpaths, key=len))]
            paths.append((colour.group(1), "dash" in p.get("style"), np.array(numbers).reshape(-1, 2)))
    return paths


def panels(paths) -> list[dict]:
    """Each panel's frame and its tick-mark calibration, MNIST's five then Frey Face's four."""
    black = [v for c, _, v in paths if c == "rgb(0%,0%,0%)" and len(v) == 2]
    length = lambda s: float(np.hypot(*(s[1] - s[0])))
    spines = [s for s in black if s[0][1] == s[1][1] and length(s) > 100]  # horizontal frame edges
    ticks_x = [s for s in black if s[0][0] == s[1][0] and abs(length(s) - 4) < 0.1]
    ticks_y = [s for s in black if s[0][1] == s[1][1] and abs(length(s) - 4) < 0.1]
    edges = sorted({(min(s[0][0], s[1][0]), max(s[0][0], s[1][0]), s[0][1]) for s in spines})
    frames = []
    for x0, x1, y in edges:
        above = [s[0][1] for s in spines if min(s[0][0], s[1][0]) == x0 and s[0][1] > y]
        if above and min(above) - y > 100:
            frames.append((x0, x1, y, min(above)))
    frames.sort(key=lambda f: (-f[2], f[0]))  # the page is drawn upside down: the top row has larger y
    out = []
    for x0, x1, y0, y1 in frames:
        xs = sorted({s[0][0] for s in ticks_x if x0 - .01 <= s[0][0] <= x1 + .01 and y0 - 5 <= s[:, 1].min() <= y1 + 5})
        ys = sorted({s[0][1] for s in ticks_y if x0 - 5 <= s[:, 0].min() <= x1 + 5 and y0 - .01 <= s[0][1] <= y1 + .01})
        mnist = len(ys) == 6
        values = np.arange(-150, -99, 10) if mnist else np.arange(0, 1601, 200)
        if len(ys) != len(values) or len(xs) != 4:
            raise SystemExit(f"unexpected tick marks in the frame at x = {x0:.1f}: {len(xs)} x, {len(ys)} y")
        fx, fy = np.polyfit(xs, [5, 6, 7, 8], 1), np.polyfit(ys, values, 1)
        out.append({"frame": (x0, x1, y0, y1), "fx": fx, "fy": fy, "mnist": mnist,
                    "x_range": tuple(np.polyval(fx, [x0, x1])), "y_range": tuple(np.polyval(fy, [y0, y1])),
                    "residual": float(np.abs(np.polyval(fy, ys) - values).max())})
    names = iter(MNIST + FREY)
    for p in out:
        p["name"] = next(names)
    if [p["mnist"] for p in out] != [True] * 5 + [False] * 4:
        raise SystemExit("expected five MNIST panels above four Frey Face panels")
    return out


def curves(paths, panel: dict):
    """(estimator, split, log10 samples, bound) of the four curves inside the panel's frame."""
    x0, x1, y0, y1 = panel["frame"]
    for colour, dashed, v in paths:
        if colour == "rgb(0%,0%,0%)":
            continue
        inside = (v[:, 0] >= x0) & (v[:, 0] <= x1) & (v[:, 1] >= y0) & (v[:, 1] <= y1)
        if inside.sum() < 10:  # the legend's short strokes, and the other panels' curves
            continue
        estimator = "sgvb-b" if colour.startswith("rgb(100%") else "wake-sleep"
        yield estimator, "test" if dashed else "train", np.polyval(panel["fx"], v[:, 0]), np.polyval(panel["fy"], v[:, 1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pdf", type=Path, help="arXiv:1312.6114v10 as a PDF")
    parser.add_argument("out", type=Path, help="the CSV to write (models/figure2_paper.csv)")
    args = parser.parse_args(argv)
    paths = svg_paths(args.pdf)
    lines = [f"# {line}" if line else "#" for line in __doc__.strip().splitlines()[:12]]
    lines.append("panel,estimator,split,log10_samples,bound")
    for panel in panels(paths):
        found = 0
        for estimator, split, lx, bound in curves(paths, panel):
            order = np.argsort(lx)
            lx, bound = lx[order], bound[order]
            top = min(lx[-1], panel["x_range"][1])
            grid = np.arange(max(5.0, np.ceil(lx[0] / STEP) * STEP), top + 1e-9, STEP)
            values = np.interp(grid, lx, bound)
            low, high = panel["y_range"]
            shown = (values >= low) & (values <= high)  # what the printed figure shows of the curve
            if not shown.any() or not shown[shown.argmax():].all():
                raise SystemExit(f"{panel['name']} {estimator} {split}: the curve leaves the frame and comes back")
            for g, b in zip(grid[shown], values[shown]):
                lines.append(f"{panel['name']},{estimator},{split},{g:.2f},{b:.1f}")
            found += 1
            at = {t: float(np.interp(t, lx, bound)) for t in (6, 7, 8)}
            print(f"{panel['name']:<11} {estimator:<10} {split:<5} 1e6 {at[6]:8.1f}  1e7 {at[7]:8.1f}  "
                  f"1e8 {at[8]:8.1f}  shown from 10^{grid[shown][0]:.2f}  (y-tick fit residual "
                  f"{panel['residual']:.3f})", file=sys.stderr)
        if found != 4:
            raise SystemExit(f"{panel['name']}: found {found} curves, expected 4")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} lines to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
