"""Logits of a checkpoint under megatron-core in a given TP x PP layout, for parity checks against transformers.

Run on every rank of a process group of TP x PP processes (gloo on CPU). Each rank builds its stage and shard of
the model, megatron-core's dist_checkpointing loads its part of the saved global tensors, the first stage embeds
the ids, hidden states go stage to stage (point-to-point), and the last stage's vocabulary shards are gathered over
the tensor-parallel group; every rank returns the full logits. Memory: one shard of the model per rank plus the
activations of one batch; meant for short checks, not for serving.
"""

from __future__ import annotations

from typing import Optional

import torch


def megatron_logits(load: str, ids: torch.Tensor, tp: int = 1, pp: int = 1,
                    iteration: Optional[int] = None) -> torch.Tensor:
    """Full-vocabulary float32 logits ``[batch, tokens, rows]`` of the checkpoint under ``load`` (a directory with
    the run_config.yaml the trainer or the importer writes) for ``ids`` ``[batch, tokens]``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_anchor import cpu_compat
    from megatron_anchor.inference.checkpoint import config_from_args, resolve_checkpoint
    from megatron_anchor.tokenizer import build_tokenizer
    from megatron_anchor.training.model import build_model_chunks, model_provider

    cfg = config_from_args([], load)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cpu_compat.activate()
    created = not ps.model_parallel_is_initialized()
    if created:
        ps.initialize_model_parallel(tp, pp)
    cpu_compat.seed_model_parallel_rng(cfg.training.seed)
    try:
        tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, eod_token=cfg.data.eod_token)
        model = build_model_chunks(cfg, tok.vocab_size, model_provider, torch.device("cpu"))[0]
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, resolve_checkpoint(load, iteration))
        model.load_state_dict(state["model"], strict=False)
        model.eval()
        b, s = ids.shape
        positions = torch.arange(s)[None].expand(b, s)
        with torch.no_grad():
            if not ps.is_pipeline_first_stage():
                hidden = torch.empty(s, b, cfg.model.hidden_size)  # [seq, batch, hidden] between stages
                dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            out = model(ids if ps.is_pipeline_first_stage() else None, positions, attention_mask=None)
            if not ps.is_pipeline_last_stage():
                dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
                logits = None
            else:
                shards = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(shards, dim=-1).float()  # [batch, seq, rows]
            if pp > 1:
                # The last stage holds the logits; every rank of the pipeline group gets them.
                rows = torch.tensor([logits.shape[-1] if logits is not None else 0])
                last = ps.get_pipeline_model_parallel_last_rank()
                dist.broadcast(rows, last, group=ps.get_pipeline_model_parallel_group())
                if logits is None:
                    logits = torch.empty(b, s, int(rows))
                dist.broadcast(logits, last, group=ps.get_pipeline_model_parallel_group())
        return logits
    finally:
        if created:
            ps.destroy_model_parallel()
