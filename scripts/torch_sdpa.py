"""Peer on a CUDA GPU (used by scripts/gpu_bench.sh): torch SDPA (and a dense f32 reference) at the shapes of multipole-attn's bench.

Usage: python3 torch_sdpa_cuda.py OUT.csv [heads] [n,n,...] [head_dim]
Columns: impl,dtype,causal,n,heads,d,fwd_ms,bwd_ms  (median of CUDA-event timings after warm-up;
bwd_ms = backward alone: (fwd+bwd) - fwd).
impl: flash (bf16, FlashAttention-2 kernel forced), efficient (f32, memory-efficient kernel forced,
up to n = 65536).
"""
import csv, statistics, sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

out = sys.argv[1]
heads = int(sys.argv[2]) if len(sys.argv) > 2 else 8
ns = [int(x) for x in sys.argv[3].split(',')] if len(sys.argv) > 3 else [1024, 4096, 16384, 65536, 131072]
d = int(sys.argv[4]) if len(sys.argv) > 4 else 64
dev = 'cuda'
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)


def time_ms(fn, reps):
    for _ in range(2 if reps > 3 else 1):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


rows = []
cases = [('flash', torch.bfloat16, [SDPBackend.FLASH_ATTENTION]),
         ('efficient', torch.float32, [SDPBackend.EFFICIENT_ATTENTION])]
F32_MAX = 65536  # f32 runs on CUDA cores: ~2 s a forward at 131072 x 8 heads
for n in ns:
    for causal in (False, True):
        for name, dt, backends in cases:
            if dt == torch.float32 and n > F32_MAX:
                continue
            try:
                q, k, v = (torch.randn(1, heads, n, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
                go = torch.randn(1, heads, n, d, device=dev, dtype=dt)
                def fwd():
                    if backends:
                        with sdpa_kernel(backends):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                def fwd_nograd():
                    with torch.no_grad():
                        return fwd()
                def both():
                    o = fwd()
                    o.backward(go)
                reps = 10 if n <= 16384 else 3
                f = time_ms(fwd_nograd, reps)
                fb = time_ms(both, reps)
                rows.append([name, str(dt).split('.')[-1], causal, n, heads, d, round(f, 4), round(fb - f, 4)])
                print(','.join(map(str, rows[-1])), flush=True)
                del q, k, v, go
                torch.cuda.empty_cache()
            except Exception as e:  # a backend that refuses a shape: say so, go on
                print(f'{name},{dt},{causal},{n}: {type(e).__name__}: {str(e)[:120]}', flush=True)
with open(out, 'w', newline='') as fh:
    w = csv.writer(fh)
    w.writerow(['impl', 'dtype', 'causal', 'n', 'heads', 'd', 'fwd_ms', 'bwd_ms'])
    w.writerows(rows)
