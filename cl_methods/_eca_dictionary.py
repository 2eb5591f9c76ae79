"""ECA's dictionary replay: an online sparse dictionary of patch embeddings, in torch.

Old images are not stored. Instead, at the end of every task an overcomplete dictionary
``D`` (n_atoms x dim, rows = atoms, each of norm <= 1) keeps learning, online, to code
that task's patch embeddings (the vision encoder's post-layernorm tokens, what the
Q-Former cross-attends to) with non-negative sparse codes::

    min_{alpha >= 0}  0.5 ||x - alpha D||^2 + lam ||alpha||_1          (per row x)

which is scikit-learn's ``sparse_encode(x, D, algorithm="lasso_cd", alpha=lam,
positive=True)`` objective (sklearn divides its ``alpha`` by ``dim`` and its Lasso
multiplies the data term by ``1 / dim``; the two cancel). Codes are found by FISTA with
the non-negative soft-threshold as proximal step, in torch, so the pass runs on the GPU
beside the model.

The dictionary is updated as in Mairal et al. (JMLR 2010, "Online learning for matrix
factorization and sparse coding", Alg. 1-2): running statistics ``A = sum alpha^T alpha``
and ``B = sum x^T alpha`` over every mini-batch coded so far (all tasks), then one sweep of
block coordinate descent over the atoms::

    u_j = (b_j - D^T a_j) / A_jj + d_j ;   d_j = u_j / max(||u_j||, 1)

Atoms that no code has used yet (``A_jj <= 1e-6``, the threshold of ECA's learner and
of scikit-learn / SPAMS) are re-drawn at every step from the step's data: a random sample
plus Gaussian noise of 1% of its standard deviation (so the coding stays well
conditioned), projected to norm <= 1, as ECA's ``_update_dict`` does. So no replayed atom
is a never-updated random vector: the first mini-batch initialises the atoms from random
samples (normalised) [choice: ECA starts from a random orthogonal matrix; data atoms are
used from the first step], topped up with random unit vectors when there are fewer
samples than atoms, and a top-up that no code uses is replaced by data in the same step.
``fitted`` marks the atoms that came from data, were updated, or were re-drawn.

Replay samples atoms uniformly and feeds each as a 1-token "image" to the Q-Former (see
:mod:`cl_methods.eca`).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from cl_methods.base import MethodConfig

# A_jj at or below this: the atom is unused (ECA's learner, scikit-learn and SPAMS use 1e-6).
UNUSED_ATOM = 1e-6


class DictionarySettings(MethodConfig):
    size: int = Field(default=7040, ge=1)  # ECA for BLIP-2: 7040 atoms x 1408 (5x overcomplete)
    alpha: float = Field(default=1.0, ge=0.0)  # Lasso weight
    batch_size: int = Field(default=1024, ge=1)  # patch embeddings per online step
    patches_per_image: int = Field(default=16, ge=1)  # random patch tokens taken per image
    max_images: int = Field(default=512, ge=1)  # images per task-end pass
    max_iter: int = Field(default=200, ge=1)  # FISTA iterations per coding
    tol: float = Field(default=1e-6, ge=0.0)


@torch.no_grad()
def sparse_encode_nonneg(
    x: torch.Tensor, dictionary: torch.Tensor, alpha: float, max_iter: int = 500, tol: float = 1e-7
) -> torch.Tensor:
    """Non-negative Lasso codes of the rows of ``x`` (n, dim) on ``dictionary`` (k, dim).

    FISTA (Beck & Teboulle 2009) with step 1 / L, L the largest eigenvalue of D D^T, and
    prox ``max(z - alpha / L, 0)``. Stops when the largest change of a code entry over
    an iteration falls below ``tol`` times the largest code entry (checked every 10
    iterations: the check costs a device sync).
    """
    # fp32 at least (fp16 patch embeddings would lose the small codes); float64 stays.
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    d = dictionary.to(x.device, dtype)
    gram = d @ d.T  # (k, k)
    xd = x @ d.T  # (n, k)
    lip = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(1e-12))
    thresh = alpha / lip
    code = torch.zeros_like(xd)
    y = code.clone()
    t = 1.0
    for it in range(max_iter):
        prev = code
        code = (y - (y @ gram - xd) / lip - thresh).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = code + ((t - 1) / t_next) * (code - prev)
        t = t_next
        if tol and it % 10 == 9:
            change = float((code - prev).abs().max())
            if change <= tol * max(float(code.abs().max()), 1e-12):
                break
    return code


def lasso_objective(x: torch.Tensor, dictionary: torch.Tensor, code: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-row 0.5 ||x - code D||^2 + alpha ||code||_1."""
    r = x.float() - code.float() @ dictionary.float()
    return 0.5 * r.pow(2).sum(-1) + alpha * code.float().abs().sum(-1)


