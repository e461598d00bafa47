"""megatron-core optimizers in checkpoints: the gaps in their save/load paths, closed.

Read on megatron-core 0.16.1 and 0.19.2 (``optimizer/optimizer.py``, ``optimizer/distrib_optimizer.py``):

1. Every Adam, fused (Transformer Engine, apex) or torch's, creates its per-parameter state lazily on its first
   successful step, and fp16 skips steps while its loss scale settles. A checkpoint saved before that step then
   lacks ``exp_avg``/``exp_avg_sq``, and loading it fails (the load asks for them). The distributed optimizer over
   torch's Adam cannot even build the save's state dict (its ``state_dict()`` asserts one ``step`` value).
   :func:`before_state_dict` creates the states the first step would create (megatron-core's ``init_state_fn``;
   plus ``step`` 0 for torch's Adam), for a save and for a load alike; a load replaces them.
2. Over torch's Adam, whose step count is a per-parameter state tensor (the fused Adams keep it in the param
   groups), the distributed optimizer's ``load_state_dict`` hands one shared ``step`` tensor to every state, and
   its per-bucket form (``dp_reshardable``) then overwrites it with the step of the optimizer being loaded into.
   torch's Adam advances each state's step in place, so bias corrections after a resume would be wrong.
   :func:`after_load` puts the loaded count (kept in the param groups) into every state, one tensor each.
3. Over torch's Adam, the distributed optimizer's fully reshardable load copies every state key from the
   checkpoint, ``step`` included, which that form does not store (``KeyError: 'step'``). :func:`install` makes that
   copy leave the step alone (2 sets it).

4. The plain (fp32 and mixed-precision) optimizers save torch's Adam step as one ``common_step``, but only when it
   is truthy, so a checkpoint saved before the first update has no step at all and torch's Adam refuses the load
   (``KeyError: 'step'``). :func:`before_load` gives such a loaded state its step, 0.

2, 3 and 4 are no-ops where megatron-core uses a fused Adam (``HAVE_APEX_OR_TE``);
:func:`tripwire` names any internal this module leans on that moved. Cost: O(parameters on this rank) once per save
or load.
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
        raise RuntimeError("megatron_anchor.training.optimizer_state: megatron-core changed under it ("
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


def _wrapped(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def before_state_dict(optimizer) -> None:
    """Before building a save's or a load's sharded state dict: give every optimizer that has not stepped yet the
    Adam states its first step would create (gap 1)."""
    install()
    for opt in _wrapped(optimizer):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None:
            continue
        if any(len(inner.state[p]) == 0 for group in inner.param_groups for p in group["params"]):
            init(inner, opt.config)
            if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                for group in inner.param_groups:
                    for p in group["params"]:
                        inner.state[p].setdefault("step", torch.tensor(0.0))


def before_load(loaded: dict, optimizer) -> None:
    """Before ``optimizer.load_state_dict(loaded)``: a plain optimizer's torch-Adam state saved before the first
    update gets its step, 0 (gap 4). ``loaded``: the optimizer part of a loaded checkpoint."""
    wrapped = _wrapped(optimizer)
    parts = [loaded] if len(wrapped) == 1 else [loaded.get(i, {}) for i in range(len(wrapped))]
    for opt, part in zip(wrapped, parts):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or "param_state" in part:
            continue  # a fused Adam, or the distributed optimizer's form (gaps 2 and 3)
        torch_sd = part.get("optimizer", part)  # mixed precision nests torch's state dict under "optimizer"
        states = torch_sd.get("state") if isinstance(torch_sd, dict) else None
        if not isinstance(states, dict) or "common_step" in states:
            continue
        if any(isinstance(v, dict) and v and "step" not in v for v in states.values()):
            states["common_step"] = torch.tensor(0.0)


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
