"""Raw WSI tile readers (`survjax.data.tiles`): CLAM's HDF5 ``imgs`` and image folders."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from file_cohort import write_file_cohort
from survjax.data.formats import load_file_cohort
from survjax.data.tiles import (read_tile_folder, read_tiles_h5, resize_tiles, take_evenly,
                                tiles_modality)
from survjax.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _tiles(n, size, seed):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _write_h5(path, imgs):
  with h5py.File(path, "w") as f:
    f["imgs"] = imgs
    f["coords"] = np.arange(2 * len(imgs)).reshape(-1, 2)


def _write_folder(path, imgs):
  path.mkdir(parents=True)
  for j, im in enumerate(imgs):   # names sort in tile order; PNG is lossless
    Image.fromarray(im).save(path / f"tile_{j:03d}.png")


def test_clam_h5_and_image_folder_read_the_same_tiles(tmp_path):
  imgs = _tiles(5, 32, 0)
  _write_h5(tmp_path / "s.h5", imgs)
  _write_folder(tmp_path / "s", imgs)
  np.testing.assert_array_equal(read_tiles_h5(tmp_path / "s.h5"), imgs)
  np.testing.assert_array_equal(read_tile_folder(tmp_path / "s"), imgs)


def test_resize_averages_pixel_blocks_and_take_evenly_spaces():
  imgs = _tiles(2, 8, 1)
  small = resize_tiles(imgs, 4)
  expect = np.round(imgs.astype(float).reshape(2, 4, 2, 4, 2, 3).mean((2, 4)))
  np.testing.assert_array_equal(small, expect.astype(np.uint8))
  assert resize_tiles(imgs, 8) is imgs
  with pytest.raises(InputError, match="multiple of 3"):
    resize_tiles(imgs, 3)
  seq = np.arange(10)
  np.testing.assert_array_equal(take_evenly(seq, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(take_evenly(seq[:3], 5), [0, 1, 2, 0, 1])


def test_tiles_modality_pools_a_cases_slides_and_marks_cases_without_tiles(tmp_path):
  a, b, c = _tiles(2, 64, 2), _tiles(3, 64, 3), _tiles(4, 128, 4)
  _write_h5(tmp_path / "A-1.h5", a)
  _write_folder(tmp_path / "A-2", b)
  _write_h5(tmp_path / "B-1.h5", c)   # 128 px: halved
  mod = tiles_modality(["A", "B", "C"], [["A-1.svs", "A-2"], ["B-1"], ["C-1"]], tmp_path,
                       count=4, tile_size=64)
  assert mod.kind == "patches" and mod.values.shape == (3, 4, 64, 64, 3)
  np.testing.assert_array_equal(mod.available, [True, True, False])
  pooled = np.concatenate([a, b])
  np.testing.assert_array_equal(mod.values[0], pooled[[0, 1, 3, 4]])   # evenly spaced of 5
  np.testing.assert_array_equal(mod.values[1], resize_tiles(c, 64))
  assert not mod.values[2].any()


def test_bad_tiles_are_one_line_naming_file_and_case(tmp_path):
  with h5py.File(tmp_path / "x.h5", "w") as f:
    f["features"] = np.zeros((3, 4), np.float32)
  with pytest.raises(InputError, match=r"x\.h5: case C7: no 'imgs' dataset"):
    read_tiles_h5(tmp_path / "x.h5", case_id="C7")
  with h5py.File(tmp_path / "y.h5", "w") as f:
    f["imgs"] = np.zeros((3, 8, 8, 3), np.float32)
  with pytest.raises(InputError, match="dtype float32, expected uint8"):
    read_tiles_h5(tmp_path / "y.h5")
  _write_folder(tmp_path / "f", _tiles(1, 16, 0))
  Image.fromarray(_tiles(1, 8, 0)[0]).save(tmp_path / "f" / "tile_999.png")
  with pytest.raises(InputError, match=r"tile_999\.png: case C1: tile of 8x8 pixels, "
                                       r"expected 16x16"):
    read_tile_folder(tmp_path / "f", case_id="C1")
  with pytest.raises(InputError, match="no tiles for any case"):
    tiles_modality(["C"], [["nothing"]], tmp_path)


def test_file_cohort_with_tiles_and_the_cli_error(tmp_path):
  info = write_file_cohort(tmp_path, n_patients=12)
  tiles_dir = tmp_path / "tiles"
  tiles_dir.mkdir()
  stems = []
  for j, cid in enumerate(info["case_ids"][:8]):   # 4 cases without tiles
    sid = info["slides"][cid][0]
    stem = sid[:-4] if sid.endswith(".svs") else sid
    _write_h5(tiles_dir / f"{stem}.h5", _tiles(6, 32, j))
    stems.append(stem)
  cohort = load_file_cohort(info["csv"], name="t", features_dir=info["features"],
                            tiles_dir=tiles_dir, tiles_count=3, tile_size=32)
  tiles = cohort.modalities["tiles"]
  assert tiles.values.shape == (12, 3, 32, 32, 3)
  assert tiles.available.sum() == 8
  # A broken file: the CLI stops with one line naming it, status 2.
  with h5py.File(tiles_dir / f"{stems[0]}.h5", "w") as f:
    f["imgs"] = np.zeros((2, 32, 32), np.uint8)
  args = [sys.executable, "-m", "survjax.main", f"--config={REPO}/configs/imputmae.py:tiles",
          "--config.data.source=files", f"--config.data.files.clinical_csv={info['csv']}",
          f"--config.data.files.tiles_dir={tiles_dir}", "--config.data.files.tile_size=32",
          f"--workdir={tmp_path}/run"]
  p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and f"{stems[0]}.h5" in lines[0] and "expected [N>0, H, W, 3]" in lines[0]
  assert not (tmp_path / "run").exists()
