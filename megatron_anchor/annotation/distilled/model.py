"""The distilled annotator: a small model that imitates an LLM annotator's tags, and its file format.

Model family (fastText-style): a chunk's hashed word n-grams (:mod:`.features`) are pooled through one shared
embedding table ``E`` (``[n_features, dim]``) into a ``dim``-vector; for each schema key a linear softmax head
over the values the teacher wrote for that key (class 0: the key is absent) reads that vector. Keys whose values
the teacher copies out of the text (entities, places) get an extractive head instead (:mod:`.extract`).

Decoding. The method needs a broad, high-entropy tag distribution more than exact tags, and ``argmax`` over a
head collapses onto frequent values. So by default each key's value is *sampled* from the head's softmax at a
per-key temperature fitted on held-out chunks so that the tag entropy matches the teacher's, with the random
number derived from the chunk's text: the same chunk gets the same tags in every run, shard and process.
``decode="argmax"`` gives the most likely value instead (more agreement, less entropy).

Cost per chunk: featurisation (linear in the text), a sparse row times ``E`` (non-zeros x dim), and per key a
``dim x classes`` product; ~10-20k chunks/s per core for the product, so featurisation dominates. Memory: ``E``
(``2**hash_bits x dim`` float32: 64 MiB at the defaults) plus the heads; nothing grows with the corpus.

File format: one ``.npz`` (a zip archive of NumPy arrays; no pickle) holding ``meta`` (JSON: format name and
version, the tag schema, feature settings, per-key classes, temperatures and extractors) and the arrays. zip's
per-member CRC makes truncation and corruption fail loudly at load; files are written under a temporary name
and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from megatron_anchor.annotation.distilled.extract import Extractor
from megatron_anchor.annotation.distilled.features import FeatureConfig, Featurizer
from megatron_anchor.annotation.format import Tag, sanitize_tags
from megatron_anchor.annotation.llm.tagschema import SchemaError, TagSchema, schema_from_dict
from megatron_anchor.outputs import atomic_write

FORMAT_NAME = "megatron-anchor-distilled-annotator"
FORMAT_VERSION = 1
DECODES = ("sample", "argmax")


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and what to do."""


@dataclass
class KeyHead:
    """What the model predicts for one key."""

    name: str
    classes: List[Optional[str]] = field(default_factory=list)
    """Softmax heads: the value of each class; class 0 is None (the key is absent)."""
    temperature: float = 1.0
    """Sampling temperature fitted on held-out chunks (softmax heads)."""
    weight: Optional[np.ndarray] = None
    """[dim, classes] (softmax heads)."""
    bias: Optional[np.ndarray] = None
    """[classes] (softmax heads)."""
    extractor: Optional[Extractor] = None
    """Set for extractive keys (no softmax head then)."""


def schema_to_dict(schema: TagSchema) -> Dict[str, Any]:
    """A schema as the decoded YAML that :func:`schema_from_dict` reads back (same fingerprint)."""
    keys = {k.name: {"description": k.description, "aliases": list(k.aliases), "multi": k.multi} for k in schema.keys}
    return {"version": schema.version, "keep_unknown": schema.keep_unknown, "max_tags": schema.max_tags,
            "max_value_chars": schema.max_value_chars, "keys": keys}


def _uniforms(texts: Sequence[str], n_keys: int) -> np.ndarray:
    """[len(texts), n_keys] numbers in [0, 1) that depend only on each text (deterministic sampling)."""
    out = np.empty((len(texts), n_keys), dtype=np.float64)
    width = 4 * n_keys
    for row, text in enumerate(texts):
        raw = b""
        salt = 0
        while len(raw) < width:  # blake2b digests are at most 64 bytes: chain salts for many keys
            raw += hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=64,
                                   salt=salt.to_bytes(8, "little") + b"anchor\0\0").digest()
            salt += 1
        out[row] = np.frombuffer(raw[:width], dtype="<u4") / 2.0 ** 32
    return out


