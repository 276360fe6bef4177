"""Host-to-device copies of the small integer lists the engine sends every step."""

from __future__ import annotations

import torch


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Integers from the host on `device` ([len(values)], long), without making the host wait.

    On CUDA, a copy from ordinary (pageable) host memory may wait until the stream's queued work
    is done; a copy from pinned memory is queued behind it instead (torch keeps the pinned block
    until the copy has run).
    """
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
