"""FlexGen's published setting, the check of the offloading cost model: the machine of
the paper (GCP: a 16 GB T4, 208 GB of CPU memory, 1.5 TB SSD), the OPT models it ran,
and the throughput it reported.

Reference data, not a script: `scheduler_decisions.py` imports it from its own folder
and `tests/scheduler/test_offload.py` as `bench.flexgen_reference`.
"""

from __future__ import annotations

from volunteer.scheduler.offload_cost import DeviceSpec, TransformerShape, Workload

GB = 10**9
GIB = 2**30

T4_MACHINE = DeviceSpec(
    gpu_bytes=int(0.95 * 16 * GIB),
    cpu_bytes=208 * GB,
    disk_bytes=1500 * GB,
    # FlexGen measured 12.89 GB/s CPU->GPU; copies overlapped with compute reach ~80%.
    ctog_bytes_s=0.8 * 12.89 * GB,
    gtoc_bytes_s=0.97 * GB,
    dtoc_bytes_s=0.47 * GB,
    ctod_bytes_s=0.75 * GB,
    gpu_flops_prefill=21.2e12,
    gpu_flops_decode=4.3e12,
    gpu_attention_flops=10e12,
    cpu_attention_flops=12.3e9,
    gpu_memory_bytes_s=300e9,
)
OPT_6_7B = TransformerShape.opt(num_layers=32, hidden=4096, num_heads=32)
OPT_30B = TransformerShape.opt(num_layers=48, hidden=7168, num_heads=56)
OPT_175B = TransformerShape.opt(num_layers=96, hidden=12288, num_heads=96)
WORKLOAD = Workload(prompt_len=512, gen_len=32)
OPT_30B_TOKENS_S = 7.32
"""FlexGen's reported OPT-30B throughput on that machine, without compression."""