class DistilledAnnotator:
    """A trained distilled annotator (see the module docstring). Build with ``distilled.train``; load with
    :meth:`load`; tag with :meth:`annotate_batch`."""

    def __init__(self, schema: TagSchema, features: FeatureConfig, embedding: np.ndarray, heads: List[KeyHead],
                 decode: str = "sample", info: Optional[Dict[str, Any]] = None):
        if decode not in DECODES:
            raise ValueError(f"unknown decode {decode!r} (choose from {', '.join(DECODES)})")
        self.schema = schema
        self.features = features
        self.embedding = embedding
        self.heads = heads
        self.decode = decode
        self.info: Dict[str, Any] = dict(info or {})
        """Training facts (teacher file, sample size, held-out report) kept in the file for provenance."""
        self._featurize = Featurizer(features)

    @property
    def keys(self) -> List[str]:
        """The keys it writes, in schema order."""
        return [h.name for h in self.heads]

    # -- prediction ------------------------------------------------------------------------------------------

    def hidden(self, texts: Sequence[str]) -> np.ndarray:
        """[B, dim]: the texts' pooled embeddings, which every softmax head reads."""
        x = self._featurize(texts)  # [B, n_features] sparse
        return np.asarray(x @ self.embedding, dtype=np.float32)

    def uniforms(self, texts: Sequence[str]) -> np.ndarray:
        """[B, keys]: the numbers that sampling uses, derived from each text alone."""
        return _uniforms(texts, len(self.heads))

    def head_probabilities(self, head: KeyHead, hidden: np.ndarray, temperature: Optional[float] = None) -> np.ndarray:
        """[B, classes] softmax of a head at ``temperature`` (default: the head's own)."""
        assert head.weight is not None and head.bias is not None
        t = head.temperature if temperature is None else temperature
        logits = (hidden @ head.weight + head.bias) / max(t, 1e-6)  # [B, C]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p

    @staticmethod
    def pick(probs: np.ndarray, u: Optional[np.ndarray]) -> np.ndarray:
        """[B] class ids: inverse-CDF sampling with the uniforms ``u`` [B], or argmax when ``u`` is None."""
        if u is None:
            return probs.argmax(axis=1)
        cdf = np.cumsum(probs, axis=1)  # [B, C]
        ids = (cdf < (u[:, None] * cdf[:, -1:])).sum(axis=1)
        return np.minimum(ids, probs.shape[1] - 1)

    def predict_values(self, texts: Sequence[str], decode: Optional[str] = None) -> Dict[str, List[Optional[str]]]:
        """Per key, the value for each text (None: absent), decoded as ``decode`` (default: the model's)."""
        decode = decode or self.decode
        hidden = self.hidden(texts)
        u = self.uniforms(texts) if decode == "sample" else None
        out: Dict[str, List[Optional[str]]] = {}
        for k, head in enumerate(self.heads):
            if head.extractor is not None:
                out[head.name] = [head.extractor.predict(t) for t in texts]
                continue
            ids = self.pick(self.head_probabilities(head, hidden), None if u is None else u[:, k])
            out[head.name] = [head.classes[i] for i in ids.tolist()]
        return out

    def annotate_batch(self, texts: Sequence[str]) -> List[List[Tag]]:
        """Tags for each text, keys in schema order, values sanitised like every other annotator's."""
        if not texts:
            return []
        values = self.predict_values(texts)
        tags: List[List[Tag]] = []
        for row in range(len(texts)):
            raw = [(name, values[name][row]) for name in self.keys if values[name][row] is not None]
            tags.append(sanitize_tags(raw, self.schema.max_value_chars))  # type: ignore[arg-type]
        return tags

    # -- file format ---------------------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> None:
        """Write the model to ``path`` atomically (a temporary file renamed on success)."""
        path = Path(path)
        arrays: Dict[str, np.ndarray] = {"embedding": self.embedding.astype(np.float32)}
        heads = []
        for k, h in enumerate(self.heads):
            entry: Dict[str, Any] = {"name": h.name}
            if h.extractor is not None:
                ex = h.extractor
                entry["extractor"] = {"intercept": ex.intercept, "threshold": ex.threshold,
                                      "max_items": ex.max_items, "prior": {s: list(v) for s, v in ex.prior.items()}}
                arrays[f"extractor_coef_{k}"] = ex.coef.astype(np.float64)
            else:
                assert h.weight is not None and h.bias is not None
                entry.update(classes=h.classes, temperature=h.temperature)
                arrays[f"weight_{k}"] = h.weight.astype(np.float32)
                arrays[f"bias_{k}"] = h.bias.astype(np.float32)
            heads.append(entry)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "schema": schema_to_dict(self.schema),
                "schema_fingerprint": self.schema.fingerprint(), "features": self.features.to_json(),
                "decode": self.decode, "heads": heads, "info": self.info}
        arrays["meta"] = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
        with atomic_write(path, "wb", fsync=True) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "DistilledAnnotator":
        """Read a model file; raises :class:`ModelFileError` naming the file when it is missing, corrupt, not a
        distilled annotator, or from an unknown format version."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"distilled annotator {path} does not exist (train one with "
                                 "tools/distill_annotator.py)")
        try:
            with open(path, "rb") as f:
                blob = f.read()
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}  # reads (and CRC-checks) every member
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ModelFileError(f"{path} is not a readable distilled annotator (corrupt or truncated: "
                                 f"{type(e).__name__}: {e}); train it again or copy it again") from None
        try:
            meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
        except (KeyError, ValueError) as e:
            raise ModelFileError(f"{path} has no readable metadata ({type(e).__name__}): not a distilled "
                                 "annotator file") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ModelFileError(f"{path} is not a distilled annotator file (format {meta.get('format')!r})"
                                 if isinstance(meta, dict) else f"{path}: metadata is not an object")
        if meta.get("version") != FORMAT_VERSION:
            raise ModelFileError(f"{path} uses format version {meta.get('version')}; this version reads "
                                 f"{FORMAT_VERSION}: train it again with this version's tools/distill_annotator.py")
        try:
            return cls._from_parts(meta, arrays, str(path))
        except (KeyError, TypeError, ValueError, SchemaError) as e:
            raise ModelFileError(f"{path} is inconsistent ({type(e).__name__}: {e}); train it again") from None

    @classmethod
    def _from_parts(cls, meta: Dict[str, Any], arrays: Dict[str, np.ndarray], where: str) -> "DistilledAnnotator":
        schema = schema_from_dict(meta["schema"], where)
        if schema.fingerprint() != meta["schema_fingerprint"]:
            raise ValueError("the stored schema does not match its fingerprint")
        features = FeatureConfig.from_json(meta["features"])
        embedding = arrays["embedding"]
        if embedding.ndim != 2 or embedding.shape[0] != features.n_features:
            raise ValueError(f"embedding shape {embedding.shape} does not fit {features.n_features} features")
        heads = []
        for k, entry in enumerate(meta["heads"]):
            if "extractor" in entry:
                e = entry["extractor"]
                ex = Extractor(arrays[f"extractor_coef_{k}"], float(e["intercept"]), float(e["threshold"]),
                               int(e["max_items"]), {s: (float(v[0]), float(v[1])) for s, v in e["prior"].items()})
                heads.append(KeyHead(entry["name"], extractor=ex))
                continue
            w, b = arrays[f"weight_{k}"], arrays[f"bias_{k}"]
            classes = list(entry["classes"])
            if w.shape != (embedding.shape[1], len(classes)) or b.shape != (len(classes),):
                raise ValueError(f"head {entry['name']!r} has shapes {w.shape}/{b.shape} for {len(classes)} classes")
            heads.append(KeyHead(entry["name"], classes, float(entry["temperature"]), w, b))
        unknown = [h.name for h in heads if h.name not in {key.name for key in schema.keys}]
        if unknown:
            raise ValueError(f"heads {unknown} are not keys of the stored schema")
        return cls(schema, features, embedding, heads, meta.get("decode", "sample"), meta.get("info"))
