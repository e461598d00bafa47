"""What annotated mid-training must show: the model writes well-formed annotations where a chunk starts, and keeps
its ability on held-out text (its plain-text loss stays near the imported model's).

- **held-out text loss**: mean next-token cross-entropy (nats) over held-out documents encoded as plain text (no
  annotations) followed by end-of-document, in windows of ``seq_length`` tokens; the same tokens for every model
  (the first ``max_tokens`` of them when capped).
- **well-formed annotations**: at each chunk boundary of the held-out documents (the text up to a blank-line
  separator, at most ``context_chars`` of it, and cut from its start until it, the annotation cap and one response
  token fit the model's positions), ``n`` anchored samples; the share whose annotation closed by itself
  and parses to valid tags (:mod:`megatron_anchor.eval.binding`'s definition, as the diversity report uses), with
  its 95% Wilson interval (the samples of one prompt are not independent, so read it as a lower bound on the
  uncertainty).

Cost: the held-out loss is one forward pass per ``batch`` windows. Sampling is one batch of every prompt's rows
(:meth:`~megatron_anchor.inference.generator.AnchorGenerator.generate_many`): each prompt is read once, then one
batched step per annotation token until the slowest row closes or reaches the cap. The cap is what bounds a
model that never closes (the imported one: it has never seen the delimiters), so it is sized from the annotations
the model was trained on (:func:`annotation_cap`: 1.5x the longest), not a generic response length.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

CAP_MARGIN = 1.5
"""The annotation cap is this many times the longest training annotation (tokens between the delimiters): a
well-formed annotation of the training distribution always fits, a runaway one is cut soon after."""

DEFAULT_CAP = 48
"""The annotation cap when no training annotations size it (the embedded annotator's are at most 26 tokens with
SmolLM2's tokenizer)."""


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


def annotation_cap(tokenizer, annotated_path: str, margin: float = CAP_MARGIN, max_documents: int = 10_000,
                   batch: int = 4096) -> Dict[str, int]:
    """``{"longest": L, "cap": ceil(margin * L)}``: L is the longest annotation (tokens between the delimiters, as
    ``tokenizer`` encodes it for training) in the first ``max_documents`` documents of an annotated JSONL file.
    Time: one pass over those lines, distinct annotations tokenized in batches; memory: one batch."""
    from megatron_anchor.annotation.format import annotation_segments
    from megatron_anchor.annotation.schema import parse_line

    longest, pending, seen = 0, [], set()

    def flush():
        nonlocal longest
        if pending:
            longest = max([longest] + [len(ids) - 2 for ids, _ in tokenizer.encode_segments(pending)])
            pending.clear()
            seen.clear()

    documents = 0
    with open(annotated_path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if documents >= max_documents:
                break
            documents += 1
            for chunk in parse_line(line, f"{annotated_path}:{i}").chunks:
                key = tuple(tuple(t) for t in chunk.tags or ())
                if key and key not in seen:
                    seen.add(key)
                    pending.append(annotation_segments(key))
            if len(pending) >= batch:
                flush()
    flush()
    if longest == 0:
        raise ValueError(f"{annotated_path}: no annotated chunk in its first {max_documents} documents")
    return {"longest": longest, "cap": math.ceil(margin * longest)}


def text_loss(gen, texts: Sequence[str], seq_length: int, max_tokens: Optional[int] = None,
              batch: int = 8) -> Dict[str, float]:
    """``{"loss": mean per-token cross-entropy (nats), "tokens": predicted tokens}`` of ``gen``'s model on
    ``texts`` (plain, each followed by EOD), in windows of ``seq_length``; the first ``max_tokens`` predicted
    tokens only when given. Full windows go ``batch`` to a forward pass. Memory: batch x seq_length x vocab
    logits."""
    import torch

    windows: List[np.ndarray] = []
    budget = max_tokens if max_tokens is not None else math.inf
    for text in texts:
        ids = np.asarray(gen.tokenizer.encode_text(text) + [gen.tokenizer.eod], dtype=np.int64)
        for start in range(0, len(ids) - 1, seq_length):
            window = ids[start:start + seq_length + 1][:int(min(seq_length, budget)) + 1]
            if len(window) < 2:
                break
            windows.append(window)
            budget -= len(window) - 1
        if budget <= 0:
            break
    total, count = 0.0, 0
    by_length: Dict[int, List[np.ndarray]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(w)
    for group in by_length.values():
        for k in range(0, len(group), batch):
            ids = torch.as_tensor(np.stack(group[k:k + batch]))  # [b, T + 1]
            with torch.no_grad():
                logits = gen.model(ids[:, :-1]).float()  # [b, T, V]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                             reduction="sum"))
            count += ids[:, 1:].numel()
    return {"loss": total / max(count, 1), "tokens": count}


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


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> List[float]:
    """The Wilson score interval of a proportion (scipy's)."""
    from scipy.stats import binomtest

    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def prompt_room(gen, max_annotation_tokens: int) -> int:
    """The most prompt tokens that leave room in ``gen``'s context (``max_positions``) for the annotation opener,
    ``max_annotation_tokens``, the closer and one response token, so that no sample is cut at the context length
    (a cut annotation would count as not closed). A ValueError when there is no room."""
    limit = gen.model.spec.max_positions
    room = limit - max_annotation_tokens - 3
    if room < 1:
        raise ValueError(f"an annotation cap of {max_annotation_tokens} tokens leaves no room for a prompt in the "
                         f"model's {limit} positions")
    return room


def fit_prompt(gen, text: str, room: int, prompt_id: str, index: int):
    """``text`` as an anchored prompt of at most ``room`` tokens: characters are dropped from its start (the end,
    where the chunk starts, is kept). Time: a few encodings of the text (each cut shrinks it in proportion)."""
    from megatron_anchor.inference.prompts import parse_prompt

    while True:
        prompt = parse_prompt({"prompt": text}, prompt_id, index)
        have = len(gen.prompt_ids(prompt, "anchored"))
        if have <= room:
            return prompt
        keep = min(len(text) - 1, int(len(text) * room / have))
        if keep <= 0:
            raise ValueError(f"prompt {prompt_id}: even one character does not fit in {room} prompt tokens")
        text = text[-keep:]


def annotation_format(gen, prompts: Sequence[str], n: int, seed: int = 0,
                      max_annotation_tokens: int = DEFAULT_CAP) -> Dict:
    """Anchored samples at each prompt, all prompts batched (prompt i seeded ``seed + i``): the shares of
    annotations that closed by themselves and that are well formed, the sample count and sampling time. A prompt
    longer than :func:`prompt_room` allows is cut from its start (:func:`fit_prompt`)."""
    from megatron_anchor.eval.binding import binding
    from megatron_anchor.inference import SamplingParams
    from megatron_anchor.inference.sampler import GenerationStats

    # One response token is the least the sampler draws after the annotation closes.
    params = SamplingParams(temperature=1.0, max_new_tokens=1, max_annotation_tokens=max_annotation_tokens)
    room = prompt_room(gen, max_annotation_tokens)
    parsed = [fit_prompt(gen, text, room, f"chunk-{i}", i) for i, text in enumerate(prompts)]
    stats = GenerationStats()
    rows = gen.generate_many(parsed, [n] * len(parsed), "anchored", params, [seed + i for i in range(len(parsed))],
                             stats)
    annotations = [r["annotation"] for rs in rows for r in rs]
    shares = binding(annotations, [[] for _ in annotations])
    well_formed = round(shares["annotation_well_formed"] * len(annotations))
    return {"samples": len(annotations), "annotation_closed": shares["annotation_closed"],
            "annotation_well_formed": shares["annotation_well_formed"],
            "annotation_well_formed_ci95": wilson_interval(well_formed, len(annotations)),
            "mean_annotation_tokens": stats.annotation_tokens / max(len(annotations), 1),
            "sampling_seconds": round(stats.seconds, 1),
            "examples": [a.get("text") for a in annotations[:5]]}


def midtraining_report(base, model, heldout: Sequence[str], seq_length: int = 256, n: int = 4,
                       per_document: int = 4, seed: int = 0, max_annotation_tokens: int = DEFAULT_CAP,
                       max_tokens: Optional[int] = None) -> Dict:
    """Both measures for the imported ``base`` and the mid-trained ``model`` (generators), and their ratio."""
    prompts = chunk_start_prompts(heldout, per_document)
    if not prompts:
        raise ValueError("no held-out document has a blank-line chunk boundary: nothing to sample at")
    out = {"heldout_documents": len(heldout), "prompts": len(prompts), "samples_per_prompt": n,
           "max_annotation_tokens": max_annotation_tokens}
    for name, gen in (("base", base), ("midtrained", model)):
        loss = text_loss(gen, heldout, seq_length, max_tokens)
        out[name] = {"heldout_text_loss": loss["loss"], "heldout_tokens": loss["tokens"],
                     **annotation_format(gen, prompts, n, seed, max_annotation_tokens)}
    out["text_loss_ratio"] = out["midtrained"]["heldout_text_loss"] / out["base"]["heldout_text_loss"]
    return out
