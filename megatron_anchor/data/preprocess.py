"""The preprocessing engine behind ``tools/preprocess_data.py``: annotated JSONL -> tokens + role channel.

How it runs:
- The input is cut into *parts* of ``docs_per_part`` physical lines. Parts are tokenized by a pool of worker
  processes, with at most ``2 * workers`` parts in flight, so memory does not grow with the corpus. The driver
  only finds where each part starts and ends; workers read their part's bytes themselves (a ``.gz`` input is
  decompressed by the driver and its lines sent along).
- Each finished part is written into ``<output>.parts/`` under temporary names, renamed, and then marked done by
  its stats file. A killed run, started again with the same arguments, skips the done parts and redoes the
  rest; a run with different arguments refuses to mix its parts with the old ones.
- Finished parts are appended, in order and as they finish, to temporary ``<output>_text_document.bin`` and
  ``<output>_text_document_roles.bin`` while later parts are still encoded; when every part is done the indexes
  are written, both datasets renamed into place (roles first) and the parts removed.
The output bytes depend only on the input and the output-affecting options, never on ``workers`` or on where a
run was interrupted.

What an input line means is a converter's job (:mod:`megatron_anchor.data.convert`); how the input is cut into
parts is :mod:`megatron_anchor.data.partition`'s. This module is the driver: workers, resume and the merge.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from multiprocessing import get_context
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from megatron_anchor import bounds
from megatron_anchor.annotation.schema import DocumentError
from megatron_anchor.data.convert import MAX_REASONS, DocumentDropped, PartStats, PreprocessConfig
from megatron_anchor.data.indexed import (
    TokenRoleMerger,
    bin_path,
    idx_path,
    roles_prefix,
    write_token_role_documents,
    write_token_role_part,
)
from megatron_anchor.data.partition import LineRange, PartLines, iter_parts, part_lines
from megatron_anchor.outputs import check_outputs, write_json
from megatron_anchor.roles import ANNOTATION_ROLES, Role
from megatron_anchor.sharding import shard_byte_range
from megatron_anchor.tokenizer import AnchorTokenizer, build_tokenizer
from megatron_anchor.tokenizer.record import dataset_record_path, tokenizer_record, write_record
from megatron_anchor.tokenizer.fast import select_backend
from megatron_anchor.tokenizer.pieces import EncodedPart, PieceBatch

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"



# ------------------------------------------------------------------------------------------------------------
# Work inside one part
# ------------------------------------------------------------------------------------------------------------

_WORKER: Dict[str, object] = {}


def _init_worker(cfg: "PreprocessConfig") -> None:
    if _WORKER.get("cfg") is cfg:  # a forked worker inherits the driver's tokenizer, backend already chosen
        return
    _WORKER["cfg"] = cfg
    _WORKER["tok"] = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, eod_token=cfg.eod_token)


def _skip_or_raise(cfg: "PreprocessConfig", stats: "PartStats", err: DocumentError) -> None:
    if isinstance(err, DocumentDropped):
        stats.dropped += 1
        return
    if not cfg.skip_bad_documents:
        raise err
    stats.skipped += 1
    if len(stats.reasons) < MAX_REASONS:
        stats.reasons.append(str(err))


def _process_part(args: Tuple[int, int, "PartLines"]) -> Tuple[int, "PartStats"]:
    # A part allocates millions of small tuples, lists and dicts, all freed by reference counting (no cycles).
    # The cyclic collector would walk them again and again as they pile up (a third of the CPU time of parsing
    # and segmenting); it stays off while a part is processed, and runs as usual between parts.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _process_part_unguarded(args)
    finally:
        if enabled:
            gc.enable()


def encode_lines(lines: List[Tuple[int, bytes]], cfg: "PreprocessConfig", tok: AnchorTokenizer,
                 stats: "PartStats") -> EncodedPart:
    """Convert, encode and check a part's lines: the work of one part, without writing it."""
    conv = cfg.converter
    batch = PieceBatch()
    wheres: List[str] = []
    for line_no, line in lines:
        where = f"{cfg.input}:{line_no}"
        try:
            n_chunks = conv.add_document(line, where, cfg, tok, batch, stats)
        except DocumentError as e:
            batch.drop_open_document()
            _skip_or_raise(cfg, stats, e)
            continue
        wheres.append(where)
        stats.chunks += n_chunks
        stats.input_bytes += len(line)
    part = tok.pieces.encode(batch)
    part = conv.check_part(part, wheres, cfg, stats, lambda i, e: _skip_or_raise(cfg, stats, e))
    return conv.finish_part(part, cfg, stats)


