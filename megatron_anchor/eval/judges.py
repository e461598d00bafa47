"""Judges: what scores a prompt's responses. Every reported number carries its judge's name.

A diversity number is only as good as its judge, and the annotator that wrote the training tags scores what it
was built to see: it may be one judge, never the only one (``independent=False`` marks it, and reports list the
independent judges first). The judges here:

- :class:`PartitionJudge`, NoveltyBench's protocol: the responses, in sampling order, are partitioned into
  equivalence classes (a response joins the first class whose first member a similarity model calls equivalent);
  ``distinct`` is the number of classes; ``utility`` (with a quality judge) is NoveltyBench's cumulative utility:
  sum_i p^(i-1) * [response i opens a class] * quality_i / sum_i p^(i-1), patience p (0.8 as NoveltyBench).
  The similarity model here is a sentence embedding with a cosine threshold, calibrated on labelled pairs
  (:func:`calibrate_threshold`) so that the count is neither always 1 nor always N.
- :class:`AttributeJudge`, the paper's Stories protocol: an extractor (an LLM judge through the annotator's
  OpenAI-compatible client, :func:`llm_attribute_judge`) writes a fixed attribute set for every response; the
  score is the Shannon entropy of each attribute's values over the responses, averaged over the attributes.
- :class:`EmbeddingDistanceJudge`: the mean pairwise cosine distance of sentence embeddings.

Quality judges (:class:`QualityJudge`) score single responses, higher is better: a fixed reference model's
likelihood (:class:`ReferenceLikelihood`) or any callable (a reward model, an LLM rating). The sampled model's
own likelihood is never a quality judge: it rewards a collapsed model by construction.
Cost: embedding judges O(N) embeddings + O(N^2) similarities per prompt; LLM judges one request per response.
"""

from __future__ import annotations

import asyncio
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.eval.metrics import greedy_partition, mean_pairwise_cosine_distance, semantic_entropy

Tags = Sequence[Tuple[str, str]]

NOVELTYBENCH_PATIENCE = 0.8
"""NoveltyBench's discount for cumulative utility."""

DEFAULT_ATTRIBUTES = {
    "topic": "what the text is about, in one or two words",
    "genre": "the kind of text in one word, e.g. story, explanation, question, dialogue, list",
    "character": "the first name of the main person, if any",
    "setting": "the place it is set in, if any",
    "tone": "the mood in one word, e.g. neutral, curious, cheerful",
}
"""The LLM judge's fixed attribute set for short texts (the Stories protocol: a fixed set, entropy per attribute);
replace it for other data (``tools/evaluate_diversity.py --judge-attributes``)."""


class QualityJudge(ABC):
    """Scores single responses (higher is better); ``name`` appears beside every number it produces."""

    name: str

    @abstractmethod
    def scores(self, prompt: str, responses: Sequence[str]) -> List[float]:
        """One score per response."""


@dataclass
class CallableQuality(QualityJudge):
    """``fn(prompt, response) -> float`` (a reward model, an LLM rating hook)."""

    fn: Callable[[str, str], float]
    name: str = "judge"

    def scores(self, prompt: str, responses: Sequence[str]) -> List[float]:
        return [float(self.fn(prompt, r)) for r in responses]


@dataclass
class ReferenceLikelihood(QualityJudge):
    """The per-token probability a fixed reference model gives a response after its prompt: the geometric mean
    exp(mean log p) in (0, 1], so that NoveltyBench's utility (which counts repeats as 0) stays meaningful.

    ``logprobs((prompt, response) pairs) -> per-token log-probabilities of each response`` comes from the
    reference model: the in-house decoder (:func:`decoder_reference`) or a vLLM server (:func:`server_reference`).
    """

    logprobs: Callable[[Sequence[Tuple[str, str]]], List[Sequence[float]]]
    name: str = "reference likelihood"
    _memo: Dict[Tuple[str, str], float] = field(default_factory=dict, repr=False)

    def scores(self, prompt: str, responses: Sequence[str]) -> List[float]:
        # Utility and the quality column ask for the same responses: each is scored once.
        todo = list(dict.fromkeys((prompt, r) for r in responses if (prompt, r) not in self._memo))
        for pair, lp in zip(todo, self.logprobs(todo) if todo else []):
            lp = list(lp)
            self._memo[pair] = math.exp(float(np.mean(lp))) if lp else 0.0
        return [self._memo[(prompt, r)] for r in responses]


