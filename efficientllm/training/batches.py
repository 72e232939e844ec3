"""Micro-batches for this data-parallel rank, starting at any consumed-samples position.

Megatron-core has datasets but no sampler (Megatron-LM keeps it in its training code), so this
is ours: global batch b covers samples [b*G, (b+1)*G); it is cut into micro-batch rounds of
`micro_batch_size * dp` samples and rank r takes its contiguous slice of each round. A resumed
run that starts at `consumed_samples` sees exactly the samples an uninterrupted run would.
Samples are collated on the host and each micro-batch is copied to the rank's device at once.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


def micro_batch_indices(
    consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, total: int
) -> Iterator[list[int]]:
    """Sample indices of this rank's successive micro-batches, wrapping past the dataset end."""
    start = consumed_samples
    round_size = micro_batch_size * dp_size
    while True:
        first = start + dp_rank * micro_batch_size
        yield [(first + i) % total for i in range(micro_batch_size)]
        start += round_size


def collate(samples: Sequence[dict[str, np.ndarray | torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack the samples' fields on the host (the dataset yields numpy arrays), then copy each
    to `device`; from pinned memory when that is a GPU, so the copy does not block."""
    pin = device.type == "cuda"
    out = {}
    for key in samples[0]:
        host = torch.stack([torch.as_tensor(s[key]) for s in samples])  # cpu-ok: host-side collation
        out[key] = (host.pin_memory() if pin else host).to(device, non_blocking=pin)
    return out


def micro_batches(
    dataset: Sequence, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator over this rank's micro-batches of `dataset`, on `device`."""
    for indices in micro_batch_indices(consumed_samples, micro_batch_size, dp_rank, dp_size, len(dataset)):
        yield collate([dataset[i] for i in indices], device)
