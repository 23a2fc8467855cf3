"""What a stage's set-up after `go` spends on CUDA, split: the driver's start (device count, no context: no GPU
memory), the context (`set_device`), and the first allocation. Run in a fresh process, a few times:

    for i in 1 2 3; do python3 benchmarks/cuda_init_cost.py; done
"""

from __future__ import annotations

import json
import time

t0 = time.perf_counter()
import torch  # noqa: E402

t1 = time.perf_counter()
available = torch.cuda.is_available()  # cudaGetDeviceCount: the driver starts, no context is made
t2 = time.perf_counter()
if not available:
    raise SystemExit("no CUDA GPU: nothing to measure")
torch.cuda.set_device(0)  # the primary context: what holds GPU memory
torch.cuda.get_device_properties(0)
t3 = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
t4 = time.perf_counter()
print(json.dumps({"import_torch_s": round(t1 - t0, 4), "device_count_s": round(t2 - t1, 4), "available": available,
                  "context_s": round(t3 - t2, 4), "first_alloc_s": round(t4 - t3, 4)}))  # fmt: skip
