"""The optional fast backend: ``gigatoken`` (``pip install 'megatron-anchor[fast]'``), used only where verified.

gigatoken re-implements byte-level BPE and SentencePiece BPE in Rust and encodes a batch into one flat buffer
plus offsets, tens of times faster than the reference libraries. It is a *different implementation*, so it is
never assumed to agree with the reference: :func:`select_backend` encodes a set of probes (every special
token's text, inside text and alone, partial delimiters, whitespace runs, CRLF, digits, non-Latin scripts,
byte-fallback characters) and a sample of the run's own texts with both, and uses gigatoken only when every id
agrees. Otherwise the reference tokenizer stays in use and one line says why (or, with ``--tokenizer-backend
gigatoken``, the run stops).

Special tokens: the reference encodes ordinary text so that it never yields a special id (a document containing
``<|ann|>`` gets ordinary tokens). gigatoken matches added special tokens inside text, so it is loaded from the
model with its special added tokens removed; they are then ordinary byte sequences, as for the reference, and the
probes check exactly that.

Cost: loading takes ~0.1 s (a SentencePiece model's conversion is cached, see :func:`sentencepiece_json`) and
``awkward`` (gigatoken's array type) takes ~0.7 s to import, overlapped with the reference encode of the check;
memory is the model plus one flat uint32 buffer per batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from importlib import metadata
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.outputs import write_text

if TYPE_CHECKING:  # pragma: no cover
    from megatron_anchor.tokenizer.base import AnchorTokenizer

BACKENDS = ("auto", "gigatoken", "reference")
"""``--tokenizer-backend`` values: ``auto`` uses gigatoken when installed and identical for the model."""

INSTALL_HINT = "pip install 'megatron-anchor[fast]'"

# Texts where implementations part ways: specials inside and around text, partial specials, whitespace runs
# (byte-level BPE splits them by look-ahead), CR/LF mixes, digit runs (SentencePiece split_digits), scripts and
# emoji (byte fallback), combining marks, a long word, leading/trailing spaces.
_PROBES = (
    "", " ", "  ", "\n", "\n\n", "\n\n\n", " \n \n", "\r\n\r\n", "\t\tindented\n", "trailing space ",
    " leading", "x\n\ny", "a  b   c    d", "end.\n\n  \nNext", "1234567890 3.14159 1e-9 0x1F", "ａｂｃ１２３",
    "café naïve coöperate", "e\u0301 combining", "Ελληνικά Русский עברית العربية हिन्दी 中文 日本語 한국어",
    "emoji 😀👍🏽 ☃ ♥", "\u200b\u200d zero width", "\x00\x01\x7f control", "tab\tand\x0bvt\x0cff",
    "supercalifragilisticexpialidocious" * 4, "<", "<|", "|>", "<|ann", "ann|>", "<||>", "< |ann| >",
)


class FastBackendError(RuntimeError):
    """``--tokenizer-backend gigatoken`` was asked for but cannot be used for this model."""


def gigatoken_version() -> Optional[str]:
    """The installed gigatoken version, or None when it is not installed."""
    try:
        return metadata.version("gigatoken")
    except metadata.PackageNotFoundError:
        return None


def _without_special_added_tokens(tokenizer_json: str) -> str:
    """tokenizer.json contents whose special added tokens are no longer matched inside text."""
    data = json.loads(tokenizer_json)
    data["added_tokens"] = [t for t in data.get("added_tokens") or [] if not t.get("special")]
    return json.dumps(data)


class GigatokenEncoder:
    """Ordinary text -> ids with gigatoken, one batched call into a flat buffer.

    Encodes on the calling thread (``parallel=False``): the preprocessing workers are the parallelism, and a
    rayon pool inherited through ``fork`` would deadlock.
    """

    name = "gigatoken"

    def __init__(self, tokenizer_json: str):
        import gigatoken

        self._tok = gigatoken.Tokenizer.from_json(_without_special_added_tokens(tokenizer_json))
        self.version = gigatoken_version()

    @classmethod
    def for_tokenizer(cls, tok: "AnchorTokenizer") -> "GigatokenEncoder":
        """Load the gigatoken twin of ``tok`` (a Hugging Face tokenizer.json or a SentencePiece model)."""
        kind = tok.fast_source()
        if kind is None:
            raise FastBackendError(f"{type(tok).__name__} has no gigatoken equivalent")
        fmt, path = kind
        if fmt == "hf":
            with open(path, encoding="utf-8") as f:
                return cls(f.read())
        try:
            return cls(sentencepiece_json(path))
        except Exception:  # noqa: BLE001 - a damaged cache entry: convert again (a real failure raises again)
            return cls(sentencepiece_json(path, refresh=True))

    def encode_flat(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: every text's ids back to back (uint32) and each text's count (int64)."""
        if not texts:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        import awkward as ak

        arr = self._tok.encode_batch(list(texts), parallel=False)
        ids = ak.to_numpy(ak.flatten(arr, axis=1))
        lengths = ak.to_numpy(ak.num(arr, axis=1)).astype(np.int64, copy=False)
        return ids, lengths


