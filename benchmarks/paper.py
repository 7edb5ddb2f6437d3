"""The PipeWeaver paper's numbers the benchmarks compare with, quoted from
../shared/PAPER.md (arXiv 2504.14145 v1). The paper measured its figures on 8x8 H800
(large-scale ones are its own simulation on H100); it gives ranges where noted.
"""

from __future__ import annotations

THROUGHPUT_GAIN = {"VLM": (0.156, 0.762), "T2V": (0.366, 0.973)}
"""'VLM +15.6% to +76.2%, T2V +36.6% to +97.3% throughput over the baselines (100
iterations of real data)': one range per model family over all setups and baselines; no
per-setup or per-baseline figure and no per-setup MFU."""

TABLE1_MFU = {"LM 7B alone": 0.400, "ViT 2B + LM 5B, static data": 0.351,
              "ViT 2B + LM 5B, dynamic data": 0.239}
"""Table 1 (8 GPUs, TP=2, PP=4), Megatron-LM: the MFU a static pipeline reaches."""

ABLATION_S = (26.13, 22.27, 18.81, 17.61, 16.05)
"""VLM-S s/iter: Megatron-LM; + partitioner; + interleaving; + reordering; + per-layer
memory optimisation (62.8% faster)."""

DYNAMIC_MEGATRON_SLOWER_AT_6 = 0.529
"""'at iteration 6 Megatron-LM is 52.9% slower' (than DIP)."""
DYNAMIC_NNSCALER_DEGRADES_15_20 = 0.505
"""'nnScaler* degrades 50.5% in iterations 15-20'."""

SUBMICRO_GAP = (0.154, 0.051)
"""'4-12 shrink best/worst schedule gap from 15.4% to 5.1%' (sizes 4 to 32 images)."""
SUBMICRO_BELOW_8_COST = 0.121
"""'below 8 costs 12.1% more'."""
SUBMICRO_BEST = 12
"""'best is 12' images per sub-microbatch."""

MEMORY_OPTIMUS_PEAK_ABOVE_MEGATRON = 0.253
"""VLM-M, first rank: 'Optimus peaks 25.3% above Megatron-LM'."""
MEMORY_FLUCTUATION_BELOW_MEGATRON = 0.529
"""'DIP has 52.9% less memory fluctuation than Megatron-LM'."""
MEMORY_FASTER_THAN_OPTIMUS_AT_EQUAL_PEAK = 0.122
"""'DIP is 12.2% faster than Optimus at equal peak'."""

SEARCH_NEAR_OPTIMAL_S = 10.0
"""'on VLM-L with 64 cores MCTS reaches a near-optimal schedule within 10 s (about 20 s
iterations); better than DFS and random exploration' (no numbers for DFS or random)."""
ILP_LIMIT_MICROBATCHES = 10
ILP_LIMIT_MINUTES = 30
"""'A monolithic ILP (Z3, Gurobi) cannot finish beyond ~10 microbatches within 30 minutes'."""

LARGE_SCALE_MFU = {"VLM-XL": 0.36, "T2V-XL": 0.39}
LARGE_SCALE_MAX_GAIN = 0.828
"""'MFU 0.36 (VLM-XL), 0.39 (T2V-XL); gains up to 82.8%, growing with PP' (simulated by
the paper on H100)."""

SEMU_ACCURACY = 0.976
"""'97.6% average accuracy after' calibration (up to 10% error before)."""
