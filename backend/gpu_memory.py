"""What this process may still allocate on a GPU: the one place decoders, evaluation and training size
themselves from, so a card capped with ``torch.cuda.set_per_process_memory_fraction`` (as a 6 or 8 GiB
card would be) is sized as that card, not as the whole device."""

from __future__ import annotations

import torch


def free_bytes(device: torch.device) -> int:
    """The device's free memory plus what torch holds unused, capped by the per-process memory fraction."""
    free, total = torch.cuda.mem_get_info(device)
    held_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return int(min(free + held_unused, fraction * total - torch.cuda.memory_allocated(device)))
