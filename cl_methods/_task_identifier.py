"""DIKI's task identifier: one Gaussian per task over frozen, prompt-free image features.

Before training task t, :meth:`GaussianTaskIdentifier.fit_task` fits N(mu_t, Sigma_t) to
the L2-normalised image features of task t's training set. At test time every sample is
scored under every fitted Gaussian; ``t_hat = argmax_t log p_t(f)`` picks the prompt set
and ``w = sigmoid(max_t log p_t(f) / D - 1)`` scales the prompts' contribution, so samples
unlike every trained task (low likelihood) fall back towards the frozen model.

``D`` is the feature dimension. DIKI writes 512, which is the embedding width of its
ViT-B/16 CLIP: dividing by D makes the score a per-dimension log density, so the same
formula is used for any CLIP here with D = its embedding width.

Covariance: DIKI uses the full sample covariance + 1e-7 I. That is singular whenever a
task has no more samples than feature dimensions (tiny benchmarks, few-shot tasks), and a
ridge of 1e-7 then makes the likelihood of any test sample off the training samples'
subspace astronomically small (w = 0 everywhere). ``shrinkage`` (the [choice]):

- ``"auto"`` (default): Ledoit-Wolf shrinkage towards (trace / D) I only when the task has
  n <= D samples, else none, so DIKI's setting (thousands of samples, D = 512) is exact;
- ``"ledoit_wolf"``: always Ledoit-Wolf;
- a number a in [0, 1]: Sigma = (1 - a) S + a (trace(S) / D) I.

The ridge is added after shrinkage. Means and covariances are float64; the Cholesky
factor is float64 and the per-sample scores are computed in float64 as well.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

Shrinkage = Literal["auto", "ledoit_wolf"] | float


def ledoit_wolf_shrinkage(x: torch.Tensor) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity for centred samples ``x`` [n, D]."""
    n, d = x.shape
    s = x.T @ x / n
    mu = torch.trace(s) / d
    delta = ((s - mu * torch.eye(d, dtype=x.dtype, device=x.device)) ** 2).sum() / d
    x2 = x**2
    beta = ((x2.T @ x2).sum() / n - (s**2).sum()) / (d * n)
    beta = torch.minimum(beta, delta)
    return 0.0 if float(delta) == 0.0 else float(beta / delta)


class GaussianTaskIdentifier:
    """Per-task Gaussians over image features; see the module docstring."""

    def __init__(self, ridge: float = 1e-7, shrinkage: Shrinkage = "auto"):
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.ridge = ridge
        self.shrinkage = shrinkage
        self.means: list[torch.Tensor] = []  # [D] float64, CPU
        self.chols: list[torch.Tensor] = []  # [D, D] lower Cholesky factor of Sigma, float64, CPU
        self.shrink_used: list[float] = []
        self._stacked: tuple | None = None  # (device, mu [S, D], whitening [S, D, D], logdet [S])

    def __len__(self) -> int:
        return len(self.means)

    @property
    def dim(self) -> int:
        return int(self.means[0].shape[0])

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tasks' Gaussians."""
        del self.means[n:], self.chols[n:], self.shrink_used[n:]
        self._stacked = None

    def fit_task(self, features: torch.Tensor) -> None:
        """Append the Gaussian of one task from its (L2-normalised) features [n, D]."""
        f = features.detach().to("cpu", torch.float64)
        n, d = f.shape
        if n < 1:
            raise ValueError("cannot fit a task Gaussian on 0 samples")
        mu = f.mean(0)
        x = f - mu
        cov = x.T @ x / max(n - 1, 1)
        a = self.shrinkage
        if a == "auto":
            a = ledoit_wolf_shrinkage(x) if n <= d else 0.0
        elif a == "ledoit_wolf":
            a = ledoit_wolf_shrinkage(x)
        a = float(a)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {a}")
        eye = torch.eye(d, dtype=torch.float64)
        if a > 0:
            cov = (1 - a) * cov + a * (torch.trace(cov) / d) * eye
        cov = cov + self.ridge * eye
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError(
                f"task covariance is not positive definite ({n} samples, {d} dims, ridge {self.ridge}, "
                f"shrinkage {a:.3g}); raise the method's cov_ridge or use cov_shrinkage"
            )
        self.means.append(mu)
        self.chols.append(chol)
        self.shrink_used.append(a)
        self._stacked = None

    def _tables(self, device: torch.device):
        if self._stacked is None or self._stacked[0] != device:
            mu = torch.stack(self.means).to(device)
            eye = torch.eye(self.dim, dtype=torch.float64)
            # Whitening W = L^-1, so (f - mu)^T Sigma^-1 (f - mu) = |W (f - mu)|^2: one batched
            # matmul per call instead of a triangular solve per task.
            white = torch.stack([torch.linalg.solve_triangular(c, eye, upper=False) for c in self.chols]).to(device)
            logdet = torch.stack([2 * c.diagonal().log().sum() for c in self.chols]).to(device)
            self._stacked = (device, mu, white, logdet)
        return self._stacked[1:]

    def log_likelihood(self, features: torch.Tensor, tasks: int | None = None) -> torch.Tensor:
        """log N(f; mu_t, Sigma_t) for the first ``tasks`` fitted tasks: float64 [B, S]."""
        if not self.means:
            raise RuntimeError("no task Gaussian has been fitted yet")
        mu, white, logdet = self._tables(features.device)
        s = len(mu) if tasks is None else tasks
        f = features.detach().to(torch.float64)
        z = torch.einsum("sed,sbd->sbe", white[:s], f.unsqueeze(0) - mu[:s, None])  # [S, B, D]
        maha = (z**2).sum(-1)
        d = f.shape[-1]
        return (-0.5 * (maha + logdet[:s, None] + d * math.log(2 * math.pi))).T

    def identify(self, features: torch.Tensor, tasks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the most likely task (long [B]) and DIKI's weight (float32 [B])."""
        ll = self.log_likelihood(features, tasks)
        best, idx = ll.max(-1)
        w = torch.sigmoid(best / features.shape[-1] - 1.0)
        return idx, w.float()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "means": [m.clone() for m in self.means],
            "chols": [c.clone() for c in self.chols],
            "shrink_used": list(self.shrink_used),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means = [m.to("cpu", torch.float64).clone() for m in state["means"]]
        self.chols = [c.to("cpu", torch.float64).clone() for c in state["chols"]]
        self.shrink_used = list(state["shrink_used"])
        self._stacked = None
