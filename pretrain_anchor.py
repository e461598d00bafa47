"""Pretrain or fine-tune a GPT model with annotation-anchored loss masks.

    torchrun --nproc-per-node 4 pretrain_anchor.py --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --data-path DIR/data_text_document ... --loss-mask-policy pretrain

The shape of Megatron-LM's pretrain_gpt.py: a model provider, a datasets provider and a forward step handed
to the training loop. Flags: ``--help`` or ``docs/trainer.md``; ``--config run.yaml`` for a YAML file.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from megatron_anchor.training.config import AnchorConfig


def model_provider(cfg: AnchorConfig, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, run=None):
    """Build one GPTModel chunk of this pipeline stage (RoPE/SwiGLU/RMSNorm/GQA as configured, vocab padded for
    TP; ``vp_stage``: the virtual pipeline chunk; ``config``: the run's TransformerConfig; ``run``: the run's
    ResolvedRun, with the padded vocabulary)."""
    from megatron_anchor.training.model import model_provider as build

    return build(cfg, vocab_size, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                 config=config, run=run)


def train_valid_test_datasets_provider(cfg: AnchorConfig, tokenizer, consumed_train_samples: int,
                                       dp_rank: int, dp_size: int, reads: bool = True, run=None):
    """Build AnchorGPTDataset splits (roles beside tokens) and this rank's data iterators (none where the rank
    does not read: its tensor-parallel group's rank 0 reads and broadcasts); ``run``: the run's ResolvedRun (its
    blend)."""
    from megatron_anchor.training.data import build_data

    return build_data(cfg, tokenizer, consumed_train_samples, dp_rank, dp_size, reads=reads, run=run)


def forward_step_factory(cfg: AnchorConfig, device, run=None):
    """``forward_step(data_iterator, model) -> (output, partial(loss_func, loss_mask, roles))``.

    The loss mask is megatron's own mask times the ``--loss-mask-policy`` mask of the label roles (per sample
    with ``--replay-data-path``: replayed samples under ``--replay-loss-mask-policy``); with
    ``--reset-attention-mask`` document boundaries reach attention as THD cu_seqlens (Transformer Engine) or a
    block-causal mask (local layers). ``run``: the run's ResolvedRun (blend and boundary mode, worked out once);
    without one they are derived from ``cfg`` here.
    """
    from megatron_anchor.training.blend import data_blend
    from megatron_anchor.training.loss import boundary_mode, make_forward_step

    use_roles = not (cfg.data.mock_data or cfg.data.no_role_channel)
    report = cfg.logging.log_role_losses and cfg.training.loss_mask_policy == "pretrain" and use_roles
    # With replay, each sample is scored under its own dataset's policy (--replay-loss-mask-policy for replay).
    if run is not None:
        blend, boundaries = run.replay_blend, run.boundary_mode
    else:
        blend = data_blend(cfg) if cfg.data.replay_data_path else None
        boundaries = boundary_mode(cfg.data.reset_attention_mask, cfg.model.transformer_impl)
    return make_forward_step(cfg.training.loss_mask_policy, device, use_roles=use_roles,
                             report_role_losses=report, boundaries=boundaries,
                             dataset_policies=blend and blend.policies, dataset_sources=blend and blend.sources)


def main(argv: Optional[List[str]] = None):
    """Parse flags, train, and return the run's :class:`RunResult`."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_anchor.cpu_compat import quiet_cpu_warnings

    quiet_cpu_warnings()
    from megatron_anchor.training.arguments import ConfigError, parse_args
    from megatron_anchor.training.guards import TrainingAborted
    from megatron_anchor.training.loop import pretrain

    try:
        cfg = parse_args(argv)
        return pretrain(cfg, model_provider, train_valid_test_datasets_provider, forward_step_factory)
    except ConfigError as exc:
        print(f"pretrain_anchor.py: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingAborted as exc:
        print(f"pretrain_anchor.py: training stopped: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    except CheckpointException as exc:  # a BaseException: an unreadable --load checkpoint past the file checks
        print(f"pretrain_anchor.py: error: cannot read the checkpoint under --load: {exc}", file=sys.stderr,
              flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("pretrain_anchor.py: interrupted; checkpoints already saved are complete (resume with --load; "
              "SIGTERM or --exit-signal saves one before stopping)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
    from megatron_anchor.training.initialize import shutdown

    shutdown()
