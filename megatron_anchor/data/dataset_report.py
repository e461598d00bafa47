"""Validation, statistics and a human-readable rendering of a token + role dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from megatron_anchor.data.indexed import (
    bin_path,
    check_role_channel,
    iter_documents,
    read_index_arrays,
    roles_prefix,
)
from megatron_anchor.roles import ROLE_DTYPE, Role, role_name


@dataclass
class DatasetStats:
    """Whole-dataset counts from the index and the role channel."""

    documents: int
    tokens: int
    dtype: str
    min_doc_tokens: int
    mean_doc_tokens: float
    max_doc_tokens: int
    role_counts: Dict[str, int] = field(default_factory=dict)

    def lines(self) -> List[str]:
        out = [
            f"documents {self.documents:,}  tokens {self.tokens:,}  token dtype {self.dtype}",
            f"document length min {self.min_doc_tokens:,}  mean {self.mean_doc_tokens:,.1f}  "
            f"max {self.max_doc_tokens:,}",
            "roles:",
        ]
        for name, n in self.role_counts.items():
            out.append(f"  {name:<17} {n:>14,}  {n / max(self.tokens, 1):6.1%}")
        return out


def dataset_stats(prefix: str) -> DatasetStats:
    """Validate ``prefix`` with its role channel (all checks, every role code) and count."""
    th, _ = check_role_channel(prefix, deep=True)
    _, lengths, _, _ = read_index_arrays(th.path)
    lengths = np.asarray(lengths, dtype=np.int64)
    rbin = bin_path(roles_prefix(prefix))
    roles = np.memmap(rbin, ROLE_DTYPE, "r") if lengths.sum() else np.zeros(0, ROLE_DTYPE)
    counts = np.bincount(np.asarray(roles), minlength=len(Role))
    return DatasetStats(
        documents=th.document_count,
        tokens=int(lengths.sum()),
        dtype=np.dtype(th.dtype).name,
        min_doc_tokens=int(lengths.min()) if len(lengths) else 0,
        mean_doc_tokens=float(lengths.mean()) if len(lengths) else 0.0,
        max_doc_tokens=int(lengths.max()) if len(lengths) else 0,
        role_counts={r.name: int(counts[r]) for r in Role},
    )


def role_runs(ids: np.ndarray, roles: np.ndarray) -> List[tuple]:
    """Split a document into ``(role_code, ids)`` runs of equal role."""
    if len(ids) == 0:
        return []
    cuts = np.flatnonzero(np.diff(roles.astype(np.int16))) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(ids)]])
    return [(int(roles[s]), ids[s:e]) for s, e in zip(starts, ends)]


def render_document(prefix: str, index: int, tokenizer=None, max_runs: Optional[int] = None) -> List[str]:
    """Lines showing document ``index`` as role runs: ``ROLE  'decoded text'`` (or token ids without a tokenizer)."""
    ids = roles = None
    for i, (d, r) in enumerate(zip(iter_documents(prefix), iter_documents(roles_prefix(prefix)))):
        if i == index:
            ids, roles = d, r
            break
    if ids is None:
        raise IndexError(f"{prefix}: no document {index}")
    out = [f"document {index}: {len(ids)} tokens"]
    runs = role_runs(ids, roles)
    for code, run in runs[: max_runs or len(runs)]:
        shown = repr(tokenizer.decode(run.tolist())) if tokenizer is not None else " ".join(map(str, run.tolist()))
        out.append(f"  {role_name(code):<17}{shown}")
    if max_runs and len(runs) > max_runs:
        out.append(f"  ... {len(runs) - max_runs} more runs")
    return out
