"""Loss-mask policies (roles -> which tokens carry loss), the loss function and the forward step.

A policy is a per-role 0/1 table. The final mask is megatron's own ``loss_mask`` (padding, and EOD inputs with
``--eod-mask-loss``) times the policy's mask of the label roles. The loss is a token sum divided once by the
global count of unmasked tokens (megatron-core's per-token loss path), so a masked token contributes exactly
zero gradient and micro-batches with few response tokens are not over-weighted.

In a blended run each dataset of the blend can have its own policy (fine-tuning with pretraining replay: SFT
samples under ``sft-anchored``, replayed pretraining documents under ``pretrain``). megatron-core's
``BlendedDataset`` tags every sample with ``dataset_id``, the index of its dataset in the blend; the forward step
looks the policy up per sample from it. The lookup is a [datasets, 256] table indexed by (dataset_id, role):
memory and time per micro-batch grow with batch x sequence only, never with the data size.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Sequence

import torch

from megatron_anchor.roles import ANNOTATION_ROLES, Role

_ALL_REAL = tuple(r for r in Role if r != Role.PAD)

POLICY_ROLES: Dict[str, tuple] = {
    # Pretraining: the ordinary next-token loss on every real token, annotations included, so the model learns
    # context -> next annotation and annotation -> text.
    "pretrain": _ALL_REAL,
    # Pretraining text only: every real token except annotations. A replay objective kept for ablations: the
    # annotation distribution then gets no gradient from replay either, but long SFT breaks the annotation
    # format under it (docs/sft.md), which the full pretraining objective keeps.
    "pretrain-text": tuple(r for r in _ALL_REAL if r not in ANNOTATION_ROLES),
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

# Sources of a blended fine-tuning run, reported separately: the --data-path samples and the replayed ones.
SOURCES = ("sft", "replay")

# Every metric loss_func reports, as [sum, count] pairs the loop reduces exactly (one list for loop and logs).
REPORT_KEYS = ("lm loss", *(f"{g} loss" for g in REPORT_GROUPS), *(f"{s} loss" for s in SOURCES))


def policy_table(policy: str) -> torch.Tensor:
    """float32 lookup table indexed by role code: 1.0 where the policy keeps the loss."""
    if policy not in POLICY_ROLES:
        raise ValueError(f"unknown loss-mask policy {policy!r}; choose one of {sorted(POLICY_ROLES)}")
    table = torch.zeros(256, dtype=torch.float32)  # uint8 codes: unknown codes never carry loss
    for role in POLICY_ROLES[policy]:
        table[int(role)] = 1.0
    return table


def policy_tables(policies: Sequence[str]) -> torch.Tensor:
    """[len(policies), 256] tables, row i for dataset i of the blend."""
    return torch.stack([policy_table(p) for p in policies])


def apply_policy(loss_mask: torch.Tensor, roles: Optional[torch.Tensor], table: Optional[torch.Tensor],
                 dataset_id: Optional[torch.Tensor] = None):
    """Combine megatron's loss mask [b, s] with the policy's role mask (roles [b, s], role of each label).

    ``table``: one policy [256], or one per dataset of a blend [D, 256] with ``dataset_id`` [b] saying which
    row each sample uses (row 0 for every sample when ``dataset_id`` is None: a run on one dataset).
    """
    if roles is None or table is None:
        return loss_mask
    table = table.to(loss_mask.device)
    if table.dim() == 1:
        return loss_mask * table[roles.long()]
    rows = torch.zeros(roles.shape[0], dtype=torch.long, device=roles.device) if dataset_id is None \
        else dataset_id.long().reshape(-1)
    return loss_mask * table[rows[:, None], roles.long()]  # [b, 1] x [b, s] -> [b, s]


def loss_func(loss_mask: torch.Tensor, roles: Optional[torch.Tensor], output_tensor: torch.Tensor,
              report_role_losses: bool = False, sources: Optional[torch.Tensor] = None):
    """Masked token-sum loss in megatron-core's 3-tuple form ``(loss_sum, num_tokens, report)``.

    ``output_tensor`` holds per-token cross-entropy [b, s]. Each report entry is ``[sum, count]`` so the loop can
    reduce exactly over micro-batches and data-parallel ranks. ``sources`` [b]: the index into :data:`SOURCES`
    of each sample (a blended fine-tuning run); each source's loss is then reported too.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    # Multiplying by the 0/1 mask (not indexing) keeps the graph identical whatever the labels are; the
    # gradient reaching a masked position's logits is exactly 0 * d(loss)/d(logits) = 0.
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}
    detached = losses.detach()
    if report_role_losses and roles is not None:
        flat_roles = roles.reshape(-1)
        for name, group in REPORT_GROUPS.items():
            in_group = torch.zeros_like(mask, dtype=torch.bool)
            for role in group:
                in_group |= flat_roles == int(role)
            group_mask = mask * in_group.float()
            report[f"{name} loss"] = torch.stack([(detached * group_mask).sum(), group_mask.sum()])
    if sources is not None:
        per_token = sources.reshape(-1, 1).expand(loss_mask.shape).reshape(-1)  # [b] -> [b * s]
        for i, name in enumerate(SOURCES):
            source_mask = mask * (per_token == i).float()
            report[f"{name} loss"] = torch.stack([(detached * source_mask).sum(), source_mask.sum()])
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
                      boundaries: str = "none", dataset_policies: Optional[Sequence[str]] = None,
                      dataset_sources: Optional[Sequence[str]] = None):
    """Build ``forward_step(data_iterator, model) -> (output, partial(loss_func, ...))`` for a policy.

    With ``use_roles=False`` (stock GPTDataset samples) the policy is not applied: megatron's mask alone.
    ``boundaries`` is a :data:`BOUNDARY_MODES` entry (see :func:`boundary_mode`).
    ``dataset_policies`` / ``dataset_sources``: a policy and a source name (from :data:`SOURCES`) per dataset
    of the blend, in blend order; each sample is then scored under its own dataset's policy and the loss of
    each source is reported.
    """
    if boundaries not in BOUNDARY_MODES:
        raise ValueError(f"unknown boundary mode {boundaries!r}; choose one of {BOUNDARY_MODES}")
    blended = use_roles and dataset_policies is not None and len(dataset_policies) > 1
    # The lookup tables go to the device once: a copy from pageable host memory per micro-batch would make the host
    # wait for the device every time.
    if not use_roles:
        table = None
    elif blended:
        table = policy_tables(dataset_policies).to(device)
        source_of = torch.tensor([SOURCES.index(s) for s in dataset_sources], dtype=torch.long, device=device)
    else:
        table = policy_table(dataset_policies[0] if dataset_policies else policy).to(device)

    def forward_step(data_iterator, model):
        batch = get_batch(data_iterator, device)
        roles = batch.get("roles") if use_roles else None
        # Only the last pipeline stage gets (and needs) the loss mask and the dataset ids.
        loss_mask, dataset_id, sources = None, None, None
        if "loss_mask" in batch:
            if blended:
                dataset_id = batch.get("dataset_id")
                if dataset_id is None:
                    # Without it every sample would silently get the first dataset's policy.
                    raise RuntimeError("a blended batch has no 'dataset_id': megatron-core's BlendedDataset no "
                                       "longer tags samples with their dataset, so per-dataset loss-mask policies "
                                       "cannot work")
                sources = source_of[dataset_id.long()]
            loss_mask = apply_policy(batch["loss_mask"], roles, table, dataset_id)
        tokens, position_ids, attention_mask, labels, extra = model_inputs(batch, boundaries)
        output = model(tokens, position_ids, attention_mask, labels=labels, **extra)
        return output, partial(loss_func, loss_mask, roles, report_role_losses=report_role_losses,
                               sources=sources)

    return forward_step