def sentencepiece_json(model_path: str, refresh: bool = False) -> str:
    """gigatoken's tokenizer.json for a SentencePiece model, converted once per model and gigatoken version.

    The conversion (gigatoken's own converter, a library internal watched by a tripwire test) takes ~0.2-0.5 s
    in Python, paid by every preprocessing process; its result is kept under the project's cache
    (``gigatoken/<sha256 of the model>-<version>.json``, written under a temporary name and renamed, so ranks
    sharing a cache never read half a file). The cache only saves time: whatever it holds, the identity check
    still compares the loaded tokenizer with sentencepiece. An unreadable or unwritable cache is skipped;
    ``refresh`` converts again and replaces the entry.
    """
    from megatron_anchor.cache_dir import cache_root

    with open(model_path, "rb") as f:
        model = f.read()
    cached = cache_root() / "gigatoken" / f"{hashlib.sha256(model).hexdigest()}-{gigatoken_version()}.json"
    if not refresh:
        with contextlib.suppress(OSError):
            return cached.read_text(encoding="utf-8")
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    text = sentencepiece_to_tokenizer_json(model)
    with contextlib.suppress(OSError):  # a read-only or full cache: convert every time
        write_text(cached, text)
    return text


def _import_awkward() -> None:
    try:
        import awkward  # noqa: F401
    except ImportError:  # pragma: no cover - a gigatoken dependency; encode_flat then says what is missing
        pass


def first_difference(tok: "AnchorTokenizer", fast: GigatokenEncoder, texts: Sequence[str]) -> Optional[str]:
    """Describe the first text whose ids differ between the reference and ``fast`` (None when all agree)."""
    texts = list(texts)
    # awkward's import (~0.7 s, paid once) overlaps the reference encode, which runs without the GIL.
    importer = threading.Thread(target=_import_awkward, daemon=True)
    importer.start()
    try:
        ref = tok.encode_texts_reference(texts)
    finally:
        importer.join()
    ids, lengths = fast.encode_flat(texts)
    ends = np.cumsum(lengths)
    for i, (want, end, n) in enumerate(zip(ref, ends.tolist(), lengths.tolist())):
        got = ids[end - n:end].tolist()
        if got != list(want):
            k = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            return (f"{texts[i][:60]!r}: token {k} is {got[k:k + 3]} instead of {list(want)[k:k + 3]} "
                    f"({len(got)} vs {len(want)} tokens)")
    return None


def probe_texts(tok: "AnchorTokenizer") -> List[str]:
    """The fixed probes plus every special token's text alone, inside words and doubled."""
    out = list(_PROBES)
    for s in sorted(tok.special_texts()):
        out += [s, f"a{s}b", f" {s} ", s + s, s[:-1], s[1:], f"x\n\n{s}\n\ny"]
    return out


def select_backend(tok: "AnchorTokenizer", mode: str, sample: Sequence[str] = ()) -> str:
    """Attach gigatoken to ``tok`` when ``mode`` allows it and it is identical; return a one-line notice.

    ``mode``: ``reference`` (never), ``auto`` (when installed and identical, else the reference with a notice),
    ``gigatoken`` (required: raises :class:`FastBackendError` when missing or different). ``sample`` is a few
    hundred kilobytes of the run's own texts, checked beside the fixed probes.
    """
    if mode not in BACKENDS:
        raise ValueError(f"tokenizer backend must be one of {BACKENDS}, got {mode!r}")
    ref = tok.reference_name
    if mode == "reference":
        return f"tokenizer: {ref} (--tokenizer-backend reference)"
    version = gigatoken_version()
    if version is None:
        why = f"gigatoken is not installed ({INSTALL_HINT})"
    elif tok.fast_source() is None:
        why = f"gigatoken has no loader for {type(tok).__name__}"
    else:
        try:
            fast = GigatokenEncoder.for_tokenizer(tok)
        except Exception as e:  # noqa: BLE001 - any loader failure means: not usable for this model
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = f"gigatoken {version} cannot load {os.path.basename(tok.model_path)}: {first_line}"
        else:
            probes = probe_texts(tok)
            diff = first_difference(tok, fast, probes + list(sample))
            if diff is None:
                tok.attach_fast(fast)
                return (f"tokenizer: gigatoken {version}, identical to {ref} on {len(probes)} probes and "
                        f"{len(sample)} sampled texts")
            why = f"gigatoken {version} differs from {ref} for this model on {diff}"
    if mode == "gigatoken":
        raise FastBackendError(f"--tokenizer-backend gigatoken: {why}")
    return f"tokenizer: {ref} ({why})"
