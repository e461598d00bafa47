"""Few-shot examples for the annotator prompt, and the rule that catches answers copying them.

Small annotator models copy their examples: with one fixed example about the Suez Canal, a 135M model tagged
Milton and Shakespeare with ``topic: Suez Canal construction``. Three defences:

- the examples come from subjects that a pretraining corpus rarely holds (beekeeping, a harbour notice, a chess
  club report), with invented names, so a verbatim copy is almost never a correct tag;
- they rotate: each request gets one of :data:`EXAMPLE_SETS`, picked from the hash of what it annotates, so a
  rerun picks the same set (the cache stays valid) and the server's prefix cache holds only a few prefixes;
- :func:`find_echoes` flags tags whose value repeats an example value verbatim; the client counts them and, by
  the user's rule (:data:`ECHO_POLICIES`), keeps them, drops them, or asks again with another example set.

Changing any example changes what the model is asked: bump ``prompt.PROMPT_VERSION``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import FrozenSet, List, Sequence, Tuple

from megatron_anchor.annotation.format import Tag

ECHO_POLICIES = ("reask", "drop", "keep")
"""What happens to a tag that repeats an example: ``reask`` the chunk once with another example set (what still
echoes is dropped), ``drop`` the tag, ``keep`` it (counted either way)."""

DEFAULT_ECHO_POLICY = "reask"


@dataclass(frozen=True)
class ExampleSet:
    """One example document: its chunks and, for each chunk, the tags an ideal annotator would write."""

    chunks: Tuple[Tuple[str, Tuple[Tag, ...]], ...]

    def texts(self) -> List[str]:
        """The chunks' texts."""
        return [text for text, _ in self.chunks]


EXAMPLE_SETS: Tuple[ExampleSet, ...] = (
    ExampleSet((
        ("Light the smoker with dry pine needles and let it burn down to a cool, white smoke before you open the "
         "hive. Two puffs at the entrance are enough.",
         (("topic", "hive smoker preparation"), ("domain", "beekeeping"), ("action", "gives step-by-step advice"),
          ("genre", "how-to guide"), ("tone", "practical"), ("audience", "hobby beekeepers"))),
        ("Lift each frame by its lugs and look for eggs, larvae and capped brood. A laying queen leaves one egg "
         "per cell; several eggs in a cell point to laying workers.",
         (("topic", "brood frame inspection"), ("domain", "beekeeping"), ("action", "explains what to look for"),
          ("genre", "how-to guide"), ("tone", "practical"), ("audience", "hobby beekeepers"))),
        ("Note the date, the weather and the temper of the colony in the hive log. Marta Ilves keeps hers on a card "
         "pinned inside the roof.",
         (("topic", "keeping hive records"), ("domain", "beekeeping"), ("action", "recommends a habit"),
          ("entities", "Marta Ilves"), ("genre", "how-to guide"), ("tone", "friendly"))),
    )),
    ExampleSet((
        ("NOTICE TO BOAT OWNERS. From 3 March the inner basin of Kestrel Bay harbour is closed for dredging. "
         "Moorings on the east pontoon remain open.",
         (("topic", "harbour basin closure"), ("domain", "maritime administration"),
          ("action", "announces a closure"), ("entities", "Kestrel Bay harbour"), ("location", "Kestrel Bay"),
          ("genre", "public notice"), ("tone", "formal"), ("audience", "boat owners"))),
        ("High water on spring tides reaches 5.2 metres; do not leave vessels on the slipway overnight. The harbour "
         "master, Owen Treloar, can be reached on channel 12.",
         (("topic", "tide heights and slipway rules"), ("domain", "maritime administration"),
          ("action", "warns about a hazard"), ("entities", "Owen Treloar"), ("location", "Kestrel Bay"),
          ("genre", "public notice"), ("tone", "formal"))),
        ("Dues for the season are payable at the harbour office before 1 April.",
         (("topic", "mooring fees deadline"), ("domain", "maritime administration"), ("action", "states a rule"),
          ("genre", "public notice"), ("tone", "formal"), ("audience", "boat owners"))),
    )),
    ExampleSet((
        ("Round four of the Alderbrook Chess Club winter league was played on Tuesday in the back room of the Fox "
         "and Lantern.",
         (("topic", "chess league round report"), ("domain", "games"), ("action", "reports an event"),
          ("entities", "Alderbrook Chess Club, Fox and Lantern"), ("genre", "club newsletter"),
          ("time_period", "winter season"), ("tone", "chatty"))),
        ("On board one Priya Nandakumar answered 1.e4 with the Caro-Kann and traded into an endgame where her "
         "knight outplayed the white bishop.",
         (("topic", "Caro-Kann endgame win"), ("domain", "games"), ("action", "describes a game move by move"),
          ("entities", "Priya Nandakumar"), ("genre", "club newsletter"), ("tone", "admiring"),
          ("audience", "club members"))),
        ("Next week: a simultaneous display by the club captain. Bring your own clock.",
         (("topic", "upcoming simultaneous display"), ("domain", "games"), ("action", "announces an event"),
          ("genre", "club newsletter"), ("tone", "chatty"), ("audience", "club members"))),
    )),
)

_SPACE_RE = re.compile(r"\s+")


def normalize_value(value: str) -> str:
    """A value as echo detection compares it: lower case, single spaces, no edge punctuation."""
    return _SPACE_RE.sub(" ", value.lower()).strip(" .,;:'\"")


def _distinctive(value: str) -> bool:
    # Single lower-case words ("beekeeping", "formal") recur legitimately across a corpus; phrases and names are
    # what a model copies and what a real text rarely earns verbatim.
    return " " in value.strip() or value[:1].isupper()


def echo_values(example: ExampleSet) -> FrozenSet[str]:
    """The normalised example values that count as echoes when an answer repeats them."""
    return frozenset(normalize_value(v) for _, tags in example.chunks for _, v in tags if _distinctive(v))


def find_echoes(tags: Sequence[Tag], example: ExampleSet, text: str) -> List[int]:
    """Indices of ``tags`` that repeat a distinctive value of ``example`` without the value occurring in ``text``.

    A value the chunk itself contains ("Kestrel Bay" in a text about Kestrel Bay) is a fair tag, not an echo.
    Cost: one set lookup per tag plus a substring search of the chunk for the rare hits.
    """
    values = echo_values(example)
    lowered = None
    hits = []
    for i, (_, value) in enumerate(tags):
        v = normalize_value(value)
        if v in values:
            lowered = lowered if lowered is not None else _SPACE_RE.sub(" ", text.lower())
            if v not in lowered:
                hits.append(i)
    return hits


def pick_example(key: bytes, attempt: int = 0) -> int:
    """The example set for a request: from its content hash (stable across reruns), the next one per re-ask."""
    return (key[0] + attempt) % len(EXAMPLE_SETS) if key else attempt % len(EXAMPLE_SETS)
