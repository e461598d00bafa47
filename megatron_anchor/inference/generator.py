"""What users call: a model and tokenizer loaded from a checkpoint or an exported folder, and prompt -> samples."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_anchor.data.sft import TEMPLATE_PRESETS, ChatTemplate
from megatron_anchor.inference.model import DecoderLM
from megatron_anchor.inference.prompts import Prompt, prompt_segments
from megatron_anchor.inference.sampler import (
    GenerationStats,
    Sample,
    SamplingParams,
    annotation_of,
    generate_batch,
)


@dataclass
class PromptFormatter(ABC):
    """What every sampling engine shares: the tokenizer, the chat template prompts are formatted with, and the
    conversion of sampled ids into output rows. Engines add ``generate``."""

    tokenizer: object
    template: ChatTemplate = TEMPLATE_PRESETS["plain"]
    source: str = ""

    def prompt_ids(self, prompt: Prompt, mode: str) -> List[int]:
        """Token ids of the formatted prompt (with the given annotation in conditioned mode)."""
        annotation = None
        if mode == "conditioned":
            if not prompt.annotation:
                raise ValueError(f"prompt {prompt.id!r}: conditioned mode needs an 'annotation' on the prompt")
            annotation = prompt.annotation
        (ids, _roles), = self.tokenizer.encode_segments([prompt_segments(prompt, self.template, annotation)])
        return [int(i) for i in ids]

    def rows(self, prompt: Prompt, mode: str, samples: Sequence[Sample]) -> List[Dict]:
        """Output rows of sampled ids: the decoded response (the template's end-of-turn text cut), token counts,
        and the annotation (sampled in anchored mode, the prompt's own in conditioned mode)."""
        tok = self.tokenizer
        out = []
        suffix = self.template.assistant_suffix
        for s in samples:
            text = tok.decode(s.response_ids)
            if suffix and text.endswith(suffix):
                text = text[: -len(suffix)]
            row = {"response": text, "response_tokens": len(s.response_ids), "finished": s.finished}
            if mode == "anchored":
                row["annotation"] = annotation_of(s, tok)
                row["annotation_tokens"] = len(s.annotation_ids)
            elif mode == "conditioned":
                row["annotation"] = {"tags": [list(t) for t in prompt.annotation], "closed": True, "given": True}
            out.append(row)
        return out

    @abstractmethod
    def generate(self, prompt: Prompt, n: int, mode: str, params: SamplingParams, seed: Optional[int] = None,
                 stats: Optional[GenerationStats] = None) -> List[Dict]:
        """``n`` samples for one prompt (see :meth:`rows`)."""

    def generate_many(self, prompts: Sequence[Prompt], ns: Sequence[int], mode: str, params: SamplingParams,
                      seeds: Sequence[Optional[int]], stats: Optional[GenerationStats] = None) -> List[List[Dict]]:
        """Rows for several prompts; engines that batch across prompts (vLLM) override this."""
        return [self.generate(p, n, mode, params, seed=s, stats=stats) for p, n, s in zip(prompts, ns, seeds)]


@dataclass
class AnchorGenerator(PromptFormatter):
    """The in-house KV-cached decoder (:mod:`megatron_anchor.inference.sampler`): the CPU default."""

    model: Optional[DecoderLM] = None
    batch_rows: int = 64
    """Most sample rows in one batch of :meth:`generate_many` (prompts are grouped whole): a batch's KV cache is
    rows x (longest prompt + caps) x 2 x layers x kv_heads x head_dim floats."""

    def generate(self, prompt: Prompt, n: int, mode: str, params: SamplingParams, seed: Optional[int] = None,
                 stats: Optional[GenerationStats] = None) -> List[Dict]:
        """``n`` samples for one prompt: dicts with ``response``, ``annotation`` (anchored/conditioned) and
        token counts. The response never contains annotation tokens; the template's end-of-turn text is cut."""
        return self.generate_many([prompt], [n], mode, params, [seed], stats)[0]

    def generate_many(self, prompts: Sequence[Prompt], ns: Sequence[int], mode: str, params: SamplingParams,
                      seeds: Sequence[Optional[int]], stats: Optional[GenerationStats] = None) -> List[List[Dict]]:
        """Rows for several prompts, sampled together in batches of up to :attr:`batch_rows` rows (a prompt
        with more samples than that is a batch of its own); prompt i draws from ``seeds[i]`` as
        :meth:`generate` would."""
        tok = self.tokenizer
        out: List[List[Dict]] = []
        start = 0
        while start < len(prompts):
            stop, rows = start, 0
            while stop < len(prompts) and (stop == start or rows + ns[stop] <= self.batch_rows):
                rows += ns[stop]
                stop += 1
            part = prompts[start:stop]
            samples = generate_batch(self.model, [self.prompt_ids(p, mode) for p in part], ns[start:stop], mode,
                                     params, tok.eod, tok.ann_open, tok.ann_close, vocab_size=tok.vocab_size,
                                     seeds=seeds[start:stop], stats=stats)
            out += [self.rows(p, mode, s) for p, s in zip(part, samples)]
            start = stop
        return out

    @torch.no_grad()
    def response_logprobs(self, prompt: Prompt, response: str) -> List[float]:
        """Log-probabilities of the response's tokens after the plain-formatted prompt (quality proxy)."""
        ids = self.prompt_ids(prompt, "plain")
        resp = self.tokenizer.encode_text(response + self.template.assistant_suffix) + [self.tokenizer.eod]
        seq = torch.tensor([ids + resp])
        logits = self.model(seq[:, :-1]).float()
        logp = torch.log_softmax(logits[0, len(ids) - 1:], dim=-1)
        return logp.gather(-1, seq[0, len(ids):, None]).squeeze(-1).tolist()


def load_from_checkpoint(model_args: Sequence[str], load: Optional[str] = None, iteration: Optional[int] = None,
                         template: Optional[ChatTemplate] = None,
                         allow_missing_record: bool = False) -> AnchorGenerator:
    """Read a megatron-anchor checkpoint (any saved TP/PP layout) given the trainer's model flags.

    ``load`` defaults to the flags' ``--load``. Raises
    :class:`~megatron_anchor.inference.checkpoint.CheckpointError` for unreadable or mismatched checkpoints, and
    for one without a tokenizer record unless ``allow_missing_record``.
    """
    from megatron_anchor.inference.checkpoint import checkpoint_config, load_decoder

    model, tok, loaded = load_decoder(*checkpoint_config(model_args, load), iteration,
                                      allow_missing_record=allow_missing_record)
    return AnchorGenerator(tok, template or TEMPLATE_PRESETS["plain"], source=loaded.path, model=model)


def load_from_hf_folder(folder: str, template: Optional[ChatTemplate] = None) -> AnchorGenerator:
    """Load a folder written by ``tools/export_hf.py`` (weights, config and tokenizer.json)."""
    from megatron_anchor.tokenizer import HuggingFaceAnchorTokenizer

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}: no config.json (not an exported model folder)")
    model = DecoderLM.from_hf_folder(folder)
    tok = HuggingFaceAnchorTokenizer(folder, check_roundtrip=False)
    return AnchorGenerator(tok, template or TEMPLATE_PRESETS["plain"], source=folder, model=model)


def load_any(path: str, model_args: Sequence[str] = (), template: Optional[ChatTemplate] = None) -> AnchorGenerator:
    """An exported folder (has config.json) or a checkpoint directory (needs the trainer's model flags)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_from_hf_folder(path, template)
    return load_from_checkpoint(list(model_args), path, template=template)
