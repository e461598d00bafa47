"""A Hugging Face folder of the Llama family -> a megatron-anchor checkpoint that generation, export and
``pretrain_anchor.py --finetune`` read with no model flags.

What is written under ``OUT``, as the trainer's own saves lay it out:

- ``iter_0000000/``: a megatron-core dist_checkpointing directory holding the model's weights (float32) as sharded
  tensors with their global shapes, so any TP/PP layout (and virtual pipeline stages) loads it; no optimizer state
  (``--finetune`` starts a fresh optimizer; resuming from it is refused by name).
- ``latest_checkpointed_iteration.txt``. Everything is written under ``OUT.tmp-import`` and renamed when complete:
  an interrupted import leaves nothing at ``OUT`` (and an existing ``OUT``, replaced with ``overwrite``, stays
  until then).
- ``run_config.yaml``: the architecture (:mod:`megatron_anchor.hf_import.families`) and the tokenizer.
- ``tokenizer/``: the source's tokenizer files, with the annotation delimiters added as special tokens when asked,
  and ``tokenizer_record.json`` for it.

Vocabulary rows: the source's rows, or, when added delimiters do not fit, the new vocabulary padded to a multiple
of ``make_vocab_size_divisible_by`` (128: Megatron-LM's rule at TP=1, and a multiple of every power-of-two TP up
to 128), recorded as ``--padded-vocab-size`` so every TP reads the same rows. Rows for the added ids and the padding
are the mean of the rows the tokenizer reached before (a mean row takes at most the average row's probability,
so the model's distribution over its old vocabulary barely moves); spare source rows no added id takes are kept.

Cost: the refusals read only ``config.json``, ``tokenizer.json`` and the weight files' headers. Then one megatron
model is allocated (float32, uninitialised) and filled one tensor at a time from memory-mapped files (a fused QKV
or SwiGLU tensor is built from its parts, copied in, and dropped), and megatron-core writes it. Peak memory: the
model plus the largest fused tensor plus what dist_checkpointing's writer buffers; time grows linearly with the
weights (SmolLM2-135M: docs/import.md).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import torch

from megatron_anchor.hf_import.families import ImportRefused, model_fields
from megatron_anchor.hf_import.tokens import missing_delimiters, write_tokenizer_folder
from megatron_anchor.hf_import.weights import HFWeights
from megatron_anchor.outputs import atomic_folder


def _anchor_config(fields: Dict, seq_length: int, divisible_by: int):
    from megatron_anchor.training.config import AnchorConfig

    cfg = AnchorConfig()
    for name, value in fields.items():
        setattr(cfg.model, name, value)
    cfg.model.seq_length = seq_length
    cfg.model.make_vocab_size_divisible_by = divisible_by
    return cfg


def _check_names(weights: HFWeights, spec, src: str) -> None:
    """Refuse, naming them, tensors the mapping needs that the folder lacks and tensors it has that nothing maps
    (an unknown bias, an extra norm): importing would silently drop or invent weights."""
    from megatron_anchor.inference.mapping import hf_names

    need, have = set(hf_names(spec)), set(weights.names())
    if spec.tied_embeddings:
        have.discard("lm_head.weight")  # some tied folders save the shared tensor twice
    problems = [f"missing {n}" for n in sorted(need - have)[:8]] + [f"unmapped {n}" for n in sorted(have - need)[:8]]
    if problems:
        raise ImportRefused(f"{src}: the weights do not match the config's architecture: " + "; ".join(problems))


def _fill_vocab_rows(target: torch.Tensor, tensor: torch.Tensor, vocab_before: int, vocab_now: int,
                     name: str) -> None:
    """In place: the source's rows, then the mean of the rows its tokenizer reached (ids below ``vocab_before``)
    on the added ids (``vocab_before`` .. ``vocab_now``, which may land on spare source rows) and on new padding
    rows. Spare source rows no added id takes keep their values."""
    rows, rows_hf = target.shape[0], tensor.shape[0]
    if tensor.shape[1:] != target.shape[1:] or rows_hf > rows:
        raise ImportRefused(f"{name}: the folder gives shape {tuple(tensor.shape)}, the config {tuple(target.shape)}")
    mean = tensor[:min(vocab_before, rows_hf)].mean(dim=0)
    target[:rows_hf].copy_(tensor)
    target[rows_hf:] = mean
    target[vocab_before:vocab_now] = mean


def _fill(model, weights: HFWeights, spec, vocab_before: int, vocab_now: int) -> None:
    """Copy every tensor into ``model`` (a TP=1/PP=1 GPTModel), one at a time; the vocabulary rows as
    :func:`_fill_vocab_rows` says."""
    from megatron_anchor.inference.mapping import hf_to_megatron

    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    done = set()
    for name, tensor in hf_to_megatron(weights.get, spec):
        target = params.get(name)
        if target is None:
            raise RuntimeError(f"megatron-core's GPTModel has no tensor {name}: its names changed (update "
                               "megatron_anchor.inference.mapping)")
        with torch.no_grad():
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                _fill_vocab_rows(target, tensor, vocab_before, vocab_now, name)
            elif tuple(tensor.shape) != tuple(target.shape):
                raise ImportRefused(f"{name}: the folder gives shape {tuple(tensor.shape)}, the config "
                                    f"{tuple(target.shape)}")
            else:
                target.copy_(tensor)
        del tensor
        done.add(name)
    left = sorted(set(params) - done)
    if left:
        raise RuntimeError(f"megatron tensors the mapping does not fill: {left[:6]} (megatron-core's names changed?)")


def import_hf(src: str, out: str, add_annotation_tokens: bool = False, seq_length: Optional[int] = None,
              make_vocab_size_divisible_by: int = 128, eod_token: Optional[str] = None,
              overwrite: bool = False) -> Dict:
    """Import the Hugging Face folder ``src`` into the checkpoint directory ``out``; returns a summary.

    ``seq_length``: the training sequence length recorded in run_config.yaml (default: the model's context, at
    most 4096; fine-tuning runs set their own). Raises :class:`ImportRefused` before reading any weight when the
    folder cannot be mapped exactly, and before writing anything when ``out`` is not empty (without
    ``overwrite``).
    """
    from megatron_anchor.inference.checkpoint import prepare_config
    from megatron_anchor.inference.model import ModelSpec

    start = time.time()
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise ImportRefused(f"{src}: no config.json (not a Hugging Face model folder)")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    fields = model_fields(hf_config, config_path)
    weights = HFWeights(src)
    rows_hf = weights.shape("model.embed_tokens.weight")[0]
    seq = seq_length or min(hf_config["max_position_embeddings"], 4096)
    cfg = _anchor_config(fields, seq, make_vocab_size_divisible_by)
    cfg.data.tokenizer_type = "HuggingFaceTokenizer"
    cfg.data.tokenizer_model = src  # replaced by the written folder below
    _check_names(weights, ModelSpec.from_anchor_config(prepare_config(cfg), rows_hf), src)
    missing = missing_delimiters(src)
    if missing and not add_annotation_tokens:
        raise ImportRefused(f"{src}/tokenizer.json has no {' or '.join(missing)}: pass --add-annotation-tokens to "
                            "add the annotation delimiters as special tokens (and rows for them)")
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ImportRefused(f"{out} exists and is not empty; pass --overwrite to replace it")
    # Written under a temporary name and renamed when complete: an existing --output is replaced only then.
    final = os.path.abspath(out)
    with atomic_folder(final, tmp=final.rstrip("/") + ".tmp-import") as tmp:
        summary = _write(src, tmp, final, cfg, weights, rows_hf, add_annotation_tokens, eod_token)
    summary.update(output=out, family=hf_config["model_type"], seconds=round(time.time() - start, 1))
    return summary


def _write(src: str, tmp: str, final: str, cfg, weights: HFWeights, rows_hf: int, add_tokens: bool,
           eod_token: Optional[str]) -> Dict:
    """Write the tokenizer folder, the weights, run_config.yaml, the tokenizer record, then the tracker into
    ``tmp``; the paths recorded inside are those under ``final``, where ``tmp`` is renamed afterwards."""
    from megatron.core import dist_checkpointing

    from megatron_anchor.inference.checkpoint import megatron_session, prepare_config
    from megatron_anchor.inference.model import ModelSpec
    from megatron_anchor.tokenizer import HuggingFaceAnchorTokenizer, TokenizerError
    from megatron_anchor.tokenizer.record import checkpoint_record_path, tokenizer_record, write_record
    from megatron_anchor.training.checkpoint_files import RUN_CONFIG_FILE, TRACKER_FILE, WEIGHTS_ONLY_KEY
    from megatron_anchor.training.checkpointing import checkpoint_dir
    from megatron_anchor.training.config_io import dump_yaml
    from megatron_anchor.training.model import build_transformer_config, model_provider, padded_vocab_size

    tok_dir = os.path.join(tmp, "tokenizer")
    added = write_tokenizer_folder(src, tok_dir, add_tokens)
    try:
        tok = HuggingFaceAnchorTokenizer(tok_dir, eod_token=eod_token, check_roundtrip=False)
    except TokenizerError as exc:
        raise ImportRefused(f"{src}: tokenizer: {exc}") from None
    vocab_before = tok.vocab_size - len(added)
    rows = rows_hf if tok.vocab_size <= rows_hf else padded_vocab_size(
        tok.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    cfg.model.padded_vocab_size = rows
    cfg.data.tokenizer_model, cfg.data.eod_token = tok_dir, eod_token
    one = prepare_config(cfg)
    spec = ModelSpec.from_anchor_config(one, rows)
    with megatron_session(one.training.seed):
        config = build_transformer_config(one)
        config.perform_initialization = False  # every weight is overwritten below
        model = model_provider(one, tok.vocab_size, config=config)
        _fill(model, weights, spec, vocab_before, tok.vocab_size)
        ckpt = checkpoint_dir(tmp, 0)
        os.makedirs(ckpt)
        sharded = {"model": model.sharded_state_dict(),
                   "layout": {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "vp": 1},
                   "train_state": {"iteration": 0, "consumed_train_samples": 0},
                   WEIGHTS_ONLY_KEY: True, "imported_from": os.path.abspath(src)}
        dist_checkpointing.save(sharded, ckpt)
        del model, sharded
    final_tok = os.path.join(final, "tokenizer")
    cfg.data.tokenizer_model = final_tok
    dump_yaml(cfg, os.path.join(tmp, RUN_CONFIG_FILE))
    record = tokenizer_record(tok, "HuggingFaceTokenizer")
    record["tokenizer_model"] = os.path.join(final_tok, "tokenizer.json")
    write_record(checkpoint_record_path(tmp), record)
    with open(os.path.join(tmp, TRACKER_FILE), "w", encoding="utf-8") as f:
        f.write("0")
    return {"checkpoint": checkpoint_dir(final, 0), "vocab_rows": rows, "source_rows": rows_hf,
            "tokenizer_vocab": tok.vocab_size, "added_tokens": added, "tokenizer": final_tok}
