#!/usr/bin/env python
"""Preprocessing and role-channel benchmarks. Every figure is a ratio against a baseline measured in the same run.

1. throughput: tools/preprocess_data.py end to end (read JSONL, annotate-format, tokenize, write tokens + roles,
   merge) against the tokenizer's raw batched encode of the same documents' text, same number of workers.
   Target: >= 0.7 of the raw rate.
2. write: writing tokens + roles with our writer (parts + streaming merge, as the tool does) against writing
   tokens alone with megatron-core's IndexedDatasetBuilder. Target: <= 1.15x.
3. memory: peak resident memory (process tree) preprocessing a corpus 10x larger. Target: <= 1.2x.
4. fetch: AnchorGPTDataset sample fetch (tokens + roles) against stock GPTDataset on the same files.
   Target: <= 1.2x.
5. side: on >= 200 MB of JSONL, whole processes with 2 workers and a byte-level BPE tokenizer, arms alternating
   round by round (medians reported): the raw gigatoken encode of the same texts (the limit), our plain
   (--no-annotations) and annotated paths, and with --megatron-lm PATH Megatron-LM's tools/preprocess_data.py and
   tools/preprocess_data_fast.py --use-gigatoken on the same corpus and tokenizer (their .bin compared with ours);
   then a SentencePiece model against the fastest backend identical for it.
6. side-memory: on the same real-text corpora, peak resident memory (process tree) of the whole corpus against
   its first tenth, plain and annotated. Target: <= 1.2x.
   Targets: plain >= 2x preprocess_data_fast.py and >= 15x preprocess_data.py; annotated text MB/s >= 0.25 of
   the raw gigatoken encode; SentencePiece >= 0.7 of the fastest identical backend.
7. stages: where the annotated path's time goes, in one process on one core, on the first --stages-mb MB of the
   annotated real-text corpus: decoding the lines, building the pieces, encoding the text pieces, laying out ids
   and roles, writing the part; each stage as a multiple of the raw gigatoken encode of the same documents' whole
   texts on one core (best of --repeat; the annotation memo is warm after the first repeat, as in a worker's
   later parts).

    python benchmarks/bench_preprocess.py --mb 20 --workers 2
    python benchmarks/bench_preprocess.py --only side --side-mb 200 --corpus text --megatron-lm /path/to/Megatron-LM
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context

import numpy as np

from megatron_anchor.annotation.default_annotator import annotate_document
from megatron_anchor.annotation.schema import parse_line
from megatron_anchor.data.synthetic import generate_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(path: str, mb: float, seed: int = 0) -> int:
    """Annotated JSONL of about ``mb`` megabytes; returns the number of documents."""
    n = 0
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in generate_documents(10**9, seed):
            doc = annotate_document(parse_line(json.dumps({"text": text}).encode(), "gen"))
            line = doc.to_jsonl() + "\n"
            f.write(line)
            size += len(line.encode())
            n += 1
            if size >= mb * 1e6:
                return n
    return n


def preprocess_cmd(inp, out, model, workers):
    return [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", inp,
            "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
            "--append-eod", "--workers", str(workers), "--no-progress", "--overwrite"]


def run_tree_peak_rss(cmd) -> tuple:
    """Run ``cmd``; return (seconds, peak summed RSS of the process tree in bytes)."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode())
    return elapsed, peak


_SP = {}


def _raw_init(model):
    import sentencepiece as spm

    _SP["sp"] = spm.SentencePieceProcessor(model_file=model)


def _raw_encode(texts):
    return sum(len(x) for x in _SP["sp"].encode(texts, num_threads=1))


