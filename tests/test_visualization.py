"""network/visualization.py (grid lines, TensorBoard panel, static figure) and train.py's val/panel image."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from network.layers import warp
from network.metrics import jacobian_determinant
from network.visualization import grid_lines, registration_figure, save_figure, slice_offsets, tensorboard_panel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blob(shape, centre, width=3.0):
    """Float32 (X, Y, Z) Gaussian blob, 0..1."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    return np.exp(-r2 / (2 * width ** 2)).astype(np.float32)


def test_grid_lines_on_multiples_of_every():
    shape, every = (17, 20, 9), 4
    g = grid_lines(shape, every)
    assert g.dtype == np.float32 and g.shape == shape
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    expected = (x % every == 0) | (y % every == 0) | (z % every == 0)
    np.testing.assert_array_equal(g, expected.astype(np.float32))
    shifted = grid_lines(shape, every, offset=(1, 2, 3))
    np.testing.assert_array_equal(shifted, (((x - 1) % 4 == 0) | ((y - 2) % 4 == 0) | ((z - 3) % 4 == 0)))
    assert slice_offsets((16, 20, 24), 8) == (4, 6, 0)          # centres 8, 10, 12 sit midway between planes


def test_identity_flow_leaves_grid_unchanged():
    g = torch.from_numpy(grid_lines((16, 12, 8), 4))[None, None]
    out = warp(g, torch.zeros(1, 3, 16, 12, 8))
    np.testing.assert_allclose(out.numpy(), g.numpy(), atol=1e-5)


def test_panel_shape_dtype_and_identity_columns():
    X, Y, Z = 16, 20, 24
    fixed = torch.from_numpy(blob((X, Y, Z), (7, 9, 11)))[None]
    moving = torch.from_numpy(blob((X, Y, Z), (8, 10, 12), 4.0))[None]
    flow = torch.zeros(3, X, Y, Z)
    warped = warp(moving[None], flow[None])[0]
    panel = tensorboard_panel(fixed, moving, warped, flow)
    h, w = max(Y, Z), max(X, Y)                                  # largest slice: 24 rows, 20 columns
    assert panel.dtype == np.uint8 and panel.shape == (1, 3 * h + 2 * 2, 5 * w + 4 * 2) == (1, 76, 108)
    cell = lambda r, c: panel[0, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w].astype(int)  # noqa: E731
    for r in range(3):
        assert np.abs(cell(r, 2) - cell(r, 1)).max() <= 1        # warped == moving under the identity
        assert cell(r, 0).max() > 200 and cell(r, 1).max() > 200
    # a leading batch dim of 1 is accepted and gives the same panel
    same = tensorboard_panel(fixed[None], moving[None], warped[None], flow[None])
    np.testing.assert_array_equal(same, panel)


def test_panel_orientation():
    """Axial: rows = axis 1, cols = axis 0; coronal/sagittal: superior (high axis 2) at the top."""
    X, Y, Z = 16, 16, 16
    vol = np.zeros((X, Y, Z), np.float32)
    vol[3, 5, 8] = 1.0                                          # in the axial centre slice (k = 8)
    vol[2, 8, 13] = 1.0                                         # in the coronal centre slice (j = 8)
    vol[8, 4, 12] = 1.0                                         # in the sagittal centre slice (i = 8)
    t = torch.from_numpy(vol)
    panel = tensorboard_panel(t, t, t, torch.zeros(3, X, Y, Z))[0]
    bright = lambda r: tuple(np.argwhere(panel[r * 18:r * 18 + 16, :16] > 128)[0])  # noqa: E731
    assert bright(0) == (5, 3)                                  # axial (row j, col i)
    assert bright(1) == (Z - 1 - 13, 2)                         # coronal (superior at top, col i)
    assert bright(2) == (Z - 1 - 12, 4)                         # sagittal (superior at top, col j)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="flow"):
        tensorboard_panel(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), torch.zeros(2, 8, 8, 8))
    with pytest.raises(ValueError, match="moving"):
        tensorboard_panel(torch.zeros(8, 8, 8), torch.zeros(8, 8, 4), torch.zeros(8, 8, 8), torch.zeros(3, 8, 8, 8))


