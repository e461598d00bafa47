"""What annotated mid-training must show: the model writes well-formed annotations where a chunk starts, and keeps
its ability on held-out text (its plain-text loss stays near the imported model's).

- **held-out text loss**: mean next-token cross-entropy (nats) over held-out documents encoded as plain text (no
  annotations) followed by end-of-document, in windows of ``seq_length`` tokens; the same tokens for every model.
- **well-formed annotations**: at each chunk boundary of the held-out documents (the text up to a blank-line
  separator, at most ``context_chars`` of it), ``n`` anchored samples; the share whose annotation closed by itself
  and parses to valid tags (:mod:`megatron_anchor.eval.binding`'s definition, as the diversity report uses).

Time: one forward pass per window of held-out text, plus sampling (prompts x n x the annotation's length).
"""

from __future__ import annotations

import json
from typing import Dict, List, Sequence

import numpy as np


def heldout_texts(path: str, text_key: str = "text") -> List[str]:
    """The ``text`` of every line of a raw JSONL file; a ValueError names the file and line of a bad record, or
    says the file holds none (one pass, the texts held in memory)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{path}:{number}: a record needs a text field {text_key!r}")
            texts.append(record[text_key])
    if not texts:
        raise ValueError(f"{path}: no held-out documents")
    return texts


def text_loss(gen, texts: Sequence[str], seq_length: int) -> float:
    """Mean per-token cross-entropy (nats) of ``gen``'s model on ``texts`` (plain, each followed by EOD)."""
    import torch

    total, count = 0.0, 0
    for text in texts:
        ids = gen.tokenizer.encode_text(text) + [gen.tokenizer.eod]
        for start in range(0, len(ids) - 1, seq_length):
            window = torch.as_tensor(np.asarray(ids[start:start + seq_length + 1], dtype=np.int64))[None]
            if window.shape[1] < 2:
                continue
            with torch.no_grad():
                logits = gen.model(window[:, :-1]).float()  # [1, T, V]
            nll = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
            total += float(nll)
            count += window.shape[1] - 1
    return total / max(count, 1)


def chunk_start_prompts(texts: Sequence[str], per_document: int = 4, context_chars: int = 600) -> List[str]:
    """Contexts that end where a chunk starts: each document's text up to one of its first ``per_document``
    blank-line separators (the last ``context_chars`` characters of it)."""
    prompts = []
    for text in texts:
        at = 0
        for _ in range(per_document):
            at = text.find("\n\n", at)
            if at < 0:
                break
            at += 2
            prompts.append(text[max(0, at - context_chars):at])
    return prompts


def annotation_format(gen, prompts: Sequence[str], n: int, seed: int = 0, max_annotation_tokens: int = 64) -> Dict:
    """Anchored samples at each prompt: the shares of annotations that closed and that are well formed."""
    from megatron_anchor.eval.binding import binding
    from megatron_anchor.inference import SamplingParams
    from megatron_anchor.inference.prompts import parse_prompt

    params = SamplingParams(temperature=1.0, max_new_tokens=1, max_annotation_tokens=max_annotation_tokens)
    annotations = []
    for i, text in enumerate(prompts):
        rows = gen.generate(parse_prompt({"prompt": text}, f"chunk-{i}", i), n, "anchored", params, seed=seed + i)
        annotations += [r["annotation"] for r in rows]
    shares = binding(annotations, [[] for _ in annotations])
    return {"samples": len(annotations), "annotation_closed": shares["annotation_closed"],
            "annotation_well_formed": shares["annotation_well_formed"],
            "examples": [a.get("text") for a in annotations[:5]]}


def midtraining_report(base, model, heldout: Sequence[str], seq_length: int = 256, n: int = 4,
                       per_document: int = 4, seed: int = 0) -> Dict:
    """Both measures for the imported ``base`` and the mid-trained ``model`` (generators), and their ratio."""
    prompts = chunk_start_prompts(heldout, per_document)
    out = {"heldout_documents": len(heldout), "prompts": len(prompts), "samples_per_prompt": n}
    for name, gen in (("base", base), ("midtrained", model)):
        out[name] = {"heldout_text_loss": text_loss(gen, heldout, seq_length),
                     **annotation_format(gen, prompts, n, seed)}
    out["text_loss_ratio"] = out["midtrained"]["heldout_text_loss"] / out["base"]["heldout_text_loss"]
    return out
