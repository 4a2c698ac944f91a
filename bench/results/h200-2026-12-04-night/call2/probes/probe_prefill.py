import sys, time, torch
sys.path.insert(0, "."); sys.path.insert(0, "bench")
from backend.engine import ChatEngine
from backend.decode.protocol import DecodeRequest
from backend.service import SamplingParams
e = ChatEngine.load("/tmp/glm6b", quantization="8bit", max_batch=64)
e.decoder.warm_up()
d = e.decoder
g = SamplingParams(temperature=0.0, max_new_tokens=1)
def one(n, B=1, off=0):
    for b in range(B):
        d.add(1000 + b, DecodeRequest(list(range(100 + off + b, 100 + off + b + n)), g))
    torch.cuda.synchronize(); t0 = time.perf_counter(); d.step(); torch.cuda.synchronize()
    return round(1e3 * (time.perf_counter() - t0), 1)
with e.batcher.step_lock:
    for n, B in [(65, 1), (65, 1), (66, 1), (300, 1), (1600, 1), (1601, 1), (58, 63), (59, 63)]:
        print("prefill", n, B, one(n, B, off=n * 7 + B), "ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        print("profiled prefill 67", one(67, 1, off=5))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
e.close()
