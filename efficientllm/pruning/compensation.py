"""Structured OBS: remove input columns of a consumer matrix and compensate the rest.

For a consumer W [out, in] whose inputs X have the local Hessian H = sum X^T X (over the
consumer's inputs), removing the input columns S with the least change of W X is

    H_d  = H + lambda I,  lambda = damping * mean(diag H)
    dW   = -W[:, S] ([H_d^-1]_SS)^-1 [H_d^-1]_S,:        W' = (W + dW) with columns S dropped

and the inverse Hessian of the kept columns K is the downdate
    H_d^-1 restricted to K = [H_d^-1]_KK - [H_d^-1]_KS ([H_d^-1]_SS)^-1 [H_d^-1]_SK,
so several structures removed one after another equal removing their union at once.

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


def damped_inverse(
    H: torch.Tensor, damping: float = 0.01
) -> tuple[torch.Tensor | None, str | None]:
    """(H + lambda I)^-1 in float64 via Cholesky, lambda = damping * mean(diag H).

    Returns (None, reason) when H carries no information (zero or non-finite diagonal) or stays
    indefinite even after raising the damping."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square, got shape {tuple(H.shape)}")
    H = H.detach().to(torch.float64)
    if not bool(torch.isfinite(H).all()):
        return None, "Hessian has non-finite entries; columns dropped without compensation"
    H = (H + H.T) / 2
    mean_diag = float(H.diagonal().mean()) if H.shape[0] else 0.0
    if mean_diag <= 0.0:
        return (
            None,
            "Hessian has no data (mean diagonal is 0); columns dropped without compensation",
        )
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    first = damping * mean_diag
    # Raise the damping only if the requested one leaves H (numerically) indefinite.
    for lam in [first] + [
        mean_diag * 10.0**e for e in (-8, -6, -4, -2, 0) if mean_diag * 10.0**e > first
    ]:
        chol, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol), None
    return None, "Hessian is not positive definite even with damping 1.0; columns dropped"


def obs_step(W: torch.Tensor, hinv: torch.Tensor, remove: torch.Tensor) -> Compensated:
    """Remove columns `remove` of W given the inverse damped Hessian of W's current columns
    (from damped_inverse or a previous step's `hinv`)."""
    if W.dim() != 2 or hinv.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} and inverse Hessian {tuple(hinv.shape)} do not match")
    n = W.shape[1]
    keep = complement(n, remove).to(W.device)
    drop = complement(n, keep).to(W.device)
    W64 = W.detach().to(torch.float64)
    hinv = hinv.to(device=W.device, dtype=torch.float64)
    if drop.numel() == 0:
        return Compensated(W.detach().clone(), keep, hinv.clone())
    hinv_ss = hinv.index_select(0, drop).index_select(1, drop)
    hinv_s = hinv.index_select(0, drop)  # [|S|, n]
    chol, info = torch.linalg.cholesky_ex(hinv_ss)
    if int(info) == 0:
        solved = torch.cholesky_solve(hinv_s, chol)  # ([H^-1]_SS)^-1 [H^-1]_S,:
    else:
        solved = torch.linalg.solve(hinv_ss, hinv_s)
    updated = W64 - W64.index_select(1, drop) @ solved
    hinv_keep = hinv.index_select(0, keep).index_select(1, keep) - hinv_s.index_select(
        1, keep
    ).T @ solved.index_select(1, keep)
    hinv_keep = (hinv_keep + hinv_keep.T) / 2
    return Compensated(updated.index_select(1, keep).to(W.dtype), keep, hinv_keep)


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