def figure_inputs(shape=(24, 20, 12)):
    fixed = blob(shape, (11, 9, 6), 4.0)
    moving = blob(shape, (13, 10, 6), 4.0)
    flow = torch.zeros(1, 3, *shape)
    flow[:, 0] = 2.0
    flow[:, 1] = 1.0
    warped = warp(torch.from_numpy(moving)[None, None], flow)[0, 0].numpy()
    lines = grid_lines(shape, 4, slice_offsets(shape, 4))
    disp = warp(torch.from_numpy(lines)[None, None], flow)[0, 0].numpy()
    jac = jacobian_determinant(flow)[0].numpy()                 # (X-1, Y-1, Z-1)
    return fixed, moving, warped, disp, jac


def test_registration_figure_png(tmp_path):
    import matplotlib.image as mpimg
    fixed, moving, warped, disp, jac = figure_inputs()
    fixed_label = (fixed > 0.5).astype(np.float32) + (fixed > 0.8)
    moving_label = (moving > 0.5).astype(np.float32) + (moving > 0.8)
    fig = registration_figure(fixed, moving, warped, disp, jac, spacing=(0.8, 1.0, 3.0), center=(11, 9, 6),
                              title="pair 1", fixed_label=fixed_label, moving_label=moving_label,
                              warped_label=moving_label)
    path = tmp_path / "reg.png"
    assert save_figure(fig, str(path)) == str(path)
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert os.listdir(tmp_path) == ["reg.png"]                  # no temp file left behind
    panels = [ax for ax in fig.axes if ax.get_subplotspec() is not None and ax.images]
    grid = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in panels}
    assert grid == {(r, c) for r in range(3) for c in range(7)}
    assert len(fig.axes) >= 21 + 1                              # + colour bar(s)
    assert fig.axes[0].get_images()[0].get_array().shape == (20, 24)   # axial: rows = axis 1, cols = axis 0


def test_save_figure_removes_temp_on_failure(tmp_path):
    fig = registration_figure(*figure_inputs((8, 8, 8)))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    fig.savefig = boom
    from network.outputs import OutputError
    with pytest.raises(OutputError, match=r"x\.png: cannot write \(disk full\)"):
        save_figure(fig, str(tmp_path / "x.png"))
    assert os.listdir(tmp_path) == []


def test_validate_returns_panel_and_restores_train_mode():
    from network import ModelConfig, training as train, build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_network="Lite", preset="lite", image_size=(32, 32, 32), channels=4))
    model.train()
    seg = torch.zeros(2, 1, 32, 32, 32)
    seg[:, :, 8:20, 8:20, 8:20] = 255
    batch = {"voxel1": torch.rand(2, 1, 32, 32, 32), "voxel2": torch.rand(2, 1, 32, 32, 32),
             "seg1": seg, "seg2": seg, "id1": ["a", "b"], "id2": ["c", "d"]}
    metrics, panel = train.validate(model, [batch], torch.device("cpu"), None)
    assert model.training
    assert "dice" in metrics
    assert panel.dtype == np.uint8 and panel.shape == (1, 3 * 32 + 4, 5 * 32 + 8)


def test_train_logs_val_panel_to_tensorboard(tmp_path):
    from data_util.synthetic import generate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    generate(str(tmp_path / "data"), size=32, n_train=2, n_val=2, seed=3)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "-b", "Lite", "-g", "-1", "--channels", "4",
                        "--steps", "2", "--batch", "1", "--val_steps", "2", "--val_pairs", "1", "--workers", "0",
                        "--threads", "1", "--output", "vis", "-d", "data/synthetic.json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(tmp_path / "logs" / "vis"), size_guidance={"images": 0}).Reload()
    assert "val/panel" in acc.Tags()["images"]
    event = acc.Images("val/panel")[-1]
    assert event.step == 2 and event.height == 3 * 32 + 4 and event.width == 5 * 32 + 8
