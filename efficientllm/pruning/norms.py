"""RMSNorm after hidden channels are removed: the weight rescale that keeps the expected RMS.

An RMSNorm divides each token's residual x by rms(x) = sqrt(mean_i x_i² + eps). Keeping only
the channels K (h' of h) changes that statistic to sqrt(mean_{i∈K} x_i² + eps), so every kept
output moves by rms_old/rms_new. Multiplying the norm's weight by

    s = sqrt( (E_K / (T h') + eps) / (E / (T h) + eps) )

where E_K = Σ_t Σ_{i∈K} x_ti² and E = Σ_t Σ_i x_ti² are the residual stream's energies over the
T tokens of the Hessian window, keeps the kept outputs at their old expected scale (tokens count
by their energy). With no statistics the removed channels are assumed to carry no energy:
s = sqrt(h/h'), which is exact (up to eps) for a channel that is zero in the residual stream.
"""

from __future__ import annotations

import math

import torch


def rms_rescale(width: int, keep: torch.Tensor, energy: torch.Tensor | None = None,
                tokens: int = 0, eps: float = 0.0) -> float:
    """The factor for the weight of an RMSNorm over `width` channels of which `keep` survive.
    `energy` [width] is Σ_t x_ti² per channel over `tokens` tokens of the norm's input."""
    kept = keep.numel()
    if not 0 < kept <= width:
        raise ValueError(f"an RMSNorm over {width} channels cannot keep {kept}")
    if energy is None or tokens <= 0:
        return math.sqrt(width / kept)
    if tuple(energy.shape) != (width,):
        raise ValueError(f"energy has shape {tuple(energy.shape)}, expected ({width},)")
    energy = energy.detach().to(torch.float64)
    total = float(energy.sum())
    if not math.isfinite(total) or total <= 0.0:
        return math.sqrt(width / kept)
    kept_energy = float(energy.index_select(0, keep.to(energy.device)).sum())
    old = total / (tokens * width) + eps
    new = kept_energy / (tokens * kept) + eps
    return math.sqrt(new / old)
