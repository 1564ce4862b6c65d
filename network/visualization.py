"""Pictures of a registration: a TensorBoard montage and a static matplotlib figure.

Conventions as in :mod:`network.layers`: a flow is ``(B, 3, X, Y, Z)`` voxel displacements, channel
``c`` moves along axis ``c``, pull-back warping ``warped(p) = moving(p + u(p))``.

Display orientation (radiological, for grids whose axes are LPS: axis 0 toward patient Left,
axis 1 toward Posterior, axis 2 toward Superior):

* axial (slice along axis 2): rows = axis 1 (anterior at the top), columns = axis 0 (patient right
  on the image left);
* coronal (slice along axis 1): rows = axis 2 (superior at the top), columns = axis 0;
* sagittal (slice along axis 0): rows = axis 2 (superior at the top), columns = axis 1 (anterior
  on the image left).

The figure functions use :class:`matplotlib.figure.Figure` with an Agg canvas, never ``pyplot``, so
they keep no global state and are safe in training loops and worker threads.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .outputs import atomic_output
from .layers import warp

__all__ = ["grid_lines", "slice_offsets", "tensorboard_panel", "registration_figure", "save_figure"]

_VIEWS = ("axial", "coronal", "sagittal")
_SEPARATOR = 2          # pixels between montage cells
_SEPARATOR_VALUE = 96   # grey level of the separator pixels
_MAX_LABELS = 8


def grid_lines(shape, every: int = 8, offset=0) -> np.ndarray:
    """Float32 ``(X, Y, Z)`` volume: 1 on the planes at ``offset + n * every`` along each axis, else 0.

    Warping it with a flow (bilinear) renders the deformation as a bent grid. ``offset`` (an int or
    one per axis, default 0: lines at multiples of ``every``) lets a caller keep a displayed slice
    off the grid planes, where it would otherwise be a solid sheet.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (X, Y, Z), got {shape}")
    offsets = (offset,) * 3 if np.ndim(offset) == 0 else tuple(offset)
    if len(offsets) != 3:
        raise ValueError(f"offset must be an int or 3 ints, got {offset}")
    ox, oy, oz = (int(o) % every for o in offsets)
    out = np.zeros(shape, np.float32)
    out[ox::every, :, :] = 1.0
    out[:, oy::every, :] = 1.0
    out[:, :, oz::every] = 1.0
    return out


