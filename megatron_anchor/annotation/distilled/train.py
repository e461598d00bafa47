"""Train a distilled annotator from a teacher-annotated sample (the output of ``tools/annotate.py`` on 1-5% of a
corpus) and measure it on held-out chunks.

Steps: read and check the teacher file (:func:`load_teacher`); split its *documents* into train / validation /
test (chunks of one document never straddle two splits); fit the shared embedding and the softmax heads jointly
with PyTorch (sparse embedding gradients, early stopping on the validation loss); fit extractive heads for keys
the teacher copies from the text; fit each softmax head's sampling temperature on the validation chunks so that
its tag entropy matches the teacher's; report agreement and entropy on the test chunks (:mod:`.evaluate`).

Time grows linearly with the sample (epochs x chunks x non-zeros x dim) and memory with the embedding table
(``2**hash_bits x dim``) plus the sample's sparse features: a 5,000-chunk sample trains in well under a minute on
one core; 1M chunks in the order of an hour.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_anchor.annotation.distilled.evaluate import evaluate
from megatron_anchor.annotation.distilled.extract import extractive_share, fit_extractor
from megatron_anchor.annotation.distilled.features import FeatureConfig, Featurizer
from megatron_anchor.annotation.distilled.model import DECODES, DistilledAnnotator, KeyHead
from megatron_anchor.annotation.llm.tagschema import TagSchema
from megatron_anchor.annotation.schema import DocumentError, parse_line
from megatron_anchor.annotation.tag_entropy import key_entropy
from megatron_anchor import bounds
from megatron_anchor.bounds import bounded

_TEMPERATURES = tuple(round(0.25 * 1.12 ** i, 4) for i in range(32))  # 0.25 .. ~8.4, geometric


class TeacherError(ValueError):
    """A teacher file that cannot be learned from; the message names the file (and line) and what to do."""


@dataclass
class TeacherSample:
    """The teacher's chunks: text, the value per key (multi-valued keys joined by ", "), and the document."""

    texts: List[str] = field(default_factory=list)
    values: List[Dict[str, str]] = field(default_factory=list)
    documents: List[int] = field(default_factory=list)
    """Index of each chunk's document (splits are drawn by document)."""
    skipped: List[str] = field(default_factory=list)
    """Why each bad document was skipped (``skip_bad``), ``file:line`` first."""

    def __len__(self) -> int:
        return len(self.texts)


