"""ChatGLM2-6B 8-bit from the release's fp16 .bin shards: CUDA start-up apart, then load_model under cProfile."""
import cProfile
import pstats
import sys
import time

import torch

t = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
print(f"cuda init {time.perf_counter() - t:.2f} s", flush=True)
from backend.loading import load_model  # noqa: E402

t = time.perf_counter()
prof = cProfile.Profile()
prof.enable()
loaded = load_model(sys.argv[1], quantization="8bit")
torch.cuda.synchronize()
prof.disable()
print(f"load_model {time.perf_counter() - t:.2f} s", flush=True)
pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(18)
pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
