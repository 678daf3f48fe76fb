"""The three quantities of Theorem 4.1, read off a recorded training run.

Theorem 4.1 (Lee et al., 2019; §4 of the source) bounds, as the hidden width
``n → ∞``,

    sup_t ‖f_t(x) − f^lin_t(x)‖₂,   sup_t ‖θ_t − θ_0‖₂ / √n,   sup_t ‖Θ̂_t − Θ̂_0‖_F   = O(n^{-1/2}),

with ``f^lin`` the linearized network (5.1) trained by the same algorithm and
``Θ̂_t = Θ̂_t(𝒳, 𝒳)`` the empirical NTK (3.9) on the training inputs.
:func:`theorem_4_1_sups` computes these maxima from a :class:`ntklib.Trajectory`
of :func:`ntklib.train_gradient_descent` (or ``train_gradient_flow``) recorded
with ``record_ntk=True``. The maxima are over the recorded times, so record
every step (``record_every=1``) to get the sups over all steps of the run; the
diagnostics ``loss_ratio`` and ``late_growth`` say whether the run was long
enough for them to be the sups over all ``t ≥ 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dynamics import Trajectory

__all__ = ["Theorem41Sups", "theorem_4_1_sups"]


class Theorem41Sups(NamedTuple):
    """Maxima over the recorded times of one run, and their time courses.

    Attributes:
      f_train: ``max_t ‖f_t(𝒳) − f^lin_t(𝒳)‖₂`` over all training outputs (the
        Euclidean norm of the ``N·k`` differences).
      f_test: ``max_t ‖f_t(x') − f^lin_t(x')‖₂`` over the test outputs, or
        ``None`` without test inputs.
      theta: ``max_t ‖θ_t − θ_0‖₂`` (not divided by ``√n``: the caller knows ``n``).
      ntk: ``max_t ‖Θ̂_t − Θ̂_0‖_F`` of the full kernel ``(N, N, k, k)``.
      loss_ratio: training loss at the last recorded time over that at ``t = 0``.
      late_growth: ``max_q (max_t q_t / max_{t < t_tail} q_t − 1)`` over the
        quantities that can still grow late in training (test deviation,
        displacement, kernel drift), ``t_tail`` the start of the last ``tail``
        fraction of the records: how much the maxima still grew at the end.
      times: ``(T,)`` the recorded times.
      f_train_t, f_test_t, theta_t, ntk_t: ``(T,)`` the time courses whose
        maxima are above (``f_test_t`` is ``None`` without test inputs).
    """

    f_train: float
    f_test: float | None
    theta: float
    ntk: float
    loss_ratio: float
    late_growth: float
    times: np.ndarray
    f_train_t: np.ndarray
    f_test_t: np.ndarray | None
    theta_t: np.ndarray
    ntk_t: np.ndarray


def theorem_4_1_sups(traj: Trajectory, *, tail: float = 0.25) -> Theorem41Sups:
    """The quantities of Theorem 4.1 along a recorded run, and their maxima over the run.

    Args:
      traj: a :class:`ntklib.Trajectory` recorded with ``record_ntk=True``
        (``x_test`` optional).
      tail: fraction of the records (at the end) used for ``late_growth``;
        ``0 < tail < 1``.

    Returns: a :class:`Theorem41Sups`.
    """
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be an ntklib.Trajectory, got {type(traj).__name__}")
    if traj.ntk is None:
        raise ValueError("traj has no recorded kernels: train with record_ntk=True")
    if not (isinstance(tail, (int, float)) and 0 < tail < 1):
        raise ValueError(f"tail must be a number in (0, 1), got {tail!r}")
    times = np.asarray(traj.times)
    num = times.shape[0]
    if num < 2:
        raise ValueError(f"traj must have at least 2 recorded times, got {num}")
    f_train_t = np.linalg.norm(np.asarray(traj.f_train - traj.f_lin_train).reshape(num, -1), axis=1)
    f_test_t = None
    if traj.f_test is not None:
        f_test_t = np.linalg.norm(np.asarray(traj.f_test - traj.f_lin_test).reshape(num, -1), axis=1)
    theta_t = np.asarray(traj.param_distance)
    kernels = np.asarray(traj.ntk).reshape(num, -1)
    ntk_t = np.linalg.norm(kernels - kernels[0], axis=1)
    cut = min(max(int(round(num * (1 - tail))), 1), num - 1)
    late = [q for q in (f_test_t, theta_t, ntk_t) if q is not None]
    late_growth = max(float(np.max(q) / np.max(q[:cut]) - 1) if np.max(q[:cut]) > 0 else
                      (0.0 if np.max(q) == 0 else float("inf")) for q in late)
    loss = np.asarray(traj.loss)
    return Theorem41Sups(
        f_train=float(f_train_t.max()), f_test=None if f_test_t is None else float(f_test_t.max()),
        theta=float(theta_t.max()), ntk=float(ntk_t.max()), loss_ratio=float(loss[-1] / loss[0]),
        late_growth=late_growth, times=times, f_train_t=f_train_t, f_test_t=f_test_t, theta_t=theta_t,
        ntk_t=ntk_t)
