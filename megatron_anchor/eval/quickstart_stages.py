"""What ``examples/quickstart.sh`` runs besides the report (:mod:`megatron_anchor.eval.quickstart`): the settings
it reads from the environment (:data:`KNOBS`, checked before any stage runs), the tokenizer training text that
includes the annotations' text, and each dataset's train/validation ``--split``. The script reaches them through
``python -m megatron_anchor.eval.quickstart knobs | tokenizer-text | split``.

Time and memory: the tokenizer text streams the annotated corpus (one document in memory); the split reads one
``.idx`` header; the knobs are checked in time linear in their number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple


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


VALID_SHARE = 0.02
"""Share of a dataset's sequences held out for validation (the script's old fixed ``--split 98,2,0``)."""
MIN_SEQUENCES_FOR_VALIDATION = 8
"""Below this many sequences validation is skipped: one held-out sequence would be an eighth of the data."""


def adaptive_split(sequences: int, valid_share: float = VALID_SHARE,
                   min_sequences: int = MIN_SEQUENCES_FOR_VALIDATION) -> Optional[str]:
    """Trainer ``--split`` weights ``TRAIN,VALID,0`` that hold out ``valid_share`` of ``sequences`` for validation,
    rounded, and at least one sequence, so no split is ever empty (megatron-core assigns ``round(weight share x
    sequences)`` sequences to each); None when there are fewer than ``min_sequences`` (validation is then skipped:
    ``--split 1,0,0``). A dataset without sequences is a ValueError."""
    if sequences < 1:
        raise ValueError("the dataset has no sequences")
    if sequences < min_sequences:
        return None
    valid = max(1, round(sequences * valid_share))
    return f"{sequences - valid},{valid},0"


def split_flag(prefix: str, valid_share: float = VALID_SHARE) -> Tuple[str, str]:
    """``(--split value, what it does)`` for the dataset ``PREFIX`` (its ``.idx`` header is read, O(1))."""
    from megatron_anchor.data.indexed import read_index_header

    n = read_index_header(prefix + ".idx").sequence_count
    split = adaptive_split(n, valid_share)
    if split is None:
        return "1,0,0", (f"validation skipped: {prefix} holds {n} sequences (fewer than "
                         f"{MIN_SEQUENCES_FOR_VALIDATION})")
    return split, f"validation on {split.split(',')[1]} of {n} sequences of {prefix}"


@dataclass(frozen=True)
class Knob:
    """One setting ``examples/quickstart.sh`` reads from the environment (the script's header documents each)."""

    name: str
    """The environment variable."""
    parse: Callable[[str], object]
    """Checks a value: returns it parsed, raises ValueError saying what is wrong."""
    small: str
    """A small valid value: the knob test runs the script's dry run with every knob at it."""


def number(kind, low: float, high: Optional[float] = None, low_open: bool = False, high_open: bool = True):
    """A knob parser for a ``kind`` (int or float) number in ``[low, high)`` (``low_open``/``high_open`` say which
    ends are excluded; ``high`` None: no upper end); a bad value is a ValueError saying what is wrong."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if value < low or (low_open and value == low):
            raise ValueError(f"must be {'above' if low_open else 'at least'} {low:g}, got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise ValueError(f"must be {'below' if high_open else 'at most'} {high:g}, got {text}")
        return value
    return parse


def _one_of(*choices: str):
    def parse(text: str):
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text
    return parse


def _temperatures(text: str):
    values = [number(float, 0.0, low_open=True)(x) for x in text.split()]
    if not values:
        raise ValueError("needs at least one temperature")
    return values


KNOBS = (
    Knob("DOCS", number(int, 1), "60"),
    Knob("PRE_ITERS", number(int, 1), "3"),
    Knob("SFT_SAMPLES", number(int, 1), "4"),
    Knob("SFT_ITERS", number(int, 0), "1"),
    Knob("SFT_LR", number(float, 0.0, low_open=True), "1e-6"),
    Knob("SFT_REPLAY", number(float, 0.0, 1.0), "0.05"),
    Knob("SFT_REPLAY_POLICY", _one_of("pretrain", "pretrain-text"), "pretrain-text"),
    Knob("N", number(int, 2), "2"),
    Knob("SEED", number(int, 0), "3"),
    Knob("TEMPS", _temperatures, "0.5"),
    Knob("JUDGE_SAMPLES", number(int, 1), "1"),
    Knob("UPDATE_README", _one_of("0", "1"), "0"),
    Knob("ABILITY", _one_of("0", "1"), "0"),
    Knob("DRY_RUN", _one_of("0", "1"), "1"),
    Knob("JUDGE", _one_of("cpu"), ""),
    Knob("ARCH", _one_of("llama", "gpt2"), "gpt2"),
    Knob("DROPOUT", number(float, 0.0, 1.0), "0.05"),
    Knob("VOCAB", number(int, 400), "400"),
    Knob("PRE_LR", number(float, 0.0, low_open=True), "1e-4"),
)
"""The script's numeric and choice settings, checked before any stage runs (paths and URLs are checked by the
tools that read them: BASE, SFT_INPUT, ANNOTATOR, ANNOTATE_INPUT, JUDGE_URL)."""


def check_knobs(values: Dict[str, str]) -> List[str]:
    """``NAME=reason`` for every knob in ``values`` whose value :data:`KNOBS` refuses (empty when all are valid);
    an unknown name is refused too. Empty values mean unset."""
    by_name = {k.name: k for k in KNOBS}
    errors = []
    for name, value in values.items():
        if name not in by_name:
            errors.append(f"{name}: not a setting of the quickstart (known: {', '.join(by_name)})")
        elif value != "":
            try:
                by_name[name].parse(value)
            except ValueError as exc:
                errors.append(f"{name}={value}: {exc}")
    return errors
