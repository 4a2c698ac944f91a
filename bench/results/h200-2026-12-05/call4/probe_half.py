"""Where a 16-bit batched fast decoder departs from eager: check_fast_batch.py's bf16 case, logits per capture
(prompt or step, row), under one setting. Usage: python bench/probe_half.py DTYPE [graphs|nographs]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_fast_batch import model_and_prefixes, requests, run  # noqa: E402

from backend.decode.eager import EagerBatchDecoder  # noqa: E402
from backend.decode.fast_batch import BatchFastDecoder  # noqa: E402

dtype = getattr(torch, sys.argv[1])
graphs = "nographs" not in sys.argv
if "warm" in sys.argv:  # as check_fast_batch.py runs it: after a float32 decoder's warm-up (one-row tuning)
    small, pre = model_and_prefixes(torch.float32)
    BatchFastDecoder(small, pre.get, max_batch=1).warm_up()
model, prefixes = model_and_prefixes(dtype)
caps = {}
for name, dec in (("eager", EagerBatchDecoder(model, prefixes.get, max_batch=4)),
                  ("fast", BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=graphs))):
    got = caps[name] = []
    take = dec._take
    dec._take = lambda row, lg, *a, got=got, take=take: got.append((row.id, lg.float().clone())) or take(row, lg, *a)
    run(dec, requests())
errs = []
for (ra, a), (rb, b) in zip(caps["eager"][:16], caps["fast"][:16]):
    errs.append(f"{ra}/{rb}:{((a - b).norm() / a.norm()).item():.1e}")
print(" ".join(errs))
