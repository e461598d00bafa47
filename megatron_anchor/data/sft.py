"""SFT samples as role-tagged segments: chat templates, format-stability selection, and the engine converter.

An SFT sample is written as ``prompt <annotation> response EOD``; with a chat template and several turns,
every assistant turn is preceded by its own annotation::

    [system] [user] [assistant header] <|ann|>k:v; k:v<|/ann|> response [end of turn] ... EOD

Roles (the fixed on-disk codes of :mod:`megatron_anchor.roles`):

- PROMPT: system and user turns with their template text, and each assistant turn's header;
- ANNOTATION_KEY: annotation delimiters, keys and separators; ANNOTATION_VALUE: tag values;
- RESPONSE: the assistant's text and the template's end-of-turn text after it (the model must learn to stop);
- EOD: the end-of-document token closing the sample.

Under ``--loss-mask-policy sft-anchored`` only RESPONSE and EOD carry loss, so the annotation distribution
keeps its pretraining shape. In a small, deterministic share of samples (*format-stability* samples, 0.3% by
default) the annotation's delimiters, keys and separators are written with role RESPONSE so they keep their
loss while the values stay ANNOTATION_VALUE: the model keeps producing well-formed annotations but its value
distribution is untouched. The role codes are a fixed contract (no new code for "a key that keeps loss"),
so the choice is recorded only through which role those tokens carry.

Input JSONL, one sample per line (``annotation`` fields are optional; missing ones are filled by an annotator)::

    {"prompt": "...", "response": "...", "system": "...", "annotation": [["topic", "x"], ...]}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "annotation": [[k, v], ...]}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from megatron_anchor.annotation.default_annotator import ANNOTATOR_NAME, annotate_text
from megatron_anchor.annotation.format import Segment, Tag, annotation_segments
from megatron_anchor.annotation.schema import DocumentError, parse_tags
from megatron_anchor.data.convert import DocumentConverter, DocumentDropped, PartStats, PreprocessConfig
from megatron_anchor.tokenizer.pieces import EncodedPart, PieceBatch
from megatron_anchor.roles import ROLE_DTYPE, Role

DEFAULT_FORMAT_STABILITY_FRACTION = 0.003
"""Share of samples whose annotation keys and delimiters keep their loss (the paper's 0.3%)."""
SPEAKERS = ("system", "user", "assistant")
OVERLONG_MODES = ("drop", "truncate")


# ---------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """Text around each turn. Template text is ordinary text (it never yields a special token id).

    A turn is written ``<speaker>_prefix + content + <speaker>_suffix``. The assistant prefix (the turn's
    header) is prompt; the annotation comes right after it; the assistant suffix is the end-of-turn text and
    belongs to the response, so the model learns where a turn ends.
    """

    name: str = "custom"
    """Name recorded in the run's fingerprint and summary."""
    system_prefix: str = ""
    """Text before a system message."""
    system_suffix: str = "\n\n"
    """Text after a system message."""
    user_prefix: str = ""
    """Text before a user message."""
    user_suffix: str = "\n\n"
    """Text after a user message (a single-turn sample's prompt is a user message)."""
    assistant_prefix: str = ""
    """Header of an assistant turn (role PROMPT), before its annotation."""
    assistant_suffix: str = "\n\n"
    """End-of-turn text after an assistant message (role RESPONSE)."""


TEMPLATE_PRESETS: Dict[str, ChatTemplate] = {
    # Turns separated by blank lines: the shape of pretraining chunks, so nothing is new to the model.
    "plain": ChatTemplate(name="plain"),
    "simple": ChatTemplate(
        name="simple", system_prefix="System: ", system_suffix="\n", user_prefix="User: ", user_suffix="\n",
        assistant_prefix="Assistant: ", assistant_suffix="\n",
    ),
    "chatml": ChatTemplate(
        name="chatml", system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n",
    ),
}
"""Named templates for ``--chat-template``."""


def load_template(spec: str) -> ChatTemplate:
    """A preset by name, or a JSON/YAML file of :class:`ChatTemplate` fields (``base: PRESET`` to extend one).

    Raises ``ValueError`` naming the unknown preset, the unreadable file or the unknown field.
    """
    if spec in TEMPLATE_PRESETS:
        return TEMPLATE_PRESETS[spec]
    if not os.path.isfile(spec):
        raise ValueError(f"--chat-template {spec!r} is neither a preset ({', '.join(TEMPLATE_PRESETS)}) nor a file")
    import yaml

    try:
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        raw = json.loads(text) if spec.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"--chat-template {spec}: unreadable ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{spec}: a chat template file must hold a mapping of template fields")
    raw = dict(raw)
    base_name = raw.pop("base", None)
    if base_name is not None and base_name not in TEMPLATE_PRESETS:
        raise ValueError(f"{spec}: unknown base template {base_name!r}; choose one of {', '.join(TEMPLATE_PRESETS)}")
    known = {f.name for f in fields(ChatTemplate)}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise ValueError(f"{spec}: unknown template fields {unknown}; known: {sorted(known)}")
    bad = [k for k, v in raw.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{spec}: template fields must be strings: {bad}")
    raw.setdefault("name", os.path.splitext(os.path.basename(spec))[0])
    return replace(TEMPLATE_PRESETS[base_name] if base_name else ChatTemplate(), **raw)


# ---------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    """One message. ``tags`` (assistant turns only): its annotation, None when not annotated yet."""

    speaker: str
    content: str
    tags: Optional[List[Tag]] = None


@dataclass
class SFTSample:
    """A parsed sample: its turns in order, and the raw JSON object (kept to write annotated copies)."""

    turns: List[Turn]
    raw: Dict[str, Any]

    @property
    def assistant_turns(self) -> List[Turn]:
        return [t for t in self.turns if t.speaker == "assistant"]

    def content_key(self) -> bytes:
        """Canonical bytes of the conversation (speakers and texts; no annotations, ids or key order).

        The format-stability choice hashes this, so it is the same for a raw sample and its annotated copy.
        """
        return json.dumps([[t.speaker, t.content] for t in self.turns], ensure_ascii=False).encode("utf-8")


def _parse_tags(raw: Any, where: str) -> List[Tag]:
    return parse_tags(raw, lambda: where, field="annotation", item="annotation tag")


def _text(obj: Dict[str, Any], key: str, where: str, what: str) -> str:
    if key not in obj or obj[key] is None:
        raise DocumentError(where, f"missing {what} ('{key}')")
    value = obj[key]
    if not isinstance(value, str):
        raise DocumentError(where, f"{what} ('{key}') must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DocumentError(where, f"empty {what} ('{key}')")
    return value


def parse_sample(obj: Any, where: str) -> SFTSample:
    """Validate one decoded JSON line; every problem is a :class:`DocumentError` naming ``where``.

    Rejected: not an object; neither ``messages`` nor ``prompt``/``response``; a missing or empty response,
    prompt or turn; an unknown speaker; no assistant turn; a conversation that does not end with the assistant
    (there would be no target after the last prompt); malformed annotations.
    """
    if not isinstance(obj, dict):
        raise DocumentError(where, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DocumentError(where, "'messages' must be a non-empty list of {'role', 'content'} objects")
        turns = []
        for i, m in enumerate(msgs):
            mw = f"{where} message {i}"
            if not isinstance(m, dict):
                raise DocumentError(mw, f"a message must be an object, got {type(m).__name__}")
            speaker = m.get("role")
            if speaker not in SPEAKERS:
                raise DocumentError(mw, f"unknown role {speaker!r}; expected one of {', '.join(SPEAKERS)}")
            content = _text(m, "content", mw, f"{speaker} turn content")
            tags = None
            if m.get("annotation") is not None:
                if speaker != "assistant":
                    raise DocumentError(mw, "only assistant turns carry an 'annotation'")
                tags = _parse_tags(m["annotation"], mw)
            turns.append(Turn(speaker, content, tags))
        if not any(t.speaker == "assistant" for t in turns):
            raise DocumentError(where, "no assistant turn: nothing to train on")
        if turns[-1].speaker != "assistant":
            raise DocumentError(where, f"the last message is from the {turns[-1].speaker}; it must be the assistant's")
        return SFTSample(turns, obj)
    if "prompt" in obj or "response" in obj:
        turns = []
        if obj.get("system") is not None:
            turns.append(Turn("system", _text(obj, "system", where, "system text")))
        turns.append(Turn("user", _text(obj, "prompt", where, "prompt")))
        tags = _parse_tags(obj["annotation"], where) if obj.get("annotation") is not None else None
        turns.append(Turn("assistant", _text(obj, "response", where, "response"), tags))
        return SFTSample(turns, obj)
    raise DocumentError(where, f"an SFT sample needs 'messages' or 'prompt' and 'response'; keys: {sorted(obj)[:8]}")


def parse_sample_line(line: bytes, where: str) -> SFTSample:
    """Decode (strict UTF-8) and parse one JSONL line."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DocumentError(where, f"invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DocumentError(where, f"malformed JSON: {e.msg} at column {e.colno}") from None
    return parse_sample(obj, where)


def with_annotations(sample: SFTSample, tags_per_turn: List[List[Tag]]) -> Dict[str, Any]:
    """The sample's JSON object with an ``annotation`` on each assistant turn (in order)."""
    out = json.loads(json.dumps(sample.raw))
    if "messages" in out:
        it = iter(tags_per_turn)
        for m in out["messages"]:
            if m.get("role") == "assistant":
                m["annotation"] = [list(t) for t in next(it)]
    else:
        out["annotation"] = [list(t) for t in tags_per_turn[0]]
    return out


# ---------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------


def is_format_stable(sample: SFTSample, fraction: float, seed: int = 0) -> bool:
    """Whether ``sample`` is a format-stability sample: a stable hash of its content and ``seed`` below ``fraction``.

    Identical between runs, machines, worker counts and input order; about ``fraction`` of distinct samples.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(b"format-stability\0%d\0" % seed + sample.content_key()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _annotation(tags: List[Tag], format_stable: bool) -> List[Segment]:
    segs = annotation_segments(tags)
    if not format_stable:
        return segs
    # Delimiters, keys and separators keep their loss (role RESPONSE); values stay ANNOTATION_VALUE.
    return [Segment(s.text, Role.RESPONSE, s.special) if int(s.role) == int(Role.ANNOTATION_KEY) else s
            for s in segs]


def sample_segments(sample: SFTSample, template: ChatTemplate, annotations: bool = True,
                    format_stable: bool = False, eod: Optional[Segment] = None) -> List[Segment]:
    """The sample as segments (adjacent ordinary text of one role merged, so it is tokenized in one piece).

    ``annotations=False`` writes the standard-SFT form (no annotation); assistant turns without tags then
    get no annotation either. Every annotated assistant turn must have ``tags`` set (see :func:`annotate_sample`).
    """
    segs: List[Segment] = []

    def text(t: str, role: Role) -> None:
        if not t:
            return
        if segs and not segs[-1].special and int(segs[-1].role) == int(role):
            segs[-1] = Segment(segs[-1].text + t, segs[-1].role)
        else:
            segs.append(Segment(t, role))

    for turn in sample.turns:
        if turn.speaker == "assistant":
            text(template.assistant_prefix, Role.PROMPT)
            if annotations and turn.tags:
                segs.extend(_annotation(turn.tags, format_stable))
            text(turn.content + template.assistant_suffix, Role.RESPONSE)
        else:
            prefix = template.system_prefix if turn.speaker == "system" else template.user_prefix
            suffix = template.system_suffix if turn.speaker == "system" else template.user_suffix
            text(prefix + turn.content + suffix, Role.PROMPT)
    if eod is not None:
        segs.append(eod)
    return segs


def annotate_sample(sample: SFTSample) -> int:
    """Tag every assistant turn that has no annotation with the embedded annotator; returns how many."""
    n = 0
    for turn in sample.assistant_turns:
        if turn.tags is None:
            turn.tags = annotate_text(turn.content)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# The converter for the preprocessing engine
# ---------------------------------------------------------------------------------------------------------


class SFTConverter(DocumentConverter):
    """Reads SFT JSONL lines for the preprocessing engine (:func:`megatron_anchor.data.preprocess.run`).

    Over-long samples are dropped (:class:`DocumentDropped`, counted by the engine) or truncated; truncated and
    format-stability samples are counted in the part statistics (``stats.extra``), so totals stay exact when a
    run resumes. Bad input is the engine's business: an error naming the line, or skipped and counted.
    """

    name = "sft"
    drop_reason = "longer than --seq-length, or no response token left within it"

    def __init__(self, template: ChatTemplate, annotations: bool = True, annotator: str = "default",
                 format_stability_fraction: float = DEFAULT_FORMAT_STABILITY_FRACTION,
                 format_stability_seed: int = 0, seq_length: int = 0, overlong: str = "drop",
                 pack: bool = False, pad_id: Optional[int] = None):
        if overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
        if not 0.0 <= format_stability_fraction <= 1.0:
            raise ValueError(f"format-stability fraction must be in [0, 1], got {format_stability_fraction}")
        if annotator not in ("default", "none"):
            raise ValueError(f"the converter annotates with 'default' or 'none', got {annotator!r}")
        self.template = template
        self.annotations = annotations
        self.annotator = annotator
        self.fraction = format_stability_fraction
        self.seed = format_stability_seed
        self.seq_length = seq_length
        self.overlong = overlong
        if pack and (not seq_length or pad_id is None):
            raise ValueError("packing needs the sequence length and a padding id")
        self.pack = pack
        self.pad_id = pad_id

    def fingerprint(self) -> Dict[str, object]:
        return {
            "template": asdict(self.template), "annotations": self.annotations, "annotator": self.annotator,
            "default_annotator": ANNOTATOR_NAME, "format_stability_fraction": self.fraction,
            "format_stability_seed": self.seed, "seq_length": self.seq_length, "overlong": self.overlong,
            "pack": self.pack, "pad_id": self.pad_id,
        }

    def dataset_facts(self) -> Dict[str, object]:
        # Packed samples share a sequence: the trainer then insists on --reset-attention-mask.
        return {"kind": self.name, "packed": self.pack, "seq_length": self.seq_length or None}

    def finish_part(self, part: EncodedPart, cfg: PreprocessConfig, stats: PartStats) -> EncodedPart:
        """With ``pack``: pack whole samples into sequences of exactly ``seq_length`` tokens (first fit, in order).

        megatron-core's GPTDataset cuts its stream into ``seq_length`` pieces; when every document is one full
        sequence, every training sample starts at a pack boundary, so no sample is ever split across two
        training sequences (a split would leave a response without its prompt). Packs are padded with the pad
        id and role PAD (no loss); with ``--reset-attention-mask`` the EOD between samples keeps attention inside
        each sample.
        """
        if not self.pack:
            return part
        encoded = part.documents()
        n = self.seq_length
        bins: List[List[Tuple[np.ndarray, np.ndarray]]] = []
        room: List[int] = []
        for ids, roles in encoded:
            k = next((i for i, r in enumerate(room) if r >= len(ids)), None)
            if k is None:
                bins.append([])
                room.append(n)
                k = len(bins) - 1
            bins[k].append((ids, roles))
            room[k] -= len(ids)
        packs = []
        for items, free in zip(bins, room):
            ids = np.concatenate([i for i, _ in items] + [np.full(free, self.pad_id, dtype=items[0][0].dtype)])
            roles = np.concatenate([r for _, r in items] + [np.full(free, int(Role.PAD), dtype=ROLE_DTYPE)])
            packs.append((ids, roles))
        stats.count("pack_padding_tokens", sum(room))
        return EncodedPart.from_documents(packs, part.ids.dtype.type)

    def segments(self, line: bytes, where: str, cfg: PreprocessConfig, tok, stats: PartStats):
        """``(segments, number of assistant turns)`` for one SFT line."""
        sample = parse_sample_line(line, where)
        if self.annotations and any(t.tags is None for t in sample.assistant_turns):
            if self.annotator == "none":
                raise DocumentError(where, "an assistant turn has no 'annotation' and --annotator none; "
                                    "annotate first, use --annotator default, or pass --no-annotations")
            stats.annotated_here += annotate_sample(sample)
        stable = self.annotations and is_format_stable(sample, self.fraction, self.seed)
        segs = sample_segments(sample, self.template, self.annotations, stable, tok.eod_segment())
        return segs, len(sample.assistant_turns)

    def add_document(self, line: bytes, where: str, cfg: PreprocessConfig, tok, batch: PieceBatch,
                     stats: PartStats) -> int:
        """The sample's pieces; whether it is a format-stability sample travels with it as the document's meta."""
        segs, n = self.segments(line, where, cfg, tok, stats)
        tok.pieces.add_segments(batch, segs)
        # A format-stability sample is the one whose delimiter tokens carry role RESPONSE.
        batch.end_document(any(s.special and int(s.role) == int(Role.RESPONSE) for s in segs))
        return n

    def check_part(self, part: EncodedPart, wheres: List[str], cfg: PreprocessConfig, stats: PartStats,
                   reject) -> EncodedPart:
        """Drop or truncate samples over ``seq_length`` tokens (counted)."""
        kept: List[Tuple[np.ndarray, np.ndarray]] = []
        changed = False
        for i, ((ids, roles), stable) in enumerate(zip(part.documents(), part.meta)):
            try:
                doc = self._fit(ids, roles, wheres[i], stats)
            except DocumentError as e:
                reject(i, e)
                changed = True
                continue
            changed |= doc[0] is not ids
            stats.count("samples")
            if stable:
                stats.count("format_stable")
            kept.append(doc)
        if not changed:
            return part
        return EncodedPart.from_documents(kept, part.ids.dtype.type)

    def _fit(self, ids: np.ndarray, roles: np.ndarray, where: str, stats: PartStats) -> Tuple[np.ndarray, np.ndarray]:
        n = self.seq_length
        if not n or len(ids) <= n:
            return ids, roles
        if self.overlong == "drop":
            raise DocumentDropped(
                where, f"{len(ids)} tokens, more than --seq-length {n} (dropped by --overlong drop)"
            )
        # Keep n - 1 tokens and close with the EOD id so document masking still separates this sample from
        # the next; that EOD gets role PAD, because the response did not really end there.
        keep_roles = roles[: n - 1]
        if not np.isin(keep_roles, (int(Role.RESPONSE),)).any():
            raise DocumentDropped(where, f"no response token within --seq-length {n} (dropped)")
        stats.count("truncated")
        eod_id = ids[-1] if int(roles[-1]) == int(Role.EOD) else None
        if eod_id is None:  # pragma: no cover - SFT samples always end with EOD
            return ids[:n], roles[:n]
        new_ids = np.concatenate([ids[: n - 1], np.array([eod_id], dtype=ids.dtype)])
        new_roles = np.concatenate([keep_roles, np.array([int(Role.PAD)], dtype=ROLE_DTYPE)])
        return new_ids, new_roles