def _process_part_unguarded(args: Tuple[int, int, "PartLines"]) -> Tuple[int, "PartStats"]:
    part_no, _, src = args
    cfg: PreprocessConfig = _WORKER["cfg"]  # type: ignore[assignment]
    tok: AnchorTokenizer = _WORKER["tok"]  # type: ignore[assignment]
    stats = PartStats()
    part = encode_lines(part_lines(src), cfg, tok, stats)
    stats.documents = len(part)
    stats.tokens = int(len(part.ids))
    if stats.tokens:
        counts = np.bincount(part.roles, minlength=len(Role))
        stats.annotation_tokens = int(sum(counts[r] for r in ANNOTATION_ROLES))
    prefix = part_prefix(cfg, part_no)
    write_token_role_part(prefix, part.ids, part.roles, part.doc_lengths, tok.token_dtype)
    write_json(prefix + ".stats.json", asdict(stats), indent=1)
    return part_no, stats


# ------------------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------------------


def part_prefix(cfg: PreprocessConfig, part: int) -> str:
    return os.path.join(cfg.parts_dir, f"part-{part:06d}")


def _prepare_parts_dir(cfg: PreprocessConfig) -> None:
    fingerprint = cfg.fingerprint()
    manifest = os.path.join(cfg.parts_dir, MANIFEST)
    if os.path.isdir(cfg.parts_dir):
        old = None
        if os.path.isfile(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None  # unreadable: treated as another run's (kept unless --overwrite)
        if old != fingerprint:
            if not cfg.overwrite:
                raise SystemExit(
                    f"{cfg.parts_dir} holds parts of a run with other arguments or input; rerun with the same "
                    "arguments to resume it, or pass --overwrite to start afresh"
                )
            shutil.rmtree(cfg.parts_dir)
    os.makedirs(cfg.parts_dir, exist_ok=True)
    write_json(manifest, fingerprint, indent=1)


def _outputs_exist(prefix: str) -> bool:
    return any(os.path.exists(p) for p in (bin_path(prefix), idx_path(prefix)))


def run(cfg: PreprocessConfig) -> PartStats:
    """Run (or resume) preprocessing; returns the totals. Raises :class:`DocumentError` on bad input."""
    if not os.path.isfile(cfg.input):
        raise SystemExit(f"input {cfg.input!r} " + ("is a folder, not a file" if os.path.isdir(cfg.input)
                                                    else "not found"))
    bounds.check(cfg, SystemExit)
    if not cfg.shard_index < cfg.num_shards:
        raise SystemExit(f"--shard-index must be in [0, --num-shards); got {cfg.shard_index} of {cfg.num_shards}")
    if cfg.num_shards > 1 and cfg.input.endswith(".gz"):
        raise SystemExit("sharding needs a seekable input: decompress the .gz file, or split it into files")
    out = cfg.output_path_prefix
    if cfg.num_shards > 1 and os.path.isfile(cfg.done_marker) and _outputs_exist(out) and not cfg.overwrite:
        with open(cfg.done_marker, encoding="utf-8") as f:
            stats = PartStats(**json.load(f))
        shutil.rmtree(cfg.parts_dir, ignore_errors=True)
        logger.info("%s is complete (%s); skipping this shard", out, cfg.done_marker)
        return stats
    resuming = os.path.isdir(cfg.parts_dir)
    # A shard's outputs without its marker are a run killed while publishing: redo them, never trust them.
    half_written_shard = cfg.num_shards > 1 and not os.path.isfile(cfg.done_marker)
    if _outputs_exist(out) and not resuming and not cfg.overwrite and not half_written_shard:
        raise SystemExit(f"{out}.bin/.idx already exist; pass --overwrite to replace them")
    try:
        check_outputs([("--output-prefix", p) for p in (bin_path(out), idx_path(out), bin_path(roles_prefix(out)),
                                                         idx_path(roles_prefix(out)), dataset_record_path(out))],
                      [("--input", cfg.input), ("--tokenizer-model", cfg.tokenizer_model)])
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if os.path.exists(cfg.done_marker):  # a stale marker goes before the shard is redone
        os.remove(cfg.done_marker)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _prepare_parts_dir(cfg)
    _init_worker(cfg)  # checks the tokenizer loads before any worker starts
    notice = select_backend(_WORKER["tok"], cfg.tokenizer_backend, _sample_texts(cfg))
    logger.info("%s", notice)

    total = PartStats()
    done_parts: List[int] = []
    start = time.time()
    size = None
    if not cfg.input.endswith(".gz"):
        lo, hi = shard_byte_range(os.path.getsize(cfg.input), cfg.num_shards, cfg.shard_index)
        size = hi - lo
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="preprocess", disable=not cfg.show_progress)
    pending: Dict[int, Tuple[int, object]] = {}
    last_bytes = 0
    # Finished parts are appended to the output as they come, in order, while later ones are still encoded.
    merger = TokenRoleMerger(out)

    def finish(part: int, nbytes: int, stats: PartStats) -> None:
        nonlocal last_bytes
        total.add(stats)
        done_parts.append(part)
        merger.add(part_prefix(cfg, part))
        bar.update(nbytes - last_bytes)
        last_bytes = nbytes
        bar.set_postfix(docs=total.documents, tokens=total.tokens, refresh=False)

    def load_done(part: int) -> Optional[PartStats]:
        path = part_prefix(cfg, part) + ".stats.json"
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return PartStats(**json.load(f))

    pool = get_context("fork").Pool(cfg.workers, _init_worker, (cfg,)) if cfg.workers > 1 else None
    try:
        next_to_finish = 0
        for item in iter_parts(cfg):
            part, nbytes, _ = item
            cached = load_done(part)
            if cached is not None:
                pending[part] = (nbytes, cached)
            elif pool is None:
                pending[part] = (nbytes, _process_part(item)[1])
            else:
                pending[part] = (nbytes, pool.apply_async(_process_part, (item,)))
            # Finish parts in order; block when too many are in flight so memory stays bounded.
            while next_to_finish in pending and (
                len(pending) > 2 * cfg.workers or _ready(pending[next_to_finish][1])
            ):
                nb, res = pending.pop(next_to_finish)
                finish(next_to_finish, nb, _result(res))
                next_to_finish += 1
        while next_to_finish in pending:
            nb, res = pending.pop(next_to_finish)
            finish(next_to_finish, nb, _result(res))
            next_to_finish += 1
    except BaseException:
        merger.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()

    if total.documents == 0 and cfg.num_shards == 1:
        merger.abort()
        dropped = f", {total.dropped} dropped by design ({cfg.converter.drop_reason})" if total.dropped else ""
        raise SystemExit(f"{cfg.input}: no usable documents ({total.skipped} bad ones skipped{dropped}); "
                         "nothing written" + (f"; first reasons: {'; '.join(total.reasons[:3])}"
                                              if total.reasons else ""))
    if done_parts:
        merger.finish()
    else:  # a shard whose byte range holds no line start: an empty dataset keeps the shard set complete
        write_token_role_documents(out, [], _WORKER["tok"].token_dtype)
    write_record(dataset_record_path(out), tokenizer_record(
        _WORKER["tok"], cfg.tokenizer_type, annotations=cfg.annotations, **cfg.converter.dataset_facts()))
    if cfg.num_shards > 1:
        write_json(cfg.done_marker, asdict(total), indent=1)
    shutil.rmtree(cfg.parts_dir)
    elapsed = time.time() - start
    _log_summary(cfg, total, elapsed, resumed=resuming)
    return total


