"""How close a distilled annotator comes to its teacher on held-out chunks.

Per key:

- ``agreement``: share of the chunks where the teacher wrote the key on which the student wrote the same value
  (case-insensitive); ``argmax_agreement`` the same for the most likely value (what ``decode=argmax`` writes);
- ``presence_agreement``: share of all chunks where both wrote the key or both left it out;
- ``teacher_entropy`` / ``student_entropy``: the key's tag entropy over the chunks in bits
  (:func:`megatron_anchor.annotation.tag_entropy.key_entropy`: values lower-cased, an absent key counts as the
  value ``<none>``; the diversity metrics count it the same way), and their ratio ``entropy_ratio`` (the
  method wants >= 0.9: broad tags matter more than exact ones); ``teacher_distinct`` / ``student_distinct``:
  distinct values;
- for extractive keys, ``item_f1``: F1 of the comma-separated items.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from megatron_anchor.annotation.distilled.extract import item_f1
from megatron_anchor.annotation.tag_entropy import key_entropy

if TYPE_CHECKING:
    from megatron_anchor.annotation.distilled.model import DistilledAnnotator


def _same(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


def compare_key(student: Sequence[Optional[str]], teacher: Sequence[Optional[str]]) -> Dict[str, float]:
    """The agreement and entropy figures of one key (see the module docstring)."""
    present = [i for i, t in enumerate(teacher) if t is not None]
    h_t, h_s = key_entropy(teacher), key_entropy(student)
    return {
        "agreement": sum(_same(student[i], teacher[i]) for i in present) / len(present) if present else 1.0,
        "presence_agreement": sum((s is None) == (t is None) for s, t in zip(student, teacher)) / max(1, len(teacher)),
        "teacher_entropy": h_t,
        "student_entropy": h_s,
        "entropy_ratio": h_s / h_t if h_t > 0 else (1.0 if h_s == 0 else float("inf")),
        "teacher_distinct": len({t.lower() for t in teacher if t is not None}),
        "student_distinct": len({s.lower() for s in student if s is not None}),
    }


def evaluate(model: "DistilledAnnotator", texts: Sequence[str], teacher: Sequence[Dict[str, str]]) -> Dict[str, object]:
    """Per-key figures of ``model`` against the teacher's values on ``texts``, plus the smallest entropy ratio."""
    decoded = model.predict_values(texts)
    argmax = model.predict_values(texts, "argmax") if model.decode == "sample" else decoded
    keys: Dict[str, Dict[str, float]] = {}
    for head in model.heads:
        t_vals: List[Optional[str]] = [v.get(head.name) for v in teacher]
        row = compare_key(decoded[head.name], t_vals)
        row["argmax_agreement"] = compare_key(argmax[head.name], t_vals)["agreement"]
        row["head"] = "extractive" if head.extractor is not None else "softmax"  # type: ignore[assignment]
        if head.extractor is not None:
            row["item_f1"] = item_f1(decoded[head.name], t_vals)
        keys[head.name] = row
    ratios = [r["entropy_ratio"] for r in keys.values()]
    return {"chunks": len(texts), "decode": model.decode, "keys": keys,
            "min_entropy_ratio": min(ratios) if ratios else None,
            "mean_agreement": sum(r["agreement"] for r in keys.values()) / max(1, len(keys))}


def format_report(report: Dict[str, object]) -> str:
    """A table of :func:`evaluate`'s figures."""
    lines = [f"held-out chunks: {report['chunks']} (decode: {report['decode']})",
             f"{'key':<14}{'head':<11}{'agree':>7}{'argmax':>8}{'present':>9}{'H teacher':>11}{'H student':>11}"
             f"{'ratio':>7}{'distinct t/s':>14}"]
    for name, r in report["keys"].items():  # type: ignore[union-attr]
        lines.append(f"{name:<14}{r['head']:<11}{r['agreement']:>7.2f}{r['argmax_agreement']:>8.2f}"
                     f"{r['presence_agreement']:>9.2f}{r['teacher_entropy']:>11.2f}{r['student_entropy']:>11.2f}"
                     f"{r['entropy_ratio']:>7.2f}{r['teacher_distinct']:>8}/{r['student_distinct']:<5}")
    lines.append(f"smallest entropy ratio: {report['min_entropy_ratio']:.2f}   mean agreement: "
                 f"{report['mean_agreement']:.2f}")
    return "\n".join(lines)
