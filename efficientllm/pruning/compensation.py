"""Structured OBS: remove input columns of a consumer matrix and compensate the rest.

For a consumer W [out, in] whose inputs X have the local Hessian H = sum X^T X (over the
consumer's inputs), removing the input columns S with the least change of W X is

    H_d  = H + lambda I,  lambda = damping * mean(diag H)
    dW   = -W[:, S] ([H_d^-1]_SS)^-1 [H_d^-1]_S,:        W' = (W + dW) with columns S dropped

and the inverse Hessian of the kept columns K is the downdate
    H_d^-1 restricted to K = [H_d^-1]_KK - [H_d^-1]_KS ([H_d^-1]_SS)^-1 [H_d^-1]_SK,
so several structures removed one after another equal removing their union at once.

The correction is row-local: each output row is compensated from its own values alone
(`ObsUpdate`), so a block of rows (an optimizer shard, say) can be compensated apart from the
rest. `obs_update` gets it from one Cholesky factor of H_d and |S| solves, without the full
inverse, for callers that do not chain removals.

All algebra runs in float64 on the tensors' device; weights come back in W's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientllm.pruning.layout import complement


@dataclass(frozen=True)
class Compensated:
    """A consumer after removing input columns."""

    weight: torch.Tensor  # [out, in - |S|], the input W's dtype
    keep: torch.Tensor  # kept column indices into the input W (long)
    hinv: (
        torch.Tensor | None
    )  # float64 inverse damped Hessian of the kept columns; None on fallback
    fallback: str | None = None  # why the columns were only sliced; None when compensated

    @property
    def compensated(self) -> bool:
        return self.fallback is None


def kept_columns(num_columns: int, remove: torch.Tensor) -> torch.Tensor:
    """The sorted column indices that survive removing `remove`."""
    return complement(num_columns, remove)


def slice_hessian(H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """H restricted to the kept inputs (the Hessian a later event starts from)."""
    keep = keep.to(H.device)
    return H.index_select(0, keep).index_select(1, keep)


@dataclass(frozen=True)
class ObsUpdate:
    """What removing input columns `drop` does to every row of a consumer, row by row:
    row' = (row - row[drop] @ solved)[keep]."""

    keep: torch.Tensor  # kept column indices (long)
    drop: torch.Tensor  # removed column indices (long)
    solved: torch.Tensor  # float64 [|S|, in]: ([H_d^-1]_SS)^-1 [H_d^-1]_S,:

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """The compensated, kept columns of `rows` [k, in] -> [k, in - |S|], in float64."""
        rows64 = rows.detach().to(torch.float64)
        drop, keep = self.drop.to(rows.device), self.keep.to(rows.device)
        updated = rows64 - rows64.index_select(1, drop) @ self.solved.to(rows.device)
        return updated.index_select(1, keep)