def slice_offsets(shape, every: int = 8, center=None) -> tuple:
    """Per-axis :func:`grid_lines` offsets that put the slices through ``center`` (default: the volume
    centre) midway between grid planes."""
    if center is None:
        center = tuple(int(s) // 2 for s in shape)
    return tuple((int(c) + every // 2) % every for c in center)


def _warped_grid(flow: torch.Tensor, every: int = 8) -> torch.Tensor:
    """Grid lines (kept off the centre slices) warped by ``flow`` ``(1, 3, X, Y, Z)``; ``(X, Y, Z)``."""
    shape = tuple(flow.shape[2:])
    lines = grid_lines(shape, every, slice_offsets(shape, every))
    grid = torch.from_numpy(lines).to(flow.device, flow.dtype)
    return warp(grid[None, None], flow, mode="bilinear")[0, 0]


def _views(volume: np.ndarray, center=None) -> list:
    """Axial, coronal, sagittal 2D slices of ``volume`` ``(X, Y, Z)`` as displayed (row 0 = top)."""
    X, Y, Z = volume.shape
    i, j, k = (X // 2, Y // 2, Z // 2) if center is None else center
    axial = volume[:, :, k].T                # rows axis 1 (anterior top), cols axis 0
    coronal = volume[:, j, :].T[::-1]        # rows axis 2 reversed (superior top), cols axis 0
    sagittal = volume[i, :, :].T[::-1]       # rows axis 2 reversed (superior top), cols axis 1
    return [axial, coronal, sagittal]


def _volume3d(t, name: str, channels: int = 1) -> torch.Tensor:
    """Tensor ``(X, Y, Z)``, ``(C, X, Y, Z)`` or ``(1, C, X, Y, Z)`` -> tensor ``(C, X, Y, Z)`` (detached, device and dtype kept)."""
    t = torch.as_tensor(t).detach()
    while t.dim() > 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3 and channels == 1:
        t = t[None]
    if t.dim() != 4 or t.shape[0] != channels:
        want = "(X, Y, Z) or (1, X, Y, Z)" if channels == 1 else f"({channels}, X, Y, Z)"
        raise ValueError(f"{name} must have shape {want} (optionally with a leading batch of 1), "
                         f"got {tuple(t.shape)}")
    return t


def _robust_range(*volumes: np.ndarray, lo: float = 1.0, hi: float = 99.0):
    """``(low, high)`` percentiles of the union of ``volumes`` (subsampled above ~2M voxels)."""
    parts = []
    for v in volumes:
        step = max(1, int(round((v.size / 1e6) ** (1 / 3))))
        parts.append(np.asarray(v[::step, ::step, ::step], np.float64).ravel())
    values = np.concatenate(parts)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(values, [lo, hi])
    if not b > a:
        a, b = float(values.min()), float(values.max())
        if not b > a:
            b = a + 1.0
    return float(a), float(b)


def tensorboard_panel(fixed, moving, warped, flow) -> np.ndarray:
    """uint8 ``(1, H, W)`` montage (CHW, for ``SummaryWriter.add_image(..., dataformats="CHW")``).

    Inputs are tensors of ONE pair: ``fixed``, ``moving``, ``warped`` ``(X, Y, Z)`` or ``(1, X, Y, Z)``,
    ``flow`` ``(3, X, Y, Z)`` voxel displacements (each may carry a leading batch dim of 1).
    Rows: centre slices along axis 2 (axial), 1 (coronal), 0 (sagittal), oriented as in the module
    docstring. Columns: fixed | moving | warped | |fixed - warped| | grid lines warped by ``flow``
    (every 8 voxels, offset by :func:`slice_offsets` so no centre slice lies on a grid plane).
    Intensities map the 1st-99th percentile of fixed ∪ moving to 0-255 (the difference uses the same
    scale from 0); the grid is 0-1 -> 0-255. Each slice is zero-padded (bottom/right) to the largest
    slice size ``h x w``, cells are separated by 2 grey pixels: ``H = 3h + 4``, ``W = 5w + 8``.
    """
    fixed_t, moving_t, warped_t = (_volume3d(t, n) for t, n in
                                   ((fixed, "fixed"), (moving, "moving"), (warped, "warped")))
    flow_t = _volume3d(flow, "flow", channels=3)
    shape = tuple(fixed_t.shape[1:])
    for name, t in (("moving", moving_t), ("warped", warped_t), ("flow", flow_t)):
        if tuple(t.shape[1:]) != shape:
            raise ValueError(f"{name} size {tuple(t.shape[1:])} differs from fixed {shape}")
    grid = _warped_grid(flow_t[None].float()).cpu().numpy()
    f, m, w = (t[0].float().cpu().numpy() for t in (fixed_t, moving_t, warped_t))
    lo, hi = _robust_range(f, m)
    scale = lambda v: np.clip((v - lo) / (hi - lo), 0.0, 1.0)  # noqa: E731
    columns = [scale(f), scale(m), scale(w), np.clip(np.abs(f - w) / (hi - lo), 0.0, 1.0), np.clip(grid, 0.0, 1.0)]
    cells = [_views(c) for c in columns]                       # cells[col][row]
    h = max(v.shape[0] for col in cells for v in col)
    w_ = max(v.shape[1] for col in cells for v in col)
    s = _SEPARATOR
    out = np.full((3 * h + 2 * s, 5 * w_ + 4 * s), _SEPARATOR_VALUE, np.uint8)
    for c, col in enumerate(cells):
        for r, view in enumerate(col):
            y0, x0 = r * (h + s), c * (w_ + s)
            out[y0:y0 + h, x0:x0 + w_] = 0
            out[y0:y0 + view.shape[0], x0:x0 + view.shape[1]] = np.round(view * 255.0).astype(np.uint8)
    return out[None]


# --------------------------------------------------------------------------- static figure

def _as_volume(a, name: str, shape=None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3D array (X, Y, Z), got shape {a.shape}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} shape {a.shape} differs from fixed {tuple(shape)}")
    return a


def _label_values(*labels) -> list:
    """Up to 8 non-zero label values of the given maps, the largest (by voxel count) first."""
    counts = {}
    for lab in labels:
        if lab is None:
            continue
        values, n = np.unique(lab, return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            if v != 0:
                counts[v] = counts.get(v, 0) + c
    return sorted(counts, key=lambda v: -counts[v])[:_MAX_LABELS]


def _draw_contours(ax, label_slice: np.ndarray, values: list, colors: list, linestyle: str = "solid") -> None:
    """One contour per label value; pixel (r, c) sits at data (c, r), as in ``imshow``."""
    for v, color in zip(values, colors):
        mask = (label_slice == v).astype(np.float32)
        if mask.min() == mask.max():
            continue                                            # label absent (or everywhere) here
        ax.contour(mask, levels=[0.5], colors=[color], linewidths=0.8, linestyles=linestyle)


def registration_figure(fixed, moving, warped, disp_grid_lines, jacobian, spacing=(1, 1, 1), center=None,
                        title=None, fixed_label=None, warped_label=None, moving_label=None):
    """A 3 x 7 :class:`matplotlib.figure.Figure` (Agg canvas, dpi 100) summarising one registration.

    All volumes are numpy ``(X, Y, Z)`` arrays on one common LPS grid (axis 0 -> Left, 1 -> Posterior,
    2 -> Superior). ``disp_grid_lines``: :func:`grid_lines` already warped by the registration (make it
    with ``offset=slice_offsets(shape, every, center)`` so the shown slices do not lie on grid planes).
    ``jacobian``: Jacobian determinant map, ``(X, Y, Z)`` or the forward-difference ``(X-1, Y-1, Z-1)``
    of :func:`network.metrics.jacobian_determinant` (then edge-padded to ``(X, Y, Z)``).
    ``spacing``: voxel size in mm per axis (sets the pixel aspect). ``center``: voxel ``(i, j, k)``
    of the slices (default: the volume centre). Label maps (``(X, Y, Z)``, integer values, 0 =
    background) are drawn as contours, at most 8 labels: ``fixed_label`` on the fixed and warped
    images, ``warped_label`` (if given) also on the warped image, dashed, ``moving_label`` on moving.

    Rows: axial (``k = center[2]``), coronal (``j``), sagittal (``i``), radiological display (see the
    module docstring). Columns: fixed, moving, warped, fixed - moving, fixed - warped (same symmetric
    colour scale), deformation grid over the warped image, Jacobian determinant (0..2 centred at 1,
    voxels <= 0 in solid green).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib import colormaps

    fixed = _as_volume(fixed, "fixed")
    shape = fixed.shape
    moving = _as_volume(moving, "moving", shape)
    warped = _as_volume(warped, "warped", shape)
    grid = _as_volume(disp_grid_lines, "disp_grid_lines", shape)
    jac = np.asarray(jacobian, dtype=np.float32)
    if jac.ndim == 3 and tuple(s + 1 for s in jac.shape) == shape:
        jac = np.pad(jac, [(0, 1)] * 3, mode="edge")
    jac = _as_volume(jac, "jacobian", shape)
    labels = {}
    for name, lab in (("fixed_label", fixed_label), ("warped_label", warped_label), ("moving_label", moving_label)):
        labels[name] = None if lab is None else _as_volume(lab, name, shape)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}")
    if center is None:
        center = tuple(s // 2 for s in shape)
    center = tuple(int(np.clip(int(c), 0, s - 1)) for c, s in zip(center, shape))

    lo, hi = _robust_range(fixed, moving)
    before, after = fixed - moving, fixed - warped
    dlim = float(np.percentile(np.abs(np.concatenate([before[::2, ::2, ::2].ravel(),
                                                      after[::2, ::2, ::2].ravel()])), 99.5))
    dlim = dlim if dlim > 0 else 1.0
    values = _label_values(labels["fixed_label"], labels["warped_label"], labels["moving_label"])
    label_colors = [colormaps["tab10"](n % 10) for n in range(len(values))]
    jac_cmap = colormaps["RdBu_r"].with_extremes(under="#00e000", over=colormaps["RdBu_r"](1.0))
    diff_cmap = colormaps["PuOr_r"]
    grid_rgb = np.array([1.0, 0.85, 0.0])                    # grid line colour (yellow)

    # display aspect (pixel height / width) and orientation letters (left, right, top, bottom)
    aspects = (spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1])
    letters = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))
    row_names = (f"axial k={center[2]}", f"coronal j={center[1]}", f"sagittal i={center[0]}")
    col_titles = ("fixed", "moving", "warped", "fixed − moving", "fixed − warped", "deformation grid",
                  "Jacobian det.")

    def views(v):
        """2D slices already in display orientation: shown with ``origin="upper"`` (row 0 at the top)."""
        return _views(v, center)

    fixed_v, moving_v, warped_v = views(fixed), views(moving), views(warped)
    before_v, after_v, grid_v, jac_v = views(before), views(after), views(grid), views(jac)
    label_v = {k: (None if v is None else views(v)) for k, v in labels.items()}

    fig = Figure(figsize=(7 * 2.2, 3 * 2.2 + (0.4 if title else 0.0)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 7, squeeze=False)
    diff_im = jac_im = None
    for r in range(3):
        show = dict(aspect=aspects[r], origin="upper", interpolation="nearest")
        gray = dict(show, cmap="gray", vmin=lo, vmax=hi)
        row = axes[r]
        row[0].imshow(fixed_v[r], **gray)
        row[1].imshow(moving_v[r], **gray)
        row[2].imshow(warped_v[r], **gray)
        diff_im = row[3].imshow(before_v[r], cmap=diff_cmap, vmin=-dlim, vmax=dlim, **show)
        row[4].imshow(after_v[r], cmap=diff_cmap, vmin=-dlim, vmax=dlim, **show)
        base = np.clip((warped_v[r] - lo) / (hi - lo), 0.0, 1.0)[..., None]
        alpha = np.clip(grid_v[r], 0.0, 1.0)[..., None]
        row[5].imshow(np.clip(base * (1.0 - alpha) + grid_rgb * alpha, 0.0, 1.0), **show)
        jac_show = np.where(jac_v[r] <= 0, -1.0, jac_v[r])      # non-positive -> the "under" colour
        jac_im = row[6].imshow(jac_show, cmap=jac_cmap, vmin=0.0, vmax=2.0, **show)
        if label_v["fixed_label"] is not None:
            for c in (0, 2):
                _draw_contours(row[c], label_v["fixed_label"][r], values, label_colors)
        if label_v["warped_label"] is not None:
            _draw_contours(row[2], label_v["warped_label"][r], values, label_colors, "dashed")
        if label_v["moving_label"] is not None:
            _draw_contours(row[1], label_v["moving_label"][r], values, label_colors)
        left, right, top, bottom = letters[r]
        style = dict(transform=row[0].transAxes, color="yellow", fontsize=8, fontweight="bold")
        row[0].text(0.02, 0.5, left, ha="left", va="center", **style)
        row[0].text(0.98, 0.5, right, ha="right", va="center", **style)
        row[0].text(0.5, 0.98, top, ha="center", va="top", **style)
        row[0].text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
        row[0].text(-0.06, 0.5, row_names[r], transform=row[0].transAxes, rotation=90, ha="right",
                    va="center", fontsize=9)
        for ax in row:
            ax.set_axis_off()
    for c, name in enumerate(col_titles):
        axes[0, c].set_title(name, fontsize=10)
    fig.colorbar(diff_im, ax=list(axes[:, 3:5].ravel()), location="bottom", shrink=0.8, aspect=30,
                 label="intensity difference")
    fig.colorbar(jac_im, ax=list(axes[:, 6]), location="bottom", shrink=0.9, aspect=15, extend="min",
                 label="det J (green: ≤ 0)")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, path) -> str:
    """Write ``fig`` as a PNG at ``path`` atomically (temp file in the same folder, then ``os.replace``).

    The folder is created if needed; an existing file keeps its permissions, a new one gets 0644.
    Returns ``path``.
    """
    path = os.fspath(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path