def bench_throughput(corpus, model, workers, tmp, repeat=5):
    texts = []
    with open(corpus, "rb") as f:
        for line in f:
            obj = json.loads(line)
            texts.append("".join(c["text"] + c["sep"] for c in obj["chunks"]))
    batches = [texts[i:i + 2000] for i in range(0, len(texts), 2000)]
    mb = sum(len(t.encode()) for t in texts) / 1e6

    def raw():
        t = time.perf_counter()
        with get_context("fork").Pool(workers, _raw_init, (model,)) as pool:
            tokens = sum(pool.imap(_raw_encode, batches))
        return time.perf_counter() - t, tokens

    def ours():
        t = time.perf_counter()
        subprocess.run(preprocess_cmd(corpus, os.path.join(tmp, "thr"), model, workers), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t

    raw_t, ours_t = [], []
    for _ in range(repeat):  # interleave to share the machine's noise
        raw_t.append(raw()[0])
        ours_t.append(ours())
    r, o = min(raw_t), min(ours_t)
    return {"text_mb": round(mb, 1), "repeat": repeat, "raw_encode_s": round(r, 2), "preprocess_s": round(o, 2),
            "raw_all_s": [round(t, 2) for t in raw_t], "preprocess_all_s": [round(t, 2) for t in ours_t],
            "raw_mb_s": round(mb / r, 2), "preprocess_mb_s": round(mb / o, 2), "ratio": round(r / o, 3),
            "target": ">= 0.7"}


def bench_write(prefix, tmp):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_anchor.data.indexed import iter_documents, merge_token_role_datasets, roles_prefix
    from megatron_anchor.data.indexed import write_token_role_documents

    docs = [(d, r) for d, r in zip(iter_documents(prefix), iter_documents(roles_prefix(prefix)))]
    dtype = docs[0][0].dtype.type

    def megatron_tokens_only():
        t = time.perf_counter()
        b = IndexedDatasetBuilder(os.path.join(tmp, "mc.bin"), dtype=dtype)
        for d, _ in docs:
            b.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
        b.finalize(os.path.join(tmp, "mc.idx"))
        return time.perf_counter() - t

    def ours_tokens_roles():
        t = time.perf_counter()
        parts = []
        for i in range(0, len(docs), 2000):
            p = os.path.join(tmp, f"wpart{i}")
            write_token_role_documents(p, docs[i:i + 2000], dtype)
            parts.append(p)
        merge_token_role_datasets(parts, os.path.join(tmp, "ours"))
        return time.perf_counter() - t

    a, b = [], []
    for _ in range(5):
        a.append(megatron_tokens_only())
        b.append(ours_tokens_roles())
    return {"documents": len(docs), "megatron_tokens_s": round(min(a), 3), "ours_tokens_roles_s": round(min(b), 3),
            "ratio": round(min(b) / min(a), 3), "target": "<= 1.15"}


def bench_memory(model, mb, workers, tmp):
    small = os.path.join(tmp, "mem_small.jsonl")
    big = os.path.join(tmp, "mem_big.jsonl")
    make_corpus(small, mb, seed=1)
    with open(small, "rb") as src, open(big, "wb") as dst:
        data = src.read()
        for _ in range(10):
            dst.write(data)
    # Parts of 250 documents let even the small corpus fill the pipeline (2 x workers parts in flight), so the
    # comparison is between two steady states, as it is for any corpus much larger than a part.
    extra = ["--docs-per-part", "250"]
    _, peak_small = run_tree_peak_rss(preprocess_cmd(small, os.path.join(tmp, "ms"), model, workers) + extra)
    _, peak_big = run_tree_peak_rss(preprocess_cmd(big, os.path.join(tmp, "mb"), model, workers) + extra)
    return {"small_mb": mb, "big_mb": 10 * mb, "peak_small_mib": round(peak_small / 2**20, 1),
            "peak_big_mib": round(peak_big / 2**20, 1), "ratio": round(peak_big / peak_small, 3),
            "target": "<= 1.2"}


def bench_fetch(prefix, model, tmp, seq_length=2048, n=2000):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_anchor.data.anchor_dataset import AnchorGPTDataset
    from megatron_anchor.tokenizer import build_tokenizer

    tok = build_tokenizer("SentencePieceTokenizer", model)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
                           tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, create_attention_mask=False, path_to_cache=os.path.join(tmp, "c"))
    stock = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, cfg).build()[0]
    ours = BlendedMegatronDatasetBuilder(AnchorGPTDataset, [n, 0, 0], lambda: True, cfg).build()[0]
    order = list(range(min(len(stock), n)))
    random.Random(0).shuffle(order)

    def timed(ds, passes=3):  # a few passes per round: rounds of ~0.1 s were at the mercy of single bursts
        t = time.perf_counter()
        for _ in range(passes):
            for i in order:
                ds[i]
        return (time.perf_counter() - t) / (passes * len(order))

    a, b = [], []
    for _ in range(11):  # alternate, so both see the same machine; the median per-round ratio resists noise
        a.append(timed(stock))
        b.append(timed(ours))
    ratios = sorted(y / x for x, y in zip(a, b))
    return {"seq_length": seq_length, "samples": len(order), "stock_us": round(min(a) * 1e6, 1),
            "anchor_us": round(min(b) * 1e6, 1), "ratio": round(ratios[len(ratios) // 2], 3),
            "ratio_of_best": round(min(b) / min(a), 3), "ratios": [round(r, 3) for r in ratios], "target": "<= 1.2"}


TEXT_DIRS = ("/usr/share/doc/python3.11/html/_sources", "/usr/share/games/fortunes")
"""Real English text from two Debian packages (python3.11-doc: the Python documentation's reST sources;
fortunes: fortune cookies), the default --text-dirs of the side-by-side benchmark."""


def _text_documents(dirs, target_chars=4000):
    """Documents of about ``target_chars`` cut at blank lines from every UTF-8 text file under ``dirs``."""
    for d in dirs:
        for root, _, files in sorted(os.walk(d)):
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.islink(path) or name.endswith((".dat", ".u8")):
                    continue
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read().replace("\n%\n", "\n\n")  # fortune files separate entries with '%'
                except (UnicodeDecodeError, OSError):
                    continue
                cur, size = [], 0
                for para in text.split("\n\n"):
                    cur.append(para)
                    size += len(para)
                    if size >= target_chars:
                        yield "\n\n".join(cur)
                        cur, size = [], 0
                if "".join(cur).strip():
                    yield "\n\n".join(cur)


def make_side_corpora(tmp, mb, corpus, text_dirs, seed=0):
    """Raw JSONL of >= ``mb`` MB and the same documents annotated by the embedded annotator.

    ``text``: the documents of ``text_dirs``, repeated in a new shuffled order each pass until the size is
    reached (the repetition is what a small real corpus costs; both sides of every ratio see it).
    ``synthetic``: the synthetic generator. Returns (raw path, annotated path, texts, text MB)."""
    if corpus == "text":
        docs = [d for d in _text_documents(text_dirs) if d.strip()]
        if not docs:
            raise SystemExit(f"no text under {text_dirs}: apt-get install python3.11-doc fortunes, or pass "
                             "--text-dirs DIR ... (or --corpus synthetic)")
        source = (d for p in range(10**6) for d in random.Random(seed + p).sample(docs, len(docs)))
    else:
        source = generate_documents(10**9, seed)
    raw, ann = os.path.join(tmp, "side_raw.jsonl"), os.path.join(tmp, "side_ann.jsonl")
    texts, size = [], 0
    with open(raw, "w", encoding="utf-8") as fr, open(ann, "w", encoding="utf-8") as fa:
        for text in source:
            line = json.dumps({"text": text}, ensure_ascii=False)
            fr.write(line + "\n")
            fa.write(annotate_document(parse_line(line.encode(), "gen")).to_jsonl() + "\n")
            texts.append(text)
            size += len(line) + 1
            if size >= mb * 1e6:
                break
    return raw, ann, texts, sum(len(t.encode()) for t in texts) / 1e6


def _timed(cmd, env=None):
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.decode()[-2000:]}")
    return time.perf_counter() - t


_RAW_SNIPPET = """
import json, sys, time
name, model, path, workers = sys.argv[1:5]
texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
if name == "gigatoken":
    import gigatoken
    if model.endswith(".model"):
        from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json
        tok = gigatoken.Tokenizer.from_json(sentencepiece_to_tokenizer_json(open(model, "rb").read()))
    else:
        tok = gigatoken.Tokenizer(model)
    tok.encode_batch(texts[:100], parallel=True)  # first call imports awkward and starts the thread pool
    t = time.perf_counter(); tok.encode_batch(texts, parallel=True)
else:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    t = time.perf_counter(); sp.encode(texts, num_threads=int(workers))
print(time.perf_counter() - t)
"""


def _raw_encode_s(backend, model, path, workers):
    """Seconds a bare in-memory batched encode of the corpus' texts takes (a fresh process, texts preloaded)."""
    out = subprocess.run([sys.executable, "-c", _RAW_SNIPPET, backend, model, path, str(workers)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _megatron_env(checkout, tmp):
    """Megatron-LM from a source checkout on Python 3.11: the checkout first on the path (the installed
    megatron-core would shadow it) and a shim for typing.override (a 3.12 name)."""
    shim = os.path.join(tmp, "mlm_shim")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
        f.write("import typing\nif not hasattr(typing, 'override'):\n    typing.override = lambda f: f\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([checkout, shim]))
    return env


def _first_tenth(path, tmp):
    """The first tenth of a JSONL file's lines, as a new file beside the benchmark's others."""
    with open(path, "rb") as f:
        lines = f.readlines()
    out = os.path.join(tmp, "tenth_" + os.path.basename(path))
    with open(out, "wb") as f:
        f.writelines(lines[: max(1, len(lines) // 10)])
    return out


def train_side_tokenizer(raw, prefix, vocab_size, hf=True):
    """An 8k-style tokenizer for the side corpora, trained on the first 20 MB of ``raw``: a byte-level BPE
    (``PREFIX/``) or, with ``hf=False``, a SentencePiece model (``PREFIX.model``)."""
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", raw,
                    "--vocab-size", str(vocab_size), "--max-bytes", "20000000", "--output-prefix", prefix,
                    *(["--type", "hf"] if hf else [])], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return prefix if hf else prefix + ".model"


def bench_side_memory(args, tmp):
    """Peak resident memory of the process tree on the real-text corpora: the whole corpus against its first
    tenth, plain and annotated, HF BPE tokenizer. Parts of 250 documents, so that even the tenth fills the
    pipeline (2 x workers parts in flight) and both runs are in their steady state."""
    raw, ann, texts, _ = make_side_corpora(tmp, args.side_mb, args.corpus, args.text_dirs)
    del texts
    hf = train_side_tokenizer(raw, os.path.join(tmp, "side_hf"), args.vocab_size)
    tool = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--workers", str(args.workers),
            "--append-eod", "--no-progress", "--overwrite", "--docs-per-part", "250",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf]
    out = {}
    for name, path, extra in (("plain", raw, ["--no-annotations"]), ("annotated", ann, [])):
        peaks = {}
        for size, inp in (("tenth", _first_tenth(path, tmp)), ("whole", path)):
            _, peaks[size] = run_tree_peak_rss(tool + extra + ["--input", inp,
                                                               "--output-prefix", os.path.join(tmp, "mem_" + name)])
        out[name] = {"input_mb": round(os.path.getsize(path) / 1e6, 1),
                     "peak_tenth_mib": round(peaks["tenth"] / 2**20, 1),
                     "peak_whole_mib": round(peaks["whole"] / 2**20, 1),
                     "ratio": round(peaks["whole"] / peaks["tenth"], 3), "target": "<= 1.2"}
    return out


def bench_stages(args, tmp):
    """Seconds per stage of the annotated path on one core (best of ``args.repeat``), against the raw encode."""
    from megatron_anchor.annotation.schema import annotated_chunks
    from megatron_anchor.data.indexed import write_token_role_part
    from megatron_anchor.data.preprocess import PartStats, PreprocessConfig
    from megatron_anchor.tokenizer import build_tokenizer
    from megatron_anchor.tokenizer.fast import select_backend
    from megatron_anchor.tokenizer.pieces import PieceBatch

    raw, ann, texts, _ = make_side_corpora(tmp, args.stages_mb * 0.55, args.corpus, args.text_dirs)
    hf = train_side_tokenizer(raw, os.path.join(tmp, "side_hf"), args.vocab_size)
    tok = build_tokenizer("HuggingFaceTokenizer", hf)
    notice = select_backend(tok, "gigatoken", texts[:200])
    cfg = PreprocessConfig(input=ann, output_prefix=os.path.join(tmp, "stages"), tokenizer_type="HuggingFaceTokenizer",
                           tokenizer_model=hf, append_eod=True)
    with open(ann, "rb") as f:
        lines = f.readlines()
    best = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
        return out

    for _ in range(args.repeat):
        timed("raw encode of the whole texts", lambda: tok.encode_flat(texts))
        timed("decode lines (msgspec)", lambda: [annotated_chunks(line) for line in lines])
        batch = PieceBatch()

        def pieces():
            for i, line in enumerate(lines):
                cfg.converter.add_document(line, str(i), cfg, tok, batch, PartStats())
        timed("decode + pieces (per-chunk loop, annotation memo)", pieces)
        encoded = timed("encode text pieces", lambda: tok.encode_flat(batch.texts))
        # The layout alone: the text pieces' ids are already known (new pool pieces are still encoded).
        tok.encode_flat = lambda texts, encode=tok.encode_flat: encoded if texts is batch.texts else encode(texts)
        try:
            part = timed("layout (ids and roles of every document)", lambda: tok.pieces.encode(batch))
        finally:
            del tok.encode_flat
        timed("write part", lambda: write_token_role_part(os.path.join(tmp, "stages_part"), part.ids, part.roles,
                                                          part.doc_lengths, tok.token_dtype))
    raw_s = best["raw encode of the whole texts"]
    work = sum(v for k, v in best.items() if k not in ("raw encode of the whole texts", "decode lines (msgspec)"))
    return {"annotated_jsonl_mb": round(sum(map(len, lines)) / 1e6, 1), "documents": len(lines),
            "text_pieces": len(batch.texts), "codes": len(batch.codes), "tokens": int(len(part.ids)), "backend": notice,
            "seconds": {k: round(v, 3) for k, v in best.items()},
            "x_raw_encode": {k: round(v / raw_s, 2) for k, v in best.items()},
            "annotated_work_x_raw_encode": round(work / raw_s, 2),
            "note": "target 0.25 of the raw encode = the whole process within 4x the raw encode"}


def bench_side_by_side(args, tmp):
    raw, ann, texts, text_mb = make_side_corpora(tmp, args.side_mb, args.corpus, args.text_dirs)
    del texts
    hf = train_side_tokenizer(raw, os.path.join(tmp, "side_hf"), args.vocab_size)
    sp = train_side_tokenizer(raw, os.path.join(tmp, "side_sp"), args.vocab_size, hf=False)
    w = str(args.workers)
    tool = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--workers", w, "--append-eod",
            "--no-progress", "--overwrite"]
    arms = {
        "raw_gigatoken": lambda: _raw_encode_s("gigatoken", hf, raw, args.workers),
        "ours_plain": lambda: _timed(tool + ["--input", raw, "--output-prefix", os.path.join(tmp, "o_plain"),
                                             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf,
                                             "--no-annotations"]),
        "ours_annotated": lambda: _timed(tool + ["--input", ann, "--output-prefix", os.path.join(tmp, "o_ann"),
                                                 "--tokenizer-type", "HuggingFaceTokenizer",
                                                 "--tokenizer-model", hf]),
    }
    if args.megatron_lm:
        env = _megatron_env(args.megatron_lm, tmp)
        mlm = [args.megatron_python or sys.executable]
        common = ["--input", raw, "--json-keys", "text", "--tokenizer-type", "HuggingFaceTokenizer",
                  "--tokenizer-model", hf, "--append-eod"]
        arms["megatron_fast"] = lambda: _timed(mlm + [os.path.join(args.megatron_lm, "tools", "preprocess_data_fast.py"),
                                                      *common, "--use-gigatoken",
                                                      "--output-prefix", os.path.join(tmp, "m_fast")], env)
        if not args.skip_megatron_slow:
            arms["megatron"] = lambda: _timed(mlm + [os.path.join(args.megatron_lm, "tools", "preprocess_data.py"),
                                                     *common, "--workers", w,
                                                     "--output-prefix", os.path.join(tmp, "m_slow")], env)
    sp_arms = {
        "sp_ours_plain": lambda: _timed(tool + ["--input", raw, "--output-prefix", os.path.join(tmp, "o_sp"),
                                                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                                                sp, "--no-annotations"]),
        "sp_raw_sentencepiece": lambda: _raw_encode_s("sentencepiece", sp, raw, args.workers),
    }
    from megatron_anchor.tokenizer import build_tokenizer
    from megatron_anchor.tokenizer.fast import select_backend

    sp_notice = select_backend(build_tokenizer("SentencePieceTokenizer", sp), "auto",
                               [json.loads(line)["text"] for _, line in zip(range(200), open(raw))])
    if "identical" in sp_notice:
        sp_arms["sp_raw_gigatoken"] = lambda: _raw_encode_s("gigatoken", sp, raw, args.workers)
    times = {k: [] for k in list(arms) + list(sp_arms)}
    for r in range(args.side_repeat):  # alternate: every arm once per round, in a rotating order
        for group in (arms, sp_arms):
            names = list(group)
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(group[name]())
                print(f"round {r} {name} {times[name][-1]:.2f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    raw_mb = os.path.getsize(raw) / 1e6
    out = {"corpus": args.corpus, "raw_jsonl_mb": round(raw_mb, 1), "annotated_jsonl_mb": round(os.path.getsize(ann) / 1e6, 1),
           "text_mb": round(text_mb, 1), "workers": args.workers, "rounds": args.side_repeat,
           "median_s": {k: round(v, 2) for k, v in med.items()}, "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
           "sp_backend": sp_notice,
           "annotated_text_mb_s_ratio_to_raw_gigatoken": round(med["raw_gigatoken"] / med["ours_annotated"], 3),
           "sp_ratio_to_fastest_identical": round(min(med["sp_raw_sentencepiece"], med.get("sp_raw_gigatoken", 1e9))
                                                  / med["sp_ours_plain"], 3)}
    if args.megatron_lm:
        out["plain_speedup_vs_megatron_fast"] = round(med["megatron_fast"] / med["ours_plain"], 2)
        if "megatron" in med:
            out["plain_speedup_vs_megatron"] = round(med["megatron"] / med["ours_plain"], 2)
        ours = os.path.join(tmp, "o_plain_text_document")
        for name, prefix in (("megatron_fast", "m_fast_text_document"), ("megatron", "m_slow_text_document")):
            theirs = os.path.join(tmp, prefix)
            if os.path.exists(theirs + ".bin"):
                out[f"bytes_identical_to_{name}"] = all(
                    open(ours + ext, "rb").read() == open(theirs + ext, "rb").read() for ext in (".bin", ".idx"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20, help="size of the throughput corpus (annotated JSONL, MB)")
    p.add_argument("--memory-mb", type=float, default=5, help="size of the small memory corpus (the big one is 10x)")
    p.add_argument("--workers", type=int, default=2, help="workers for the tool and the raw-encode baseline")
    p.add_argument("--repeat", type=int, default=5,
                   help="throughput: interleaved runs per arm; the best of each counts (default: 5)")
    p.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary for the benchmark")
    p.add_argument("--only", nargs="*", default=["throughput", "write", "memory", "fetch"],
                   help="which benchmarks to run (throughput, write, memory, fetch, side, side-memory, stages)")
    p.add_argument("--side-mb", type=float, default=200, help="side: size of the raw JSONL corpus (MB)")
    p.add_argument("--side-repeat", type=int, default=3, help="side: rounds; every arm runs once per round")
    p.add_argument("--corpus", choices=["text", "synthetic"], default="text",
                   help="side: real text from --text-dirs (default) or the synthetic generator")
    p.add_argument("--text-dirs", nargs="+", default=list(TEXT_DIRS),
                   help="side: folders of UTF-8 text files for --corpus text (default: the Python documentation "
                        "sources and fortunes, from Debian's python3.11-doc and fortunes packages)")
    p.add_argument("--megatron-lm", default=None,
                   help="side: a Megatron-LM source checkout; adds its preprocess_data.py and preprocess_data_fast.py")
    p.add_argument("--megatron-python", default=None,
                   help="side: the Python that runs Megatron-LM's tools (one with triton installed; default: this one)")
    p.add_argument("--skip-megatron-slow", action="store_true", help="side: leave out Megatron-LM's preprocess_data.py")
    p.add_argument("--stages-mb", type=float, default=40,
                   help="stages: size of the annotated JSONL slice profiled in one process (MB)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_pre_")
    try:
        results = {"workers": args.workers, "cpus": os.cpu_count()}
        if "side" in args.only:
            results["side"] = bench_side_by_side(args, tmp)
            print("side", json.dumps(results["side"], indent=1), flush=True)
        if "stages" in args.only:
            results["stages"] = bench_stages(args, tmp)
            print("stages", json.dumps(results["stages"], indent=1), flush=True)
        if "side-memory" in args.only:
            results["side_memory"] = bench_side_memory(args, tmp)
            print("side-memory", json.dumps(results["side_memory"], indent=1), flush=True)
        if set(args.only) - {"side", "side-memory", "stages"}:
            corpus = os.path.join(tmp, "corpus.jsonl")
            results["corpus_documents"] = make_corpus(corpus, args.mb)
            subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
                            "--output-prefix", os.path.join(tmp, "tok"), "--vocab-size", str(args.vocab_size),
                            "--max-bytes", "5000000"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            model = os.path.join(tmp, "tok.model")
        if "throughput" in args.only:
            results["throughput"] = bench_throughput(corpus, model, args.workers, tmp, args.repeat)
            print("throughput", results["throughput"], flush=True)
        prefix = os.path.join(tmp, "thr_text_document")
        if {"write", "fetch"} & set(args.only) and not os.path.exists(prefix + ".bin"):
            subprocess.run(preprocess_cmd(corpus, os.path.join(tmp, "thr"), model, args.workers), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if "write" in args.only:
            results["write"] = bench_write(prefix, tmp)
            print("write", results["write"], flush=True)
        if "memory" in args.only:
            results["memory"] = bench_memory(model, args.memory_mb, args.workers, tmp)
            print("memory", results["memory"], flush=True)
        if "fetch" in args.only:
            results["fetch"] = bench_fetch(prefix, model, tmp)
            print("fetch", results["fetch"], flush=True)
        print(json.dumps(results, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
