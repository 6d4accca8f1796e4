"""grids.py: [-1, 1] batches -> uint8 pictures and PNG grids."""
import numpy as np
import pytest
import torch
from PIL import Image

from grids import make_grid, save_grid, to_uint8


def test_to_uint8_maps_range_and_clips():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8(x)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0]
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 4, 4))


def test_grid_layout_and_png(tmp_path):
    images = torch.stack([torch.full((3, 4, 4), -1.0 + 2 * i / 9) for i in range(10)])
    grid = make_grid(images, nrow=8, padding=2)
    assert grid.shape == (2 * 6 + 2, 8 * 6 + 2, 3)
    assert grid[2, 2, 0] == 0 and grid[2 + 6, 2 + 6, 0] == to_uint8(images[9:10])[0, 0, 0, 0]
    path = save_grid(images, tmp_path / "s" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
