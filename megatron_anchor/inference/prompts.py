"""Prompt files and prompt formatting.

A prompts file is JSONL, one prompt per line::

    {"id": "p1", "prompt": "Tell me a story.", "system": "optional", "annotation": [["topic", "sea"]], "n": 4}
    {"id": "p2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "A poem?"}]}

``annotation`` (optional) is used by conditioned generation. Prompts are formatted exactly as SFT samples are
(:func:`megatron_anchor.data.sft.sample_segments` with the same chat template), ending with the assistant header,
so generation sees the same token sequence up to the annotation as training did.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_anchor.annotation.format import Segment, Tag, annotation_segments, tag_problem
from megatron_anchor.data.sft import SPEAKERS, ChatTemplate, SFTSample, Turn, sample_segments
from megatron_anchor.roles import Role


class PromptFileError(ValueError):
    """A prompts file that cannot be read; the message names the file and line."""


@dataclass
class Prompt:
    """One prompt: its turns (ending with a user or system turn) and optional settings."""

    id: str
    turns: List[Turn]
    annotation: Optional[List[Tag]] = None
    n: Optional[int] = None
    raw: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user message (what metrics and reports show as the prompt)."""
        return self.turns[-1].content


def _tags(raw, where: str) -> List[Tag]:
    if isinstance(raw, dict):
        raw = list(raw.items())
    if not isinstance(raw, list) or not raw:
        raise PromptFileError(f"{where}: 'annotation' must be a non-empty list of [key, value] pairs")
    tags = []
    for t in raw:
        if not (isinstance(t, (list, tuple)) and len(t) == 2):
            raise PromptFileError(f"{where}: each annotation tag must be a [key, value] pair, got {t!r:.80}")
        problem = tag_problem(t[0], t[1])
        if problem:
            raise PromptFileError(f"{where}: {problem}")
        tags.append((t[0], t[1]))
    return tags


def _string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{where}: '{key}' must be a non-empty string, got {value!r:.60}")
    return value


def parse_prompt(obj, where: str, index: int) -> Prompt:
    """Validate one decoded line."""
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in SPEAKERS:
                raise PromptFileError(f"{where}: message {i} needs a 'role' in {SPEAKERS} and a 'content'")
            turns.append(Turn(m["role"], _string(m, "content", f"{where} message {i}")))
        if turns[-1].speaker == "assistant":
            raise PromptFileError(f"{where}: the last message is the assistant's; a prompt ends with a user turn")
    elif "prompt" in obj:
        turns = [Turn("system", _string(obj, "system", where))] if obj.get("system") is not None else []
        turns.append(Turn("user", _string(obj, "prompt", where)))
    else:
        raise PromptFileError(f"{where}: a prompt needs 'prompt' or 'messages'; keys: {sorted(obj)[:8]}")
    n = obj.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise PromptFileError(f"{where}: 'n' must be a positive integer, got {n!r}")
    ann = _tags(obj["annotation"], where) if obj.get("annotation") is not None else None
    pid = obj.get("id", index)
    return Prompt(id=str(pid), turns=turns, annotation=ann, n=n, raw=obj)


def read_prompts(path: str) -> List[Prompt]:
    """All prompts of a JSONL file; raises :class:`PromptFileError` with ``file:line`` on the first bad line."""
    if not os.path.isfile(path):
        raise PromptFileError(f"prompts file {path!r} " + ("is a folder" if os.path.isdir(path) else "not found"))
    prompts: List[Prompt] = []
    seen = set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{where}: invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
            p = parse_prompt(obj, where, len(prompts))
            if p.id in seen:
                raise PromptFileError(f"{where}: duplicate prompt id {p.id!r}")
            seen.add(p.id)
            prompts.append(p)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (the file is empty)")
    return prompts


def prompt_segments(prompt: Prompt, template: ChatTemplate, annotation: Optional[List[Tag]] = None) -> List[Segment]:
    """The prompt's segments as SFT formats them, up to the assistant header (and the annotation, if given)."""
    segs = sample_segments(SFTSample(prompt.turns, {}), template, annotations=False)
    if template.assistant_prefix:
        if segs and not segs[-1].special and int(segs[-1].role) == int(Role.PROMPT):
            # Merged as SFT merges adjacent prompt text, so tokenization matches training exactly.
            segs[-1] = Segment(segs[-1].text + template.assistant_prefix, Role.PROMPT)
        else:
            segs.append(Segment(template.assistant_prefix, Role.PROMPT))
    if annotation:
        segs.extend(annotation_segments(annotation))
    return segs
