"""A host tensor mirrored on the device, sent without waiting through pinned memory (CUDA) or copied (CPU);
and small device tensors read back without waiting for later work (``ReadBack``).

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


class ReadBack:
    """Small device tensors read on the host without waiting for work queued after them. ``take`` queues a copy
    into one of two pinned buffers and records an event; the returned ``Taken.tolist`` waits for that event
    alone (``Tensor.tolist`` waits for everything queued on the stream, a next decode step included). Two
    buffers: a step's values are read before the step after next is taken."""

    def __init__(self, size: int, device: torch.device):
        cuda = device.type == "cuda"
        self._buffers = [torch.zeros(size, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._next = 0

    def take(self, values: torch.Tensor) -> "Taken":
        i, self._next = self._next, self._next ^ 1
        buffer, event = self._buffers[i][: values.numel()], self._events[i]
        buffer.copy_(values, non_blocking=event is not None)
        if event is not None:
            event.record()
        return Taken(buffer, event)


class Taken:
    def __init__(self, buffer: torch.Tensor, event):
        self._buffer, self._event = buffer, event

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._buffer.tolist()
