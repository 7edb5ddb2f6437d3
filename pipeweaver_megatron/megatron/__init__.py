"""The only place that knows Megatron-LM's training loop: the --pipeweaver flags and
install(), which hands forward_backward_pipeweaver to Megatron."""

from .arguments import FAULTS, add_arguments, chain_args, fault_spec
from .install import install, uninstall

__all__ = ["FAULTS", "add_arguments", "chain_args", "fault_spec", "install", "uninstall"]