def decoder_reference(generator) -> Callable[[Sequence[Tuple[str, str]]], List[List[float]]]:
    """Response log-probabilities under an in-house generator (a checkpoint or exported folder), the prompt
    formatted with its chat template as in training."""
    from megatron_anchor.inference.prompts import parse_prompt

    def logprobs(pairs: Sequence[Tuple[str, str]]) -> List[List[float]]:
        return [generator.response_logprobs(parse_prompt({"prompt": p}, "judge", 0), r) for p, r in pairs]

    return logprobs


def server_reference(url: str, concurrency: int = 16) -> Tuple[Callable, str]:
    """Response log-probabilities under the model a vLLM server serves (an instruct model: the prompt goes
    through its chat template, the response is the assistant's turn); returns the function and the model name.
    Tokenized by the server (``/tokenize``), scored with ``prompt_logprobs``, ``concurrency`` requests at once."""
    from concurrent.futures import ThreadPoolExecutor

    from megatron_anchor.inference.vllm_engine import ServerBackend

    server = ServerBackend(url, concurrency=concurrency)

    def one(pair: Tuple[str, str]) -> List[float]:
        prompt, response = pair
        head = server._post("/tokenize", {"model": server.model, "add_generation_prompt": True,
                                          "messages": [{"role": "user", "content": prompt}]})["tokens"]
        body = server._post("/tokenize", {"model": server.model, "prompt": response,
                                          "add_special_tokens": False})["tokens"]
        (lps,) = server.prompt_logprobs([head + body])
        return [float(x) for x in lps[len(head):]]

    def logprobs(pairs: Sequence[Tuple[str, str]]) -> List[List[float]]:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, pairs))

    return logprobs, server.model


