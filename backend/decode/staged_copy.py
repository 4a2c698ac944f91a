"""A host tensor mirrored on the device, sent without waiting through pinned memory (CUDA) or copied (CPU).

The host side may change at any time; ``send`` copies it to a staging buffer first, so a transfer still on its
way when the host side changes sends what it was given. The batched fast decoder's step inputs and its
sampler's settings go through one each.
"""

from __future__ import annotations

import torch


class StagedCopy:
    def __init__(self, host: torch.Tensor, device: torch.device):
        cuda = device.type == "cuda"
        self.host = host
        self.device = host.to(device)
        self._staged = host.pin_memory() if cuda else host.clone()
        self._sent = torch.cuda.Event() if cuda else None  # the last transfer from _staged is done

    def send(self) -> None:
        """Queue the copy of ``host`` to ``device`` on the current stream."""
        if self._sent is not None:
            self._sent.synchronize()  # (done by now, unless nothing has waited for the GPU since)
        self._staged.copy_(self.host)
        self.device.copy_(self._staged, non_blocking=self._sent is not None)
        if self._sent is not None:
            self._sent.record()