def load_teacher(path: Union[str, Path], keys: Sequence[str], skip_bad: bool = False) -> TeacherSample:
    """Read a teacher file (annotated JSONL) and check that every chunk is tagged and every key occurs.

    Raises :class:`TeacherError` naming the file and line of a bad document or untagged chunk (with ``skip_bad``
    such documents are skipped and listed in ``skipped``), or the keys that no chunk has. Reads the file once;
    memory grows with the sample's text.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
    sample = TeacherSample()
    wanted = set(keys)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                doc = parse_line(raw.rstrip(b"\r\n"), where)
                untagged = [i for i, chunk in enumerate(doc.chunks) if chunk.tags is None]
                if untagged:
                    raise TeacherError(f"{where}: chunk {untagged[0]} has no tags: the teacher file must be fully "
                                       "annotated (drop the document, or annotate it first)")
            except (DocumentError, TeacherError) as e:
                why = f"{e} (the teacher file must be tools/annotate.py output)" if isinstance(e, DocumentError) \
                    else str(e)
                if not skip_bad:
                    raise TeacherError(why + "; --skip-bad-documents skips such documents") from None
                sample.skipped.append(why)
                continue
            for i, chunk in enumerate(doc.chunks):
                per_key: Dict[str, List[str]] = {}
                for k, v in chunk.tags:
                    if k in wanted:
                        per_key.setdefault(k, []).append(v)
                sample.texts.append(chunk.text)
                sample.values.append({k: ", ".join(vs) for k, vs in per_key.items()})
                sample.documents.append(line_no)
    if not sample.texts:
        raise TeacherError(f"teacher file {path} holds no chunks"
                           + (f" ({len(sample.skipped)} bad documents skipped)" if sample.skipped else ""))
    seen = Counter(k for v in sample.values for k in v)
    missing = [k for k in keys if not seen[k]]
    if missing:
        raise TeacherError(
            f"teacher file {path} has no tags for key(s) {', '.join(missing)} in any of its {len(sample)} chunks "
            f"(keys present: {', '.join(sorted(seen)) or 'none'}); annotate the sample with the schema that has "
            "them, or leave them out (--keys)"
        )
    return sample


@dataclass
class DistillConfig:
    """How a distilled annotator is trained. ``tools/distill_annotator.py`` maps its flags onto these fields."""

    dim: int = bounded(64, ge=1)
    """Width of the shared embedding (fastText uses 10-300; 64 is plenty for tags)."""
    epochs: int = bounded(20, ge=1)
    """Most passes over the training chunks (early stopping usually ends sooner)."""
    patience: int = bounded(3, ge=1)
    """Stop after this many epochs without a validation loss 1% below the best."""
    min_steps: int = bounded(400, ge=0)
    """Optimizer steps before early stopping may end training (small samples get more epochs to reach them)."""
    batch_size: int = bounded(128, ge=1)
    lr: float = bounded(0.02, gt=0)
    """Adam learning rate of the heads."""
    embedding_lr: float = bounded(3.0, gt=0)
    """SGD learning rate of the embedding, decayed linearly to 0 (as fastText trains; sparse Adam is ~5x slower
    per step)."""
    max_classes: int = bounded(4096, ge=1)
    """Most values per key (the most frequent); rarer values are not learned."""
    test_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share of the teacher's documents held out for the report."""
    validation_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share held out for early stopping, temperatures and extractor thresholds."""
    extractive_share: float = bounded(0.6, ge=0)
    """A key gets an extractive head when at least this share of its teacher items are spans of their chunk."""
    decode: str = "sample"
    """``sample`` (entropy-matched temperature) or ``argmax``."""
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def check(self) -> None:
        """Raise ValueError for settings that cannot train (out of range, or splits that leave nothing)."""
        if self.decode not in DECODES:
            raise ValueError(f"unknown decode {self.decode!r} (choose from {', '.join(DECODES)})")
        bounds.check(self, ValueError)
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError(f"--test-fraction {self.test_fraction:g} and --validation-fraction "
                             f"{self.validation_fraction:g} leave no documents to train on (their sum must be below "
                             "1)")


def _split(sample: TeacherSample, cfg: DistillConfig) -> Tuple[List[int], List[int], List[int]]:
    docs = sorted(set(sample.documents))
    random.Random(cfg.seed).shuffle(docs)
    n_test = max(1, round(len(docs) * cfg.test_fraction)) if cfg.test_fraction > 0 else 0
    n_val = max(1, round(len(docs) * cfg.validation_fraction)) if cfg.validation_fraction > 0 else 0
    if len(docs) < n_test + n_val + 1:
        raise TeacherError(f"the teacher sample has {len(docs)} documents: too few to hold out "
                           f"{n_test} for testing and {n_val} for validation; annotate a larger sample")
    test, val = set(docs[:n_test]), set(docs[n_test:n_test + n_val])
    split: Tuple[List[int], List[int], List[int]] = ([], [], [])
    for i, d in enumerate(sample.documents):
        split[0 if d not in test and d not in val else 1 if d in val else 2].append(i)
    return split


def _classes(values: Sequence[Optional[str]], max_classes: int) -> Tuple[List[Optional[str]], Dict[str, int]]:
    """Class 0 = absent, then the most frequent values (compared lower-cased, written in their commonest form)."""
    forms: Dict[str, Counter] = {}
    for v in values:
        if v is not None:
            forms.setdefault(v.lower(), Counter())[v] += 1
    ranked = sorted(forms.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:max_classes]
    classes: List[Optional[str]] = [None] + [c.most_common(1)[0][0] for _, c in ranked]
    return classes, {low: i + 1 for i, (low, _) in enumerate(ranked)}


def _torch_batch(x, rows):  # noqa: ANN001 (scipy CSR, index array)
    import torch

    sub = x[rows]
    return (torch.from_numpy(sub.indices.astype(np.int64)), torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
            torch.from_numpy(sub.data.astype(np.float32)))


def _fit_softmax(x_train, y_train: List[np.ndarray], x_val, y_val: List[np.ndarray], n_classes: List[int],
                 cfg: DistillConfig,
                 log: Callable[[str], None]) -> Tuple[np.ndarray, List[Tuple[np.ndarray, np.ndarray]]]:
    """Joint training of the embedding and the heads; returns E [n_features, dim] and per head (W [dim, C], b [C])."""
    import torch
    from torch import nn

    if not n_classes:
        # Every key is extractive: no head reads the embedding, so none is trained (and a one-column table of zeros
        # keeps the file small and its format unchanged).
        log("every key gets an extractive head: no embedding to train")
        return np.zeros((cfg.features.n_features, 1), dtype=np.float32), []
    torch.manual_seed(cfg.seed)
    emb = nn.EmbeddingBag(cfg.features.n_features, cfg.dim, mode="sum", sparse=True)
    nn.init.uniform_(emb.weight, -1.0 / cfg.dim, 1.0 / cfg.dim)
    heads = nn.ModuleList(nn.Linear(cfg.dim, c) for c in n_classes)
    for h in heads:
        nn.init.zeros_(h.weight)
        nn.init.zeros_(h.bias)
    opt_e = torch.optim.SGD(list(emb.parameters()), lr=cfg.embedding_lr)
    per_epoch = max(1, math.ceil(x_train.shape[0] / cfg.batch_size))
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))
    steps = epochs * per_epoch
    decay = torch.optim.lr_scheduler.LambdaLR(opt_e, lambda step: max(0.0, 1.0 - step / steps))
    opt_h = torch.optim.Adam(heads.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    ty_train = [torch.from_numpy(y) for y in y_train]
    ty_val = [torch.from_numpy(y) for y in y_val]

    def total_loss(xb, rows, ys) -> "torch.Tensor":  # noqa: ANN001
        h = emb(*xb)  # [B, dim]
        parts = [loss_fn(head(h), y[rows]) for head, y in zip(heads, ys) if bool((y[rows] >= 0).any())]
        return torch.stack(parts).sum() if parts else h.sum() * 0

    rng = np.random.default_rng(cfg.seed)
    best, best_state, stale = math.inf, None, 0
    val_rows = torch.arange(x_val.shape[0])
    val_batch = _torch_batch(x_val, np.arange(x_val.shape[0])) if x_val.shape[0] else None
    for epoch in range(epochs):
        order = rng.permutation(x_train.shape[0])
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            loss = total_loss(_torch_batch(x_train, rows), torch.from_numpy(rows), ty_train)
            opt_e.zero_grad()
            opt_h.zero_grad()
            loss.backward()
            opt_e.step()
            opt_h.step()
            decay.step()
        if val_batch is None:
            continue
        with torch.no_grad():
            v = float(total_loss(val_batch, val_rows, ty_val))
        log(f"epoch {epoch + 1}: validation loss {v:.4f}")
        if v < best * 0.99:
            best, stale = v, 0
            best_state = ([emb.weight.detach().clone()], [(h.weight.detach().clone(), h.bias.detach().clone())
                                                            for h in heads])
        else:
            stale += 1
            if stale >= cfg.patience and (epoch + 1) * per_epoch >= cfg.min_steps:
                break
    if best_state is None:
        best_state = ([emb.weight.detach()], [(h.weight.detach(), h.bias.detach()) for h in heads])
    e = best_state[0][0].numpy().astype(np.float32)
    return e, [(w.numpy().T.astype(np.float32).copy(), b.numpy().astype(np.float32)) for w, b in best_state[1]]


def _fit_temperature(model: DistilledAnnotator, head: KeyHead, hidden: np.ndarray, u: np.ndarray,
                     teacher: Sequence[Optional[str]]) -> float:
    """The temperature whose sampled tags (``hidden`` [B, dim], uniforms ``u`` [B]) have the teacher's entropy
    (ties: the coolest)."""
    target = key_entropy(teacher)
    best = (math.inf, 1.0)
    for t in _TEMPERATURES:
        ids = model.pick(model.head_probabilities(head, hidden, t), u)
        best = min(best, (abs(key_entropy([head.classes[i] for i in ids.tolist()]) - target), t))
    return best[1]


def distill(sample: TeacherSample, schema: TagSchema, cfg: DistillConfig,
            log: Callable[[str], None] = lambda s: None) -> Tuple[DistilledAnnotator, Dict[str, object]]:
    """Train on ``sample`` for ``schema``'s keys; returns the model and its held-out report (:func:`evaluate`)."""
    cfg.check()
    train, val, test = _split(sample, cfg)
    keys = [k.name for k in schema.keys]
    featurize = Featurizer(cfg.features)
    x_all = featurize(sample.texts)  # [N, n_features] sparse
    x_train, x_val = x_all[train], x_all[val]
    col = {k: [v.get(k) for v in sample.values] for k in keys}

    extractive = {k for k in keys if extractive_share(
        (sample.texts[i], col[k][i]) for i in train) >= cfg.extractive_share}
    soft = [k for k in keys if k not in extractive]
    class_lists, y_train, y_val = [], [], []
    for k in soft:
        classes, index = _classes([col[k][i] for i in train], cfg.max_classes)
        class_lists.append(classes)
        for rows, ys in ((train, y_train), (val, y_val)):
            ys.append(np.array([0 if col[k][i] is None else index.get(col[k][i].lower(), -100) for i in rows],
                               dtype=np.int64))
    log(f"training on {len(train)} chunks ({len(val)} validation, {len(test)} test); softmax heads: "
        f"{', '.join(f'{k} ({len(c) - 1} values)' for k, c in zip(soft, class_lists))}; extractive heads: "
        f"{', '.join(sorted(extractive)) or 'none'}")
    embedding, weights = _fit_softmax(x_train, y_train, x_val, y_val, [len(c) for c in class_lists], cfg, log)

    heads: List[KeyHead] = []
    soft_heads = {k: KeyHead(k, c, 1.0, w, b) for k, c, (w, b) in zip(soft, class_lists, weights)}
    val_texts = [sample.texts[i] for i in val]
    for k in keys:
        if k in extractive:
            ex = fit_extractor([sample.texts[i] for i in train], [col[k][i] for i in train], val_texts,
                               [col[k][i] for i in val], seed=cfg.seed)
            heads.append(KeyHead(k, extractor=ex))
        else:
            heads.append(soft_heads[k])
    model = DistilledAnnotator(schema, cfg.features, embedding, heads, cfg.decode)
    if cfg.decode == "sample" and val:
        hidden, u = model.hidden(val_texts), model.uniforms(val_texts)
        for k, h in enumerate(heads):
            if h.extractor is None:
                h.temperature = _fit_temperature(model, h, hidden, u[:, k], [col[h.name][i] for i in val])
        log("sampling temperatures: " + ", ".join(f"{h.name} {h.temperature:g}" for h in heads if h.extractor is None))
    report = evaluate(model, [sample.texts[i] for i in test], [sample.values[i] for i in test]) if test else {}
    model.info = {"train_chunks": len(train), "validation_chunks": len(val), "test_chunks": len(test),
                  "extractive_keys": sorted(extractive), "report": report}
    return model, report
