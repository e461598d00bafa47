"""The tag schema: which keys the LLM annotator is asked for, and how its output is read back.

The default lives in ``default_schema.yaml`` beside this module; ``--schema FILE`` replaces it with another file
of the same shape. The schema's fingerprint is part of the cache key, so editing it never reuses stale tags.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from megatron_anchor.annotation.format import MAX_KEY_CHARS, MAX_VALUE_CHARS, normalize_key, tag_problem

DEFAULT_SCHEMA_PATH = Path(__file__).with_name("default_schema.yaml")


class SchemaError(ValueError):
    """A schema file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TagKey:
    """One key the annotator may write."""

    name: str
    """Lower-case identifier written before the colon."""
    description: str = ""
    """Shown to the model in the prompt."""
    aliases: Tuple[str, ...] = ()
    """Other spellings the parser maps to ``name`` (already normalised)."""
    multi: bool = False
    """Whether the key may appear more than once in one chunk's tags."""


@dataclass(frozen=True)
class TagSchema:
    """The keys to ask for plus the parser's limits."""

    keys: Tuple[TagKey, ...]
    """Keys in prompt order."""
    keep_unknown: bool = False
    """Keep well-formed keys that the schema does not list (otherwise they are dropped)."""
    max_tags: int = 12
    """Cap on tags per chunk; a model that rambles cannot produce thousands."""
    max_value_chars: int = 64
    """Values longer than this are cut (never above ``format.MAX_VALUE_CHARS``)."""
    version: Union[int, str] = 1
    _lookup: Dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        lookup: Dict[str, str] = {}
        for k in self.keys:
            lookup[k.name] = k.name
            for a in k.aliases:
                lookup.setdefault(a, k.name)
        object.__setattr__(self, "_lookup", lookup)

    def canonical(self, raw_key: str) -> Optional[str]:
        """The schema key for a key as the model wrote it, or None when it is unknown (or not a valid key)."""
        key = normalize_key(raw_key)
        hit = self._lookup.get(key)
        if hit is None and key.endswith("s"):
            hit = self._lookup.get(key[:-1])  # "topics" -> "topic"
        if hit is not None:
            return hit
        if self.keep_unknown and tag_problem(key, "x") is None:
            return key
        return None

    def is_multi(self, key: str) -> bool:
        """Whether ``key`` may repeat; unknown kept keys may not."""
        return any(k.name == key and k.multi for k in self.keys)

    def fingerprint(self) -> str:
        """A short stable hash of everything that changes what the annotator is asked or what is kept."""
        blob = json.dumps(
            {
                "keys": [[k.name, k.description, list(k.aliases), k.multi] for k in self.keys],
                "keep_unknown": self.keep_unknown,
                "max_tags": self.max_tags,
                "max_value_chars": self.max_value_chars,
                "version": self.version,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def schema_from_dict(raw: Any, where: str = "<schema>") -> TagSchema:
    """Build a :class:`TagSchema` from decoded YAML/JSON; raises :class:`SchemaError` naming ``where``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), dict) or not raw["keys"]:
        raise SchemaError(f"{where}: a schema needs a non-empty mapping 'keys: {{name: {{description: ...}}}}'")
    keys: List[TagKey] = []
    for name, spec in raw["keys"].items():
        spec = spec or {}
        if not isinstance(name, str) or tag_problem(name, "x") is not None or len(name) > MAX_KEY_CHARS:
            raise SchemaError(f"{where}: key {name!r} is not a lower-case identifier ([a-z][a-z0-9_]*)")
        if not isinstance(spec, dict):
            raise SchemaError(f"{where}: key {name!r} must map to a mapping, got {type(spec).__name__}")
        unknown = set(spec) - {"description", "aliases", "multi"}
        if unknown:
            raise SchemaError(f"{where}: key {name!r} has unknown fields {sorted(unknown)}")
        aliases = spec.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise SchemaError(f"{where}: aliases of {name!r} must be a list of strings")
        keys.append(
            TagKey(
                name,
                str(spec.get("description", "")).strip(),
                tuple(normalize_key(a) for a in aliases),
                bool(spec.get("multi", False)),
            )
        )
    max_value_chars = int(raw.get("max_value_chars", 64))
    if not 1 <= max_value_chars <= MAX_VALUE_CHARS:
        raise SchemaError(f"{where}: max_value_chars must be in 1..{MAX_VALUE_CHARS}, got {max_value_chars}")
    max_tags = int(raw.get("max_tags", 12))
    if max_tags < 1:
        raise SchemaError(f"{where}: max_tags must be positive, got {max_tags}")
    return TagSchema(
        keys=tuple(keys),
        keep_unknown=bool(raw.get("keep_unknown", False)),
        max_tags=max_tags,
        max_value_chars=max_value_chars,
        version=raw.get("version", 1),
    )


def load_schema(path: Optional[Union[str, Path]] = None) -> TagSchema:
    """Load a schema file (YAML or JSON); None loads the packaged default."""
    p = Path(path) if path is not None else DEFAULT_SCHEMA_PATH
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise SchemaError(f"{p}: cannot read schema: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SchemaError(f"{p}: not valid YAML: {e}") from None
    return schema_from_dict(raw, str(p))
