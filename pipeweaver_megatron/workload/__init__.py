"""Workload metadata: samples, packing into microbatches, generators and JSONL traces.

Pure Python + numpy; imports neither torch nor megatron.
"""

from .datasets import DATASETS, DatasetInfo, is_trace_path, make_source
from .distributions import ClippedLogNormal, DatasetTargets, DocumentBlock, split_document
from .dynamic import (DYNAMIC_ITERATIONS, DYNAMIC_PERIOD, dynamic_image_cap, dynamic_peak,
                      dynamic_target)
from .meta import ClipMeta, GlobalBatch, ImageMeta, Microbatch, SampleMeta, WorkloadError
from .packing import BatchStream, pack
from .rules import SampleCost, TokenRules
from .summary import WorkloadSummary, sample_workload, summarize
from .trace import iter_trace, read_trace, record_trace

__all__ = [
    "DATASETS", "DatasetInfo", "is_trace_path", "make_source", "ClippedLogNormal",
    "DatasetTargets", "DocumentBlock", "split_document", "DYNAMIC_ITERATIONS",
    "DYNAMIC_PERIOD", "dynamic_image_cap", "dynamic_peak", "dynamic_target", "ClipMeta",
    "GlobalBatch", "ImageMeta", "Microbatch", "SampleMeta", "WorkloadError", "BatchStream",
    "pack", "SampleCost", "TokenRules", "WorkloadSummary", "sample_workload", "summarize",
    "iter_trace", "read_trace", "record_trace",
]