class OnlineDictionary:
    """The dictionary and its running statistics (all tensors; saved exactly)."""

    def __init__(self, settings: DictionarySettings, dim: int):
        self.settings, self.dim = settings, dim
        self.atoms: torch.Tensor | None = None  # (k, dim)
        self.A: torch.Tensor | None = None  # (k, k)
        self.B: torch.Tensor | None = None  # (dim, k)
        self.n_seen = 0
        self.fitted: torch.Tensor | None = None  # (k,) bool: the atom carries data (see above)

    @property
    def ready(self) -> bool:
        return self.atoms is not None

    @torch.no_grad()
    def _init_atoms(self, x: torch.Tensor, generator: torch.Generator | None) -> None:
        k = self.settings.size
        perm = torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)
        atoms = x[perm].float()
        if atoms.shape[0] < k:
            extra = torch.randn(k - atoms.shape[0], self.dim, generator=generator).to(x.device)
            atoms = torch.cat([atoms, extra])
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.fitted = torch.arange(k, device=x.device) < min(k, x.shape[0])
        self.A = torch.zeros(k, k, device=x.device)
        self.B = torch.zeros(self.dim, k, device=x.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        assert self.atoms is not None
        s = self.settings
        return sparse_encode_nonneg(x.to(self.atoms.device), self.atoms, s.alpha, s.max_iter, s.tol)

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One online step on a mini-batch ``x`` (n, dim); returns its codes."""
        x = x.float()
        if self.atoms is None:
            self._init_atoms(x, generator)
        assert self.atoms is not None and self.A is not None and self.B is not None
        x = x.to(self.atoms.device)
        code = self.encode(x)
        self.A += code.T @ code
        self.B += x.T @ code
        self.n_seen += x.shape[0]
        self._update_atoms(x, generator)
        return code

    @torch.no_grad()
    def _update_atoms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        assert self.atoms is not None and self.A is not None and self.B is not None and self.fitted is not None
        d = self.atoms.T.contiguous()  # (dim, k): columns are atoms, as in Mairal's notation
        diag = self.A.diagonal()
        used = diag > UNUSED_ATOM
        for j in torch.nonzero(used).flatten().tolist():
            u = (self.B[:, j] - d @ self.A[:, j]) / diag[j] + d[:, j]
            d[:, j] = u / u.norm().clamp_min(1.0)
        unused = torch.nonzero(~used).flatten()
        if len(unused):
            pick = torch.randint(x.shape[0], (len(unused),), generator=generator).to(x.device)
            new = x[pick]
            noise = torch.randn(new.shape, generator=generator).to(x.device)
            new = new + 0.01 * new.std(dim=1, keepdim=True).nan_to_num(1.0).clamp_min(1e-12) * noise
            d[:, unused] = (new / new.norm(dim=1, keepdim=True).clamp_min(1.0)).T
        self.fitted.fill_(True)  # every atom was just updated (used) or re-drawn from x (unused)
        self.atoms = d.T.contiguous()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` atoms drawn uniformly with replacement (the replay batch)."""
        assert self.atoms is not None
        idx = torch.randint(self.atoms.shape[0], (n,), generator=generator).to(self.atoms.device)
        return self.atoms[idx]

    def state_dict(self) -> dict[str, Any]:
        clone = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {"atoms": clone(self.atoms), "A": clone(self.A), "B": clone(self.B), "n_seen": self.n_seen,
                "fitted": clone(self.fitted)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        move = lambda t: None if t is None else t.clone().to(device or t.device)  # noqa: E731
        self.atoms, self.A, self.B = move(state["atoms"]), move(state["A"]), move(state["B"])
        self.n_seen = int(state["n_seen"])
        self.fitted = move(state.get("fitted"))