def _solve_removed(hinv_s: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """([H^-1]_SS)^-1 [H^-1]_S,: from the removed rows [H^-1]_S,: of the inverse."""
    hinv_ss = hinv_s.index_select(1, drop)
    chol, info = torch.linalg.cholesky_ex(hinv_ss)
    if int(info) == 0:
        return torch.cholesky_solve(hinv_s, chol)
    return torch.linalg.solve(hinv_ss, hinv_s)


def _damped_cholesky(
    H: torch.Tensor, damping: float
) -> tuple[torch.Tensor | None, str | None]:
    """The lower Cholesky factor of H + lambda I in float64 (see `damped_inverse`)."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square, got shape {tuple(H.shape)}")
    H = H.detach().to(torch.float64)
    # One sum finds a non-finite entry without a full boolean mask (these matrices are large).
    if not bool(torch.isfinite(H.sum())):
        return None, "Hessian has non-finite entries; columns dropped without compensation"
    H = torch.add(H, H.T).mul_(0.5)
    mean_diag = float(H.diagonal().mean()) if H.shape[0] else 0.0
    if mean_diag <= 0.0:
        return (
            None,
            "Hessian has no data (mean diagonal is 0); columns dropped without compensation",
        )
    first, added = damping * mean_diag, 0.0
    # Raise the damping only if the requested one leaves H (numerically) indefinite.
    for lam in [first] + [
        mean_diag * 10.0**e for e in (-8, -6, -4, -2, 0) if mean_diag * 10.0**e > first
    ]:
        H.diagonal().add_(lam - added)  # H is this function's own copy
        added = lam
        chol, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            return chol, None
    return None, "Hessian is not positive definite even with damping 1.0; columns dropped"


def damped_inverse(
    H: torch.Tensor, damping: float = 0.01
) -> tuple[torch.Tensor | None, str | None]:
    """(H + lambda I)^-1 in float64 via Cholesky, lambda = damping * mean(diag H).

    Returns (None, reason) when H carries no information (zero or non-finite diagonal) or stays
    indefinite even after raising the damping."""
    chol, reason = _damped_cholesky(H, damping)
    return (None, reason) if chol is None else (torch.cholesky_inverse(chol), None)


def obs_update(
    H: torch.Tensor, remove: torch.Tensor, damping: float = 0.01
) -> tuple[ObsUpdate | None, str | None]:
    """The OBS correction for removing input columns `remove` of a consumer whose Hessian is
    H, or (None, reason) when H has no usable data (see `damped_inverse`). Costs one Cholesky
    factor and |S| triangular solves: only the removed rows of the inverse are formed."""
    chol, reason = _damped_cholesky(H, damping)
    if chol is None:
        return None, reason
    n = H.shape[0]
    keep = complement(n, remove).to(chol.device)
    drop = complement(n, keep).to(chol.device)
    unit = torch.zeros(n, drop.numel(), dtype=chol.dtype, device=chol.device)
    unit[drop, torch.arange(drop.numel(), device=chol.device)] = 1.0
    hinv_s = torch.cholesky_solve(unit, chol).T  # H_d^-1 is symmetric: its removed rows
    return ObsUpdate(keep, drop, _solve_removed(hinv_s, drop)), None


def obs_step(W: torch.Tensor, hinv: torch.Tensor, remove: torch.Tensor) -> Compensated:
    """Remove columns `remove` of W given the inverse damped Hessian of W's current columns
    (from damped_inverse or a previous step's `hinv`)."""
    if W.dim() != 2 or hinv.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} and inverse Hessian {tuple(hinv.shape)} do not match")
    n = W.shape[1]
    keep = complement(n, remove).to(W.device)
    drop = complement(n, keep).to(W.device)
    hinv = hinv.to(device=W.device, dtype=torch.float64)
    if drop.numel() == 0:
        return Compensated(W.detach().clone(), keep, hinv.clone())
    hinv_s = hinv.index_select(0, drop)  # [|S|, n]
    update = ObsUpdate(keep, drop, _solve_removed(hinv_s, drop))
    solved = update.solved
    hinv_keep = hinv.index_select(0, keep).index_select(1, keep) - hinv_s.index_select(
        1, keep
    ).T @ solved.index_select(1, keep)
    hinv_keep = (hinv_keep + hinv_keep.T) / 2
    return Compensated(update.apply(W).to(W.dtype), keep, hinv_keep)


def obs_remove_columns(
    W: torch.Tensor, H: torch.Tensor, remove: torch.Tensor, damping: float = 0.01
) -> Compensated:
    """Remove input columns `remove` of consumer W [out, in] with structured OBS from its
    Hessian H [in, in]. Falls back to plain slicing (with `fallback` saying why) when H has no
    usable data."""
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} and Hessian {tuple(H.shape)} do not match")
    hinv, reason = damped_inverse(H.to(W.device), damping)
    if hinv is None:
        keep = complement(W.shape[1], remove).to(W.device)
        return Compensated(W.detach().index_select(1, keep).clone(), keep, None, reason)
    return obs_step(W, hinv, remove)


def reconstruction_error(
    W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor, keep: torch.Tensor
) -> float:
    """||X W^T - X[:, keep] W_new^T||_F for inputs X [N, in] (in float64)."""
    X = X.to(torch.float64)
    keep = keep.to(X.device)
    full = X @ W.to(torch.float64).T
    pruned = X.index_select(1, keep) @ W_new.to(torch.float64).T
    return float(torch.linalg.norm(full - pruned))


def removal_errors(
    W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, damping: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The output error of consumer W [out, in] (inputs with Hessian H) when each group of
    input columns (`groups` [G, k], one row per group) is removed alone: without compensation,
    tr(W_S H_SS W_S^T), and after its OBS update, tr(W_S ([H_d^-1]_SS)^-1 W_S^T); both [G], in
    float64, with the damped H_d (the one the update uses) for both, so that the second is never
    above the first. None when H has no usable data (see `damped_inverse`)."""
    chol, _ = _damped_cholesky(H, damping)
    if chol is None:
        return None
    h_d = chol @ chol.T
    hinv = torch.cholesky_inverse(chol)
    groups = groups.to(device=chol.device, dtype=torch.long)
    rows, cols = groups[:, :, None], groups[:, None, :]
    w_s = W.detach().to(device=chol.device, dtype=torch.float64)[:, groups]  # [out, G, k]
    gram = torch.einsum("ogi,ogj->gij", w_s, w_s)  # Σ over outputs of W_S^T W_S, [G, k, k]
    before = (gram * h_d[rows, cols]).sum((1, 2))
    after = (gram * torch.linalg.inv(hinv[rows, cols])).sum((1, 2))
    return before, after
