"""The distributed optimizer's checkpoints on the host's Adam.

On a GPU, Megatron-LM's DistributedOptimizer wraps Transformer Engine's or Apex's FusedAdam.
Neither exists on the host, so megatron.core.optimizer falls back to torch.optim.AdamW
(HAVE_APEX_OR_TE = False in distrib_optimizer). torch's Adam creates its per-parameter state
(step, exp_avg, exp_avg_sq) lazily, in the first step(), while that fallback's state_dict()
reads ``step`` from the state of every parameter and asserts there is exactly one value.
Before the first step there is none, and that is exactly when load_checkpoint asks for the
sharded state dict it loads into (``--load`` with ``--ckpt-format torch_dist`` fails with an
AssertionError in DistributedOptimizer.state_dict).

:func:`install` makes state_dict() first create the state torch's Adam would create in its
first step (the same zeros, step 0), which that step then finds and uses unchanged, so the
training numerics do not move and the checkpoint template has the shape the fallback expects.

The same fallback's load_state_dict gives every parameter's state the *same* ``step`` tensor
(``s["step"] = step``), and with the dp_reshardable torch_dist format it then copies the
template's step (a LocalNonpersistentObject, never read from the checkpoint) into it. torch's
Adam increments each parameter's step in place, so after loading the counter starts from the
template's value and advances once per parameter per step: the bias correction of every later
step is wrong and resumed losses drift from an uninterrupted run. :func:`install` gives each
parameter its own step tensor holding the checkpoint's step (which the fallback saved in
every param group) after loading.

The torch format (dp_zero_gather_scatter parameter state) saves param, exp_avg and exp_avg_sq
per parameter but no step, and its loader copies every key of the optimizer state, step
included, from the saved tensors (KeyError 'step'). The step is already set by then (above),
so :func:`install` lets that copy keep it.
"""

from __future__ import annotations

from typing import Any

import torch


def materialize_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Before torch Adam/AdamW's first step (no parameter has state yet), create the state
    that step would create for every parameter (torch.optim.adam._init_group's values)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(optimizer.state.get(p) for p in params):
        return  # stepped already: the fallback's own bookkeeping applies
    for group in optimizer.param_groups:
        on_device = group.get("capturable", False) or group.get("fused", False)
        for param in group["params"]:
            state = optimizer.state[param]
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = (torch.zeros((), dtype=dtype, device=param.device) if on_device
                             else torch.tensor(0.0, dtype=dtype))
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad", False):
                state["max_exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format)


def restore_steps(optimizer: torch.optim.Optimizer, state_dict: Any) -> None:
    """Give every parameter its own ``step`` tensor holding the checkpoint's step (the value
    the fallback stores in each saved param group)."""
    groups = (state_dict or {}).get("optimizer", {}).get("param_groups", [])
    steps = {group["step"] for group in groups if group.get("step") is not None}
    if len(steps) != 1:
        return
    step = float(steps.pop())
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = torch.tensor(step, dtype=state["step"].dtype,
                                         device=state["step"].device)


def install() -> None:
    """Wrap DistributedOptimizer.state_dict / load_state_dict when Megatron runs on torch's
    Adam fallback."""
    import megatron.core.optimizer.distrib_optimizer as distrib

    if distrib.HAVE_APEX_OR_TE:
        return  # FusedAdam keeps step in its param groups; nothing to do
    cls = distrib.DistributedOptimizer
    original_save = cls.state_dict
    original_load = cls.load_state_dict
    if getattr(original_save, "__cpu_standin__", False):
        return

    def state_dict(self: Any) -> Any:
        materialize_adam_state(self.optimizer)
        return original_save(self)

    def load_state_dict(self: Any, state_dict: Any) -> Any:
        result = original_load(self, state_dict)
        restore_steps(self.optimizer, state_dict)
        return result

    original_set = cls._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: Any) -> Any:
        precision_aware = self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        if "step" not in tensors and not precision_aware:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original_set(self, model_param, tensors)

    for new, old in ((state_dict, original_save), (load_state_dict, original_load),
                     (_set_main_param_and_optimizer_states, original_set)):
        new.__doc__ = old.__doc__
        new.__cpu_standin__ = True  # type: ignore[attr-defined]
    cls.state_dict = state_dict  # type: ignore[method-assign]
    cls.load_state_dict = load_state_dict  # type: ignore[method-assign]
    cls._set_main_param_and_optimizer_states = (  # type: ignore[method-assign]
        _set_main_param_and_optimizer_states)
