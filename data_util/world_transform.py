"""A registration result as a map between world spaces (mm), for output on any grid.

The network predicts a pull-back flow ``u`` in voxels of the model grid ``G`` (affine voxel -> world):
the moving image, resampled on ``G`` at world points shifted by an initial translation ``t``, is read
at ``q + u(q)``. In world coordinates this is, for a fixed-space point ``x`` (mm, RAS+)::

    y = x + d(x),   d(x) = G_lin · u(G⁻¹ x) + t

``y`` is where the moving image is read to produce the warped image at ``x`` (pull-back). ``u`` is
interpolated trilinearly and extended constantly outside the model grid (the same border rule as
:func:`network.layers.warp`).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .preprocess import Grid, _slabs, grid_points, lattice_copy, world_to_voxel


class WorldDisplacement:
    """``d(x)`` in mm for world points ``x``; see the module docstring.

    Args:
        flow: ``(3, X, Y, Z)`` voxel displacements on ``grid`` (channel c moves along axis c).
        grid: the model :class:`~data_util.preprocess.Grid`.
        translation: ``(3,)`` mm, the initial moving-image shift (default none).
    """

    def __init__(self, flow: np.ndarray, grid: Grid, translation=None):
        flow = np.asarray(flow, dtype=np.float32)
        if flow.shape != (3, *grid.shape):
            raise ValueError(f"flow shape {flow.shape} does not match the grid {(3, *grid.shape)}")
        self.flow, self.grid = flow, grid
        self.translation = np.zeros(3) if translation is None else np.asarray(translation, dtype=np.float64)

    def __call__(self, world: np.ndarray) -> np.ndarray:
        """``d`` at world points ``(3, ...)`` -> ``(3, ...)`` mm."""
        q = world_to_voxel(self.grid.affine, world).reshape(3, -1)
        u = np.stack([ndimage.map_coordinates(self.flow[c], q, order=1, mode="nearest", prefilter=False)
                      for c in range(3)]).astype(np.float64)
        d = self.grid.affine[:3, :3] @ u + self.translation[:, None]
        return d.reshape(world.shape)

    def map_world(self, world: np.ndarray) -> np.ndarray:
        """``x -> x + d(x)`` for world points ``(3, ...)``: fixed space into moving space."""
        return world + self(world)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Fixed-space landmarks ``(N, 3)`` mm -> their positions in the moving image's world."""
        return self.map_world(np.asarray(points, dtype=np.float64).T).T

    def invert_points(self, points: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Moving-space points ``y`` ``(N, 3)`` mm -> fixed-space ``x`` with ``x + d(x) = y``
        (fixed-point iteration ``x <- y - d(x)``, which converges for folding-free fields)."""
        y = np.asarray(points, dtype=np.float64).T
        x = y.copy()
        for _ in range(iterations):
            x = y - self(x)
        return x.T

    def on_grid(self, grid: Grid) -> np.ndarray:
        """``d`` at every voxel of ``grid``: ``(X, Y, Z, 3)`` float32 mm."""
        same = [lattice_copy(self.flow[c], self.grid.affine, grid) for c in range(3)]
        if all(u is not None for u in same):          # grid voxels are model-grid voxels: no interpolation
            u = np.stack(same).reshape(3, -1).astype(np.float64)
            d = self.grid.affine[:3, :3] @ u + self.translation[:, None]
            return np.ascontiguousarray(np.moveaxis(d.reshape(3, *grid.shape), 0, -1), dtype=np.float32)
        out = np.empty((*grid.shape, 3), dtype=np.float32)
        for start, stop in _slabs(grid):
            out[:, :, start:stop] = np.moveaxis(self(grid_points(grid, start, stop)), 0, -1)
        return out

    def jacobian_determinant(self) -> np.ndarray:
        """``det(I + ∇u)`` on the model grid ``(X, Y, Z)`` (central differences, one-sided at the
        border). This is also the determinant of ``x -> x + d(x)`` in mm: the grid's affine cancels."""
        import torch
        from network.metrics import jacobian_determinant

        flow = torch.from_numpy(np.ascontiguousarray(self.flow, dtype=np.float64))[None]
        return jacobian_determinant(flow, "central")[0].numpy().astype(np.float32)