class DiversityJudge(ABC):
    """Scores the N responses of one prompt; ``metrics`` names what :meth:`score` returns."""

    name: str
    independent: bool = True
    metrics: Tuple[str, ...] = ()

    @abstractmethod
    def score(self, prompt: str, responses: Sequence[str]) -> Dict[str, float]:
        """Metric -> value for one prompt's responses."""

    def score_many(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> List[Dict[str, float]]:
        """:meth:`score` per prompt (judges that batch requests override this)."""
        return [self.score(p, r) for p, r in zip(prompts, responses)]


@dataclass
class EmbeddingDistanceJudge(DiversityJudge):
    """Mean pairwise cosine distance of the responses' sentence embeddings."""

    embed: Callable[[Sequence[str]], np.ndarray]
    model_name: str = "all-MiniLM-L6-v2"
    independent: bool = True
    metrics: Tuple[str, ...] = ("pairwise_distance",)

    @property
    def name(self) -> str:
        return f"embedding distance ({self.model_name})"

    def score(self, prompt: str, responses: Sequence[str]) -> Dict[str, float]:
        return {"pairwise_distance": mean_pairwise_cosine_distance(self.embed(list(responses)))}


def cumulative_utility(new_class: Sequence[bool], quality: Sequence[float],
                       patience: float = NOVELTYBENCH_PATIENCE) -> float:
    """NoveltyBench's utility: the patience-weighted mean over responses (in order) of quality where a response
    opens a new class, 0 where it repeats one."""
    weights = patience ** np.arange(len(new_class))
    gains = np.array([q if new else 0.0 for new, q in zip(new_class, quality)])
    return float(np.sum(weights * gains) / np.sum(weights)) if len(new_class) else 0.0


@dataclass
class PartitionJudge(DiversityJudge):
    """NoveltyBench's equivalence classes with an embedding similarity model (module docstring)."""

    embed: Callable[[Sequence[str]], np.ndarray]
    threshold: float
    """Cosine similarity at or above which two responses are one class (see :func:`calibrate_threshold`)."""
    model_name: str = "all-MiniLM-L6-v2"
    quality: Optional[QualityJudge] = None
    patience: float = NOVELTYBENCH_PATIENCE
    independent: bool = True

    @property
    def name(self) -> str:
        q = f", utility by {self.quality.name}" if self.quality is not None else ""
        return f"distinct classes ({self.model_name}, cos >= {self.threshold:.2f}{q})"

    @property
    def metrics(self) -> Tuple[str, ...]:  # type: ignore[override]
        return ("distinct", "distinct_fraction") + (("utility",) if self.quality is not None else ())

    def classes(self, responses: Sequence[str]) -> List[List[int]]:
        """The partition, as lists of response indices, each class in sampling order."""
        emb = np.asarray(self.embed(list(responses)), dtype=np.float64)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        sim = emb @ emb.T
        return greedy_partition(range(len(responses)), lambda a, b: sim[a, b] >= self.threshold)

    def score(self, prompt: str, responses: Sequence[str]) -> Dict[str, float]:
        classes = self.classes(responses)
        out = {"distinct": float(len(classes)), "distinct_fraction": len(classes) / max(len(responses), 1)}
        if self.quality is not None:
            firsts = {c[0] for c in classes}
            out["utility"] = cumulative_utility([i in firsts for i in range(len(responses))],
                                                self.quality.scores(prompt, responses), self.patience)
        return out


@dataclass
class AttributeJudge(DiversityJudge):
    """Entropy of a fixed attribute set extracted from every response (the paper's Stories protocol).

    ``extract(texts) -> tags per text``; ``attributes`` fixes the set (a response that lacks one counts as the
    value ``<none>``). Values are compared lower-cased."""

    extract: Callable[[Sequence[str]], List[Tags]]
    attributes: Tuple[str, ...]
    judge_name: str
    independent: bool = True
    metrics: Tuple[str, ...] = ("attribute_entropy",)
    failures: List[str] = field(default_factory=list)
    """Why extraction failed for some responses (those count as all-``<none>``); reported beside the number."""

    @property
    def name(self) -> str:
        return f"attribute entropy ({self.judge_name}: {', '.join(self.attributes)})"

    def _entropy(self, tags: Sequence[Tags]) -> Dict[str, float]:
        ent = semantic_entropy(tags, keys=self.attributes)
        return {"attribute_entropy": ent["score"],
                **{f"entropy_{k}": v for k, v in ent["per_attribute"].items()}}

    def score(self, prompt: str, responses: Sequence[str]) -> Dict[str, float]:
        return self._entropy(self.extract(list(responses)))

    def score_many(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> List[Dict[str, float]]:
        flat = [r for rs in responses for r in rs]
        tags = self.extract(flat)
        out, start = [], 0
        for rs in responses:
            out.append(self._entropy(tags[start:start + len(rs)]))
            start += len(rs)
        return out


def training_annotator_judge(attributes: Tuple[str, ...] = ("topic", "genre", "entities", "tone", "length"),
                             ) -> AttributeJudge:
    """The embedded annotator, which wrote the quickstart's training tags: a judge, but not an independent one."""
    from megatron_anchor.annotation.default_annotator import annotate_text

    return AttributeJudge(lambda texts: [annotate_text(t) for t in texts], attributes,
                          "training annotator (embedded keyword annotator)", independent=False)


@dataclass
class _LLMExtractor:
    """Tags for texts from an LLM through :class:`AnnotatorClient` (greedy, cached when ``cache_path`` is set)."""

    config: object
    schema: object
    cache_path: Optional[str] = None
    failures: List[str] = field(default_factory=list)

    def __call__(self, texts: Sequence[str]) -> List[Tags]:
        results = asyncio.run(self._annotate(list(texts)))
        tags = []
        for text, (found, reason) in zip(texts, results):
            if found is None:
                self.failures.append(f"{reason}: {text[:40]!r}")
            tags.append(list(found or []))
        return tags

    async def _annotate(self, texts: List[str]) -> List[Tuple[Optional[List], Optional[str]]]:
        from megatron_anchor.annotation.llm.response_cache import AnnotationCache, chunk_hash
        from megatron_anchor.annotation.llm.client import AnnotatorClient
        from megatron_anchor.annotation.llm.prompt import prompt_id

        async with AnnotatorClient(self.config, self.schema) as client:
            model = await client.resolve_model()
            unique = list(dict.fromkeys(texts))
            known: Dict[str, List] = {}
            cache = AnnotationCache(self.cache_path, model, prompt_id(self.schema)) if self.cache_path else None
            try:
                if cache is not None:
                    hits = cache.get_many([chunk_hash(t) for t in unique])
                    known = {t: hits[chunk_hash(t)] for t in unique if chunk_hash(t) in hits}
                todo = [t for t in unique if t not in known]
                answers = dict(zip(todo, await client.annotate_many(todo)))
                if cache is not None:
                    for t, a in answers.items():
                        if a.tags is not None:
                            cache.put(chunk_hash(t), a.tags, a.tokens)
            finally:
                if cache is not None:
                    cache.close()
        out = []
        for t in texts:
            if t in known:
                out.append((known[t], None))
            else:
                out.append((answers[t].tags, answers[t].error))
        return out


def llm_attribute_judge(urls: Sequence[str], attributes: Dict[str, str], model: Optional[str] = None,
                        concurrency: int = 32, cache_path: Optional[str] = None,
                        extra_body: Optional[Dict] = None) -> AttributeJudge:
    """An LLM judge through the annotator's client (:class:`AnnotatorClient`): ``attributes`` maps each
    attribute to the description the model is shown; greedy decoding, so a text always gets the same answer.
    ``cache_path``: a SQLite file (the annotation cache's format), so a rerun asks nothing twice."""
    from megatron_anchor.annotation.llm.client import ClientConfig
    from megatron_anchor.annotation.llm.tagschema import TagKey, TagSchema

    schema = TagSchema(keys=tuple(TagKey(k, d) for k, d in attributes.items()), max_tags=len(attributes))
    cfg = ClientConfig(urls=list(urls), model=model, concurrency=concurrency, max_tokens=64,
                       extra_body=dict(extra_body or {}))
    if cfg.model is None:  # the judge's name is the served model's
        cfg.model = asyncio.run(_served_model(cfg, schema))
    extractor = _LLMExtractor(cfg, schema, cache_path)
    return AttributeJudge(extractor, tuple(attributes), f"LLM judge {cfg.model}", failures=extractor.failures)


async def _served_model(cfg, schema) -> str:
    from megatron_anchor.annotation.llm.client import AnnotatorClient

    async with AnnotatorClient(cfg, schema) as client:
        return await client.resolve_model()


def calibrate_threshold(embed: Callable[[Sequence[str]], np.ndarray], same: Sequence[Tuple[str, str]],
                        different: Sequence[Tuple[str, str]]) -> Dict[str, float]:
    """The cosine threshold that best separates labelled pairs: the one maximising balanced accuracy
    (Youden's J) between pairs that are ``same`` (one class) and ``different``. Returns the threshold and the
    rates it achieves, for the report."""
    def sims(pairs):
        a = np.asarray(embed([p[0] for p in pairs]), dtype=np.float64)
        b = np.asarray(embed([p[1] for p in pairs]), dtype=np.float64)
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return (a * b).sum(1)

    s, d = sims(same), sims(different)
    candidates = np.unique(np.concatenate([s, d]))
    best, best_j = 0.0, -1.0
    for th in candidates:
        j = float((s >= th).mean() + (d < th).mean()) / 2
        if j > best_j:
            best, best_j = float(th), j
    return {"threshold": round(best, 3), "balanced_accuracy": round(best_j, 3),
            "same_pairs": len(same), "different_pairs": len(different)}


def read_calibration_pairs(path: str) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """``(same, different)`` pairs of a JSONL of labelled pairs ``{"a": text, "b": text, "same": true|false}`` (what
    :func:`calibrate_threshold` takes); a bad line is a ValueError naming file and line. Memory: the pairs."""
    same, different = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pair = (str(row["a"]), str(row["b"]))
                is_same = row["same"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a calibration pair {{\"a\", \"b\", \"same\"}} ({exc})") from None
            if not isinstance(is_same, bool):
                raise ValueError(f"{path}:{n}: \"same\" must be true or false, got {is_same!r}")
            (same if is_same else different).append(pair)
    if not same or not different:
        raise ValueError(f"{path}: needs both same (true) and different (false) pairs; has {len(same)} and "
                         f"{len(different)}")
    return same, different
