"""Loss-mask policies (roles -> which tokens carry loss), the loss function and the forward step.

A policy is a per-role 0/1 table. The final mask is megatron's own ``loss_mask`` (padding, and EOD inputs with
``--eod-mask-loss``) times the policy's mask of the label roles. The loss is a token sum divided once by the
global count of unmasked tokens (megatron-core's per-token loss path), so a masked token contributes exactly
zero gradient and micro-batches with few response tokens are not over-weighted.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import torch

from megatron_anchor.roles import ANNOTATION_ROLES, Role

_ALL_REAL = tuple(r for r in Role if r != Role.PAD)

POLICY_ROLES: Dict[str, tuple] = {
    # Pretraining: the ordinary next-token loss on every real token, annotations included, so the model learns
    # context -> next annotation and annotation -> text.
    "pretrain": _ALL_REAL,
    # Anchored SFT: only the response (and the EOD that ends it) is fitted; prompt and annotation tokens get
    # zero loss so R(z|x) keeps its pretraining shape.
    "sft-anchored": (Role.RESPONSE, Role.EOD),
    # Standard SFT: the same positions. Its data has no annotation between prompt and response, so this is
    # the classic "loss on the response only" baseline; a separate name keeps run configs self-describing.
    "sft-standard": (Role.RESPONSE, Role.EOD),
}

# Role groups reported separately during pretraining (a loss per group, besides the total).
REPORT_GROUPS = {
    "annotation": tuple(ANNOTATION_ROLES),
    "text": (Role.TEXT,),
}


def policy_table(policy: str) -> torch.Tensor:
    """float32 lookup table indexed by role code: 1.0 where the policy keeps the loss."""
    if policy not in POLICY_ROLES:
        raise ValueError(f"unknown loss-mask policy {policy!r}; choose one of {sorted(POLICY_ROLES)}")
    table = torch.zeros(256, dtype=torch.float32)  # uint8 codes: unknown codes never carry loss
    for role in POLICY_ROLES[policy]:
        table[int(role)] = 1.0
    return table


def apply_policy(loss_mask: torch.Tensor, roles: Optional[torch.Tensor], table: Optional[torch.Tensor]):
    """Combine megatron's loss mask [b, s] with the policy's role mask (roles [b, s], role of each label)."""
    if roles is None or table is None:
        return loss_mask
    return loss_mask * table.to(loss_mask.device)[roles.long()]


def loss_func(loss_mask: torch.Tensor, roles: Optional[torch.Tensor], output_tensor: torch.Tensor,
              report_role_losses: bool = False):
    """Masked token-sum loss in megatron-core's 3-tuple form ``(loss_sum, num_tokens, report)``.

    ``output_tensor`` holds per-token cross-entropy [b, s]. Each report entry is ``[sum, count]`` so the loop can
    reduce exactly over micro-batches and data-parallel ranks.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    # Multiplying by the 0/1 mask (not indexing) keeps the graph identical whatever the labels are; the
    # gradient reaching a masked position's logits is exactly 0 * d(loss)/d(logits) = 0.
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}
    if report_role_losses and roles is not None:
        flat_roles = roles.reshape(-1)
        detached = losses.detach()
        for name, group in REPORT_GROUPS.items():
            in_group = torch.zeros_like(mask, dtype=torch.bool)
            for role in group:
                in_group |= flat_roles == int(role)
            group_mask = mask * in_group.float()
            report[f"{name} loss"] = torch.stack([(detached * group_mask).sum(), group_mask.sum()])
    return loss_sum, num_tokens, report


def get_batch(data_iterator, device: torch.device):
    """Next micro-batch on ``device`` (the keys this pipeline stage uses; see
    :mod:`megatron_anchor.training.batch`), or ``{}`` for a stage that uses no data (no iterator)."""
    if data_iterator is None:
        return {}
    batch = next(data_iterator)
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


BOUNDARY_MODES = ("none", "thd", "mask")
"""How document boundaries reach attention: not at all (plain causal), as THD ``PackedSeqParams`` (Transformer
Engine) or as a dense block-causal mask (local layers). :func:`boundary_mode` picks one from the config."""


def boundary_mode(reset_attention_mask: bool, transformer_impl: str) -> str:
    """The :data:`BOUNDARY_MODES` entry for a run (``transformer_impl`` already resolved from ``auto``)."""
    if not reset_attention_mask:
        return "none"
    return "thd" if transformer_impl == "transformer_engine" else "mask"


def model_inputs(batch, mode: str):
    """``(tokens, position_ids, attention_mask, labels, extra kwargs)`` for ``GPTModel.forward``.

    ``thd`` flattens the ``[b, s]`` micro-batch into one ``[1, b*s]`` packed sequence (megatron-core's THD layout
    has a batch of one) with the boundaries as ``PackedSeqParams``; its per-token losses come back ``[1, b*s]``,
    in the same order as the flattened loss mask.
    """
    from megatron_anchor.training.packing import (CU_SEQLENS, CU_SEQLENS_PADDED, MAX_SEQLEN, SAMPLE_LENGTH,
                                                  block_causal_mask, thd_params)

    # A pipeline stage gets only what it uses: no tokens past the first stage, no labels before the last.
    tokens, position_ids, labels = batch.get("tokens"), batch.get("position_ids"), batch.get("labels")
    if mode == "none":
        # A dense mask here would be ignored by Transformer Engine's causal kernels: boundaries only as below.
        return tokens, position_ids, None, labels, {}
    if mode == "thd":
        flat = [x.reshape(1, -1) if x is not None else None for x in (tokens, position_ids, labels)]
        params = thd_params(batch[CU_SEQLENS], batch[MAX_SEQLEN], batch.get(CU_SEQLENS_PADDED))
        return flat[0], flat[1], None, flat[2], {"packed_seq_params": params}
    if mode == "mask":
        s, cu = batch[SAMPLE_LENGTH], batch[CU_SEQLENS]
        known = tokens if tokens is not None else labels
        mask = block_causal_mask(cu, known.shape[0] if known is not None else int(cu[-1]) // s, s)
        return tokens, position_ids, mask, labels, {}
    raise ValueError(f"unknown boundary mode {mode!r}; choose one of {BOUNDARY_MODES}")


def make_forward_step(policy: str, device: torch.device, use_roles: bool = True, report_role_losses: bool = False,
                      boundaries: str = "none"):
    """Build ``forward_step(data_iterator, model) -> (output, partial(loss_func, ...))`` for a policy.

    With ``use_roles=False`` (stock GPTDataset samples) the policy is not applied: megatron's mask alone.
    ``boundaries`` is a :data:`BOUNDARY_MODES` entry (see :func:`boundary_mode`).
    """
    table = policy_table(policy) if use_roles else None
    if boundaries not in BOUNDARY_MODES:
        raise ValueError(f"unknown boundary mode {boundaries!r}; choose one of {BOUNDARY_MODES}")

    def forward_step(data_iterator, model):
        batch = get_batch(data_iterator, device)
        roles = batch.get("roles") if use_roles else None
        # Only the last pipeline stage gets (and needs) the loss mask.
        loss_mask = apply_policy(batch["loss_mask"], roles, table) if "loss_mask" in batch else None
        tokens, position_ids, attention_mask, labels, extra = model_inputs(batch, boundaries)
        output = model(tokens, position_ids, attention_mask, labels=labels, **extra)
        return output, partial(loss_func, loss_mask, roles, report_role_losses=report_role_losses)

    return forward_step
