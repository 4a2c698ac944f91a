"""One side stream per GPU for the warm-up runs before CUDA-graph captures, and the capture that uses it.

cuBLAS keeps two 32 MiB workspaces for every stream it has run on, until the process ends; a
new stream for each capture (each training run, each decoder) would leave 67 MB behind each time.
"""

from __future__ import annotations

import torch

_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def warmup_stream(device) -> "torch.cuda.Stream":
    """The process's side stream on ``device`` (a CUDA device), made on first use."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return _STREAMS[index]


def warm_and_capture(fn, device, pool):
    """(graph, fn's outputs): ``fn`` run once on the side stream (first-use tuning and kernel loads happen
    outside the capture), then captured into ``pool``. The graph replays on the current stream."""
    stream = warmup_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        out = fn()
    return graph, out
