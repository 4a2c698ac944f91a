"""Why is the batched prefill's SDPA slow? Time it per backend, first call and steady state, for prefill shapes."""
import contextlib, time, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
try:
    print("priority", torch._C._get_sdp_priority_order())
except Exception as e:
    print("priority n/a", e)
dev = "cuda"; H, G, D = 32, 2, 128
def case(B, T, S, backends, label):
    q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    mask = torch.arange(S, device=dev)[None, None, :] <= (S - T) + torch.arange(T, device=dev)[None, :, None]
    mask = mask.expand(B, T, S)[:, None]
    out = []
    for trial in range(3):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        try:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                with torch.inference_mode():
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.cuda.synchronize(); out.append(round(1e3 * (time.perf_counter() - t0), 2))
        except Exception as e:
            out.append("err " + str(e)[:60]); break
    print(label, (B, T, S), out, flush=True)
for B, T, S in [(1, 65, 65), (1, 66, 66), (1, 1, 130), (2, 65, 65), (63, 58, 58), (63, 7, 200), (1, 1600, 1600), (1, 1601, 1601)]:
    case(B, T, S, None, "default")
    for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        case(B, T, S, [b], b.name)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    case(1, 67, 67, None, "profiled default")
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
