"""Smooth random fields (deformations, bias fields) from a coarse cubic B-spline grid.

A field is a few random coefficients on a coarse control grid; its value at any voxel is the cubic
B-spline blend of its 4×4×4 neighbouring coefficients. Because the B-spline is separable, evaluating it
over a box of voxels is three small matrix products, which costs a small fraction of smoothing or
interpolating a full-resolution random volume.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ControlGrid", "bspline_weights"]


def bspline_weights(positions: np.ndarray, grid_step: float, n_control: int) -> np.ndarray:
    """Dense ``[len(positions), n_control]`` matrix of cubic B-spline weights.

    Control point ``j`` sits at position ``(j - 1) * grid_step`` (one extra point before the origin so
    that every position has its four supporting coefficients).
    """
    u = np.asarray(positions, dtype=np.float64) / grid_step + 1.0
    base = np.floor(u).astype(int)
    t = u - base
    basis = np.stack(
        [
            (1 - t) ** 3 / 6.0,
            (3 * t**3 - 6 * t**2 + 4) / 6.0,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6.0,
            t**3 / 6.0,
        ],
        axis=1,
    )
    weights = np.zeros((len(u), n_control), dtype=np.float32)
    rows = np.arange(len(u))
    for k in range(4):
        cols = np.clip(base - 1 + k, 0, n_control - 1)
        np.add.at(weights, (rows, cols), basis[:, k])
    return weights


class ControlGrid:
    """Random smooth field over a 3-D grid, evaluated on any axis-aligned box of it.

    Args:
        shape: Voxel grid the field covers ``(x, y, z)``.
        grid_step: Distance between control points, in voxels.
        coefficients: ``[C, nx, ny, nz]`` control values (``C`` field components); see :meth:`random`.
    """

    def __init__(self, shape: tuple[int, int, int], grid_step: float, coefficients: np.ndarray) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.grid_step = float(grid_step)
        self.coefficients = np.asarray(coefficients, dtype=np.float32)
        expected = self.control_shape(self.shape, self.grid_step)
        if self.coefficients.shape[1:] != expected:
            msg = f"coefficients of shape {self.coefficients.shape[1:]} do not fit a control grid of {expected}"
            raise ValueError(msg)

    @staticmethod
    def control_shape(shape: tuple[int, ...], grid_step: float) -> tuple[int, ...]:
        """Number of control points per axis for a grid of ``shape`` voxels."""
        return tuple(int(np.ceil(max(n - 1, 1) / grid_step)) + 3 for n in shape)

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        shape: tuple[int, int, int],
        grid_step: float,
        std: float,
        components: int = 1,
    ) -> ControlGrid:
        """Field whose control values are independent ``N(0, std²)`` draws."""
        control = cls.control_shape(shape, grid_step)
        coefficients = rng.standard_normal((components, *control)).astype(np.float32) * np.float32(std)
        return cls(shape, grid_step, coefficients)

    @property
    def bound(self) -> float:
        """Upper bound of ``|field|`` anywhere (B-spline weights are positive and sum to one)."""
        return float(np.abs(self.coefficients).max()) if self.coefficients.size else 0.0

    def evaluate(self, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Field values ``[C, bx, by, bz]`` (float32) on a box of the grid (default: all of it)."""
        if box is None:
            box = tuple(slice(0, n) for n in self.shape)
        return self.evaluate_at(*(np.arange(s.start, s.stop) for s in box))

    def evaluate_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Field values ``[C, len(x), len(y), len(z)]`` (float32) on a lattice of voxel positions."""
        wx, wy, wz = (
            bspline_weights(positions, self.grid_step, n)
            for positions, n in zip((x, y, z), self.coefficients.shape[1:], strict=True)
        )
        # One axis at a time. Plain einsum loops rather than BLAS: the operands are small, and a BLAS
        # thread pool costs more to wake on a busy CPU than the arithmetic itself.
        field = np.einsum("cxyz,bz->cxyb", self.coefficients, wz)
        field = np.einsum("cxyb,ay->cxab", field, wy)
        return np.einsum("cxab,ex->ceab", field, wx)
