"""Raw WSI tiles on disk: CLAM's patch HDF5 files and image folders, per slide.

A ``patches`` modality (`survjax.data.cohort`) holds, per patient, a fixed number ``M`` of
RGB tiles ``uint8 [M, T, T, 3]``. Two layouts per slide are read:

* ``<tiles_dir>/<slide_id>.h5``: CLAM's ``create_patches`` output with ``--save_patches``
  (an ``imgs`` dataset ``[N, H, W, 3]`` uint8; a ``coords`` dataset is ignored);
* ``<tiles_dir>/<slide_id>/``: a folder of image files (``.png``, ``.jpg``, ``.jpeg``,
  ``.tif``, ``.tiff``), read in file-name order with Pillow and converted to RGB.

A case's slides are pooled in order; ``count`` tiles are taken evenly spaced over them
(a slide with fewer tiles than ``count`` repeats them in order). Tiles larger than
``tile_size`` by an integer factor are downsampled by averaging blocks of pixels (e.g.
the paper's 256 x 256 to 64 x 64 on a CPU); any other size is an error. A case without
any file is unavailable (zeros).

Every problem raises `survjax.errors.InputError` naming the file, the case and what was
expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from survjax.data.cohort import Modality
from survjax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def read_tiles_h5(path, *, case_id=None) -> np.ndarray:
  """CLAM's ``imgs`` dataset of one slide: uint8 ``[N, H, W, 3]``, N >= 1."""
  import h5py
  path = Path(path)
  try:
    with h5py.File(path, "r") as f:
      if "imgs" not in f:
        raise InputError(f"no 'imgs' dataset (found {sorted(f.keys())}), expected tiles "
                         "imgs [N, H, W, 3] uint8 (CLAM --save_patches)", path=path,
                         case_id=case_id)
      arr = np.asarray(f["imgs"][()])
  except InputError:
    raise
  except Exception as e:   # h5py raises OSError, KeyError, ... on corrupt files
    raise InputError(f"cannot read HDF5 file ({type(e).__name__}: {e}), expected an HDF5 "
                     "file with an 'imgs' dataset", path=path, case_id=case_id) from e
  return _check_tiles(arr, path, case_id)


def read_tile_folder(path, *, case_id=None) -> np.ndarray:
  """The image files of one folder, in name order, as uint8 RGB ``[N, H, W, 3]``."""
  from PIL import Image
  path = Path(path)
  files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise InputError(f"no image file, expected {'/'.join(IMAGE_EXTENSIONS)} tiles",
                     path=path, case_id=case_id)
  tiles = []
  for f in files:
    try:
      with Image.open(f) as im:
        tiles.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except Exception as e:
      raise InputError(f"cannot read image ({type(e).__name__}: {e}), expected an RGB tile",
                       path=f, case_id=case_id) from e
    if tiles[-1].shape != tiles[0].shape:
      raise InputError(f"tile of {tiles[-1].shape[1]}x{tiles[-1].shape[0]} pixels, expected "
                       f"{tiles[0].shape[1]}x{tiles[0].shape[0]} as {files[0].name}",
                       path=f, case_id=case_id)
  return np.stack(tiles)


def _check_tiles(arr: np.ndarray, path, case_id) -> np.ndarray:
  if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
    raise InputError(f"tiles of shape {arr.shape}, expected [N>0, H, W, 3]", path=path,
                     case_id=case_id)
  if arr.dtype != np.uint8:
    raise InputError(f"tiles of dtype {arr.dtype}, expected uint8 RGB", path=path,
                     case_id=case_id)
  return arr


def resize_tiles(tiles: np.ndarray, size: int, *, path=None, case_id=None) -> np.ndarray:
  """``[N, H, W, 3]`` to ``[N, size, size, 3]`` by averaging ``(H/size) x (W/size)``
  pixel blocks (rounded); H and W must be the same integer multiple of ``size``."""
  n, h, w, c = tiles.shape
  if h == w == size:
    return tiles
  if h != w or h % size:
    raise InputError(f"tiles of {w}x{h} pixels, expected square tiles of {size} pixels or "
                     f"a multiple of {size}", path=path, case_id=case_id)
  f = h // size
  x = tiles.reshape(n, size, f, size, f, c).astype(np.float64).mean(axis=(2, 4))
  return np.round(x).astype(np.uint8)


def take_evenly(tiles: np.ndarray, count: int) -> np.ndarray:
  """``count`` tiles at evenly spaced positions (all of them, repeated in order, when
  there are fewer)."""
  n = len(tiles)
  if n >= count:
    return tiles[np.linspace(0, n - 1, count).round().astype(int)]
  return tiles[np.arange(count) % n]


def _slide_source(tiles_dir: Path, slide_id: str) -> Path | None:
  stem = slide_id
  for ext in (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn"):
    if stem.lower().endswith(ext):
      stem = stem[: -len(ext)]
  for cand in (tiles_dir / f"{stem}.h5", tiles_dir / f"{stem}.hdf5", tiles_dir / stem,
               tiles_dir / "patches" / f"{stem}.h5"):
    if cand.is_file() or cand.is_dir():
      return cand
  return None


def read_slide_tiles(source: Path, *, case_id=None) -> np.ndarray:
  """One slide's tiles from a CLAM HDF5 file or an image folder."""
  source = Path(source)
  if source.is_dir():
    return read_tile_folder(source, case_id=case_id)
  return read_tiles_h5(source, case_id=case_id)


def tiles_modality(case_ids: Sequence[str], slide_ids: Sequence[Sequence[str]], tiles_dir,
                   *, count: int = 4, tile_size: int = 64) -> Modality:
  """A ``patches`` modality ``uint8 [n, count, tile_size, tile_size, 3]`` from
  ``tiles_dir`` (module docstring): per case, its slides' tiles pooled in order, ``count``
  taken evenly spaced; a case none of whose slides has tiles is unavailable.

  Raises:
    InputError: the directory is missing, a file is unreadable or malformed, or no case
      has tiles.
  """
  tiles_dir = Path(tiles_dir)
  if not tiles_dir.is_dir():
    raise InputError("tiles directory not found, expected a directory of <slide_id>.h5 "
                     "(CLAM imgs) files or <slide_id>/ image folders", path=tiles_dir)
  if count < 1 or tile_size < 1:
    raise InputError(f"tiles count {count} and size {tile_size}, expected both >= 1",
                     path="config.data.files.tiles")
  n = len(case_ids)
  values = np.zeros((n, count, tile_size, tile_size, 3), np.uint8)
  available = np.zeros(n, bool)
  for i, (cid, slides) in enumerate(zip(case_ids, slide_ids)):
    parts = []
    for s in slides:
      src = _slide_source(tiles_dir, s)
      if src is not None:
        parts.append(resize_tiles(read_slide_tiles(src, case_id=cid), tile_size, path=src,
                                  case_id=cid))
    if parts:
      values[i] = take_evenly(np.concatenate(parts), count)
      available[i] = True
  if not available.any():
    raise InputError("no tiles for any case, expected <slide_id>.h5 files with an 'imgs' "
                     "dataset or <slide_id>/ folders of images", path=tiles_dir)
  return Modality(kind="patches", available=available, values=values)