def _sample_texts(cfg: PreprocessConfig) -> List[str]:
    """The texts the first ``sample_bytes`` of this run's input will be encoded as (for the identity check)."""
    if cfg.tokenizer_backend == "reference":
        return []
    tok: AnchorTokenizer = _WORKER["tok"]  # type: ignore[assignment]
    lines: List[Tuple[int, bytes]] = []
    size = 0
    for _, _, src in iter_parts(cfg):
        if isinstance(src, LineRange):  # read what the sample needs, not the whole first part
            src = src.head(cfg.sample_bytes)
        for item in part_lines(src):
            lines.append(item)
            size += len(item[1])
            if size >= cfg.sample_bytes:
                break
        break
    batch, scratch = PieceBatch(), PartStats()
    for line_no, line in lines:
        try:
            cfg.converter.add_document(line, f"{cfg.input}:{line_no}", cfg, tok, batch, scratch)
        except DocumentError:  # bad lines are reported when their part runs
            batch.drop_open_document()
    return batch.texts + tok.pieces.pending_texts()


def _ready(res) -> bool:
    return isinstance(res, PartStats) or res.ready()


def _result(res) -> PartStats:
    return res if isinstance(res, PartStats) else res.get()[1]


def _log_summary(cfg: PreprocessConfig, t: PartStats, elapsed: float, resumed: bool) -> None:
    share = t.annotation_tokens / t.tokens if t.tokens else 0.0
    lines = [
        f"wrote {cfg.output_path_prefix}.{{bin,idx}} and {roles_prefix(cfg.output_path_prefix)}.{{bin,idx}}"
        + (" (resumed run)" if resumed else ""),
        f"  documents {t.documents:,}" + (f"  chunks {t.chunks:,}" if t.chunks else "") + f"  tokens {t.tokens:,}",
        f"  annotation tokens {t.annotation_tokens:,}: {share:.1%} of this dataset's tokens"
        + (f" (budget: chunks merged below {cfg.budget.merge_below_chars or '-'} characters, at most "
           f"{cfg.budget.max_tags or 'all'} tags per chunk)" if cfg.budget.active else ""),
        f"  annotated here by the default annotator: {t.annotated_here:,}  skipped: {t.skipped:,}"
        + (f"  dropped: {t.dropped:,}" if t.dropped else ""),
        f"  {elapsed:.1f} s, {t.input_bytes / max(elapsed, 1e-9) / 1e6:.2f} MB/s of input, "
        f"{t.tokens / max(elapsed, 1e-9):,.0f} tokens/s",
    ]
    lines += [f"  skipped: {r}" for r in t.reasons]
    logger.info("\n".join(lines))
