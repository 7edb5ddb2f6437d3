"""The runtime: forward_backward_pipeweaver executes a rank's plan on its model chunks
over torch.distributed (gloo on CPU, NCCL on GPU); nothing here names a device.
"""

from .executor import ExecutionError, RankExecutor
from .lmm_step import lmm_forward_step, lmm_loss
from .p2p import Transport
from .schedule import PipeWeaverSchedule

__all__ = ["ExecutionError", "RankExecutor", "lmm_forward_step", "lmm_loss", "Transport",
           "PipeWeaverSchedule"]
