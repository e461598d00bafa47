"""megatron-core's distributed optimizer over torch's Adam: the three gaps in its checkpoint path, closed.

Without apex or Transformer Engine (every CPU run, and a GPU machine that has neither) megatron-core's
``DistributedOptimizer`` wraps ``torch.optim.AdamW``, whose step count is a per-parameter state tensor; the fused
Adams it is written for keep the step in the param groups. Its checkpoint code handles that case only in part
(read on megatron-core 0.16.1, ``optimizer/distrib_optimizer.py``):

1. ``state_dict()`` reads each state's ``step`` and asserts there is exactly one value, so before the first
   successful step (fp16 may skip several while the loss scale settles) neither a save nor a load can build the
   optimizer's sharded state dict. :func:`before_state_dict` creates the states torch's Adam would create on its
   first step (``step`` 0, zero moments: megatron-core's ``init_state_fn`` plus the step).
2. A load hands one shared ``step`` tensor to every state (``load_state_dict``), and the per-bucket form
   (``dp_reshardable``) then overwrites it with the step of the optimizer being loaded into. torch's Adam advances
   each state's step in place, so bias corrections after a resume would be wrong. :func:`after_load` puts the
   loaded count (kept in the param groups) into every state, one tensor each.
3. The fully reshardable form's load copies every state key from the checkpoint, ``step`` included, which that
   form does not store (``KeyError: 'step'``). :func:`install` makes that copy leave the step alone (2 sets it).

Each is a no-op where megatron-core uses a fused Adam (``HAVE_APEX_OR_TE``); :func:`tripwire` names any internal
this module leans on that moved. Cost: O(parameters on this rank) once per save or load.
"""

from __future__ import annotations

from typing import List

import torch

_PATCHED = "_megatron_anchor_keeps_step"


def _module():
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer


def uses_torch_adam() -> bool:
    """Whether megatron-core's distributed optimizer runs over torch's Adam here (no apex / Transformer Engine)."""
    return not getattr(_module(), "HAVE_APEX_OR_TE", True)


def tripwire() -> List[str]:
    """The megatron-core internals this module relies on that moved or changed (empty when all hold)."""
    import inspect

    mod = _module()
    problems = []
    if not hasattr(mod, "HAVE_APEX_OR_TE"):
        problems.append("distrib_optimizer.HAVE_APEX_OR_TE is gone")
    cls = getattr(mod, "DistributedOptimizer", None)
    setter = getattr(cls, "_set_main_param_and_optimizer_states", None)
    if setter is None:
        problems.append("DistributedOptimizer._set_main_param_and_optimizer_states is gone")
    elif "model_param_group_index_map" not in inspect.getsource(setter):
        problems.append("DistributedOptimizer._set_main_param_and_optimizer_states no longer finds the main param "
                        "through model_param_group_index_map")
    return problems


def _distributed(optimizer):
    mod = _module()
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, mod.DistributedOptimizer)]


def install() -> None:
    """Make the fully reshardable load keep each state's ``step`` (gap 3). Idempotent; a no-op with a fused Adam."""
    if not uses_torch_adam():
        return
    problems = tripwire()
    if problems:
        raise RuntimeError("megatron_anchor.training.distopt_torch_adam: megatron-core changed under it ("
                           + ", ".join(problems) + "); the distributed optimizer's checkpoints with torch's Adam "
                           "need this module updated")
    cls = _module().DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, _PATCHED, False):
        return

    def set_states(self, model_param, tensors):
        if "step" in tensors:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    setattr(set_states, _PATCHED, True)
    set_states.__wrapped__ = original
    cls._set_main_param_and_optimizer_states = set_states


def before_state_dict(optimizer) -> None:
    """Before building a save's or a load's sharded state dict: give a distributed optimizer that has not stepped
    yet the Adam states its first step would create (gap 1)."""
    if not uses_torch_adam():
        return
    install()
    for opt in _distributed(optimizer):
        inner = opt.optimizer
        if opt.init_state_fn is None:
            continue
        if any(len(inner.state[p]) == 0 for group in inner.param_groups for p in group["params"]):
            opt.init_state_fn(inner, opt.config)
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.tensor(0.0))


def after_load(optimizer) -> None:
    """After ``optimizer.load_state_dict``: every Adam state gets the loaded step count, in its own tensor
    (gap 2)."""
    if not uses_torch_adam():
        return
    for opt in _distributed(optimizer):
        for group in opt.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                state = opt.optimizer.state.get(p)
                if state:
                    state["step"] = torch.tensor(float(group["step"]))
