"""Renders a per-slide attention file as a coordinate heatmap.

``python -m survjax.heatmap SLIDE_attention.h5 --out slide.png [--thumbnail thumb.png]``

The input is CLAM's layout, as ``--mode=predict --predict.attention=true`` writes it:
``coords [N, 2]`` (the patches' top-left corners at level 0, x then y) and ``scores [N]``.
Each patch is drawn as a square of the patch spacing (the smallest non-zero step between
coordinates) coloured by its score, percentile-ranked over the slide as CLAM does, so the
map shows where attention ranks highest whatever its absolute scale. No slide image is
needed; with ``--thumbnail`` (an image of the whole slide, any size) the map is drawn over
it, stretched to the coordinates' extent (``--alpha`` sets the overlay opacity).
Exit status 2 with one line on stderr on a bad input file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from survjax.errors import InputError
from survjax.io import atomic_save_figure


def read_attention(path) -> tuple[np.ndarray, np.ndarray]:
  """``(coords [N, 2], scores [N])`` of an attention file."""
  import h5py
  path = Path(path)
  if not path.is_file():
    raise InputError("attention file not found, expected <slide_id>_attention.h5", path=path)
  try:
    with h5py.File(path, "r") as f:
      missing = [k for k in ("coords", "scores") if k not in f]
      if missing:
        raise InputError(f"no {missing[0]!r} dataset (found {sorted(f.keys())}), expected "
                         "coords [N, 2] and scores [N]", path=path)
      coords = np.asarray(f["coords"][()], np.float64).reshape(-1, 2)
      scores = np.asarray(f["scores"][()], np.float64).reshape(-1)
  except InputError:
    raise
  except Exception as e:
    raise InputError(f"cannot read HDF5 file ({type(e).__name__}: {e})", path=path) from e
  if len(coords) != len(scores) or len(scores) == 0:
    raise InputError(f"{len(coords)} coordinates and {len(scores)} scores, expected the same "
                     "number > 0", path=path)
  return coords, scores


def _patch_size(coords: np.ndarray) -> float:
  steps = [np.diff(np.unique(coords[:, a])) for a in (0, 1)]
  steps = np.concatenate([s[s > 0] for s in steps])
  return float(steps.min()) if steps.size else 1.0


def percentile_ranks(scores: np.ndarray) -> np.ndarray:
  """Scores as percentile ranks in [0, 1] (ties share their mean rank)."""
  from scipy.stats import rankdata
  if len(scores) == 1:
    return np.ones(1)
  return (rankdata(scores) - 1) / (len(scores) - 1)


def render(coords, scores, out, *, thumbnail=None, alpha: float = 0.5, title: str = ""):
  """Writes the heatmap PNG to ``out`` (atomically)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.collections import PatchCollection
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  size = _patch_size(coords)
  x0, y0 = coords.min(axis=0)
  x1, y1 = coords.max(axis=0) + size
  aspect = (y1 - y0) / max(x1 - x0, 1e-9)
  fig = Figure(figsize=(6.0, max(2.0, min(12.0, 6.0 * aspect)) + 0.6), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if thumbnail is not None:
    from matplotlib.image import imread
    ax.imshow(imread(thumbnail), extent=(x0, x1, y1, y0), zorder=0)
  ranks = percentile_ranks(scores)
  rects = [Rectangle((x, y), size, size) for x, y in coords]
  coll = PatchCollection(rects, cmap="jet", alpha=alpha if thumbnail is not None else 1.0,
                         zorder=1)
  coll.set_array(ranks)
  coll.set_clim(0.0, 1.0)
  ax.add_collection(coll)
  ax.set_xlim(x0, x1)
  ax.set_ylim(y1, y0)   # image coordinates: y grows downwards
  ax.set_aspect("equal")
  ax.set_xticks([])
  ax.set_yticks([])
  fig.colorbar(coll, ax=ax, fraction=0.04, label="attention (percentile rank)")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return atomic_save_figure(fig, out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m survjax.heatmap", description=__doc__.split(
      "\n\n")[0])
  ap.add_argument("file", help="<slide_id>_attention.h5 (coords, scores)")
  ap.add_argument("--out", required=True, help="output PNG")
  ap.add_argument("--thumbnail", default=None, help="optional slide thumbnail image")
  ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity on a thumbnail")
  args = ap.parse_args(argv)
  try:
    coords, scores = read_attention(args.file)
    if args.thumbnail is not None and not Path(args.thumbnail).is_file():
      raise InputError("thumbnail not found, expected an image file", path=args.thumbnail)
    render(coords, scores, args.out, thumbnail=args.thumbnail, alpha=args.alpha,
           title=Path(args.file).name.removesuffix("_attention.h5"))
  except InputError as e:
    print(f"survjax.heatmap: bad input: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
