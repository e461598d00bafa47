"""SFT samples as documents of the annotate job (:mod:`megatron_anchor.annotation.annotate`) and back: the first
stage of ``tools/preprocess_sft.py --annotator vllm``.

:func:`write_job_input` makes each valid sample one job document whose chunks are its assistant turns (already
annotated turns keep their tags), with the same bytes on every run so that a rerun resumes the job (and its
cache makes repeated responses free); :func:`write_annotated_sft` turns the job's output back into annotated SFT
JSONL. Time: one pass over the file each; memory: one sample at a time.
"""

from __future__ import annotations

import json

from megatron_anchor.annotation.schema import DocumentError
from megatron_anchor.data.sft import parse_sample_line, with_annotations
from megatron_anchor.outputs import atomic_write


def write_job_input(input_path: str, job_input: str, skip_bad_samples: bool = False) -> int:
    """Write the annotate job's input for the SFT JSONL ``input_path`` to ``job_input`` (under a temporary name
    first). A line that is not a sample raises :class:`DocumentError` naming ``input_path`` and the line, unless
    ``skip_bad_samples``: it is then left out and counted. Returns the number of lines left out."""
    bad = 0
    # Same bytes on a rerun, so the job recognises its input and resumes.
    with open(input_path, "rb") as src, atomic_write(job_input) as dst:
        for line_no, line in enumerate(src, 1):
            if not line.strip():
                continue
            where = f"{input_path}:{line_no}"
            try:
                sample = parse_sample_line(line, where)
            except DocumentError:
                if not skip_bad_samples:
                    raise
                bad += 1
                continue
            chunks = [{"text": t.content, "sep": ""} | ({"tags": [list(x) for x in t.tags]} if t.tags is not None
                                                          else {}) for t in sample.assistant_turns]
            dst.write(json.dumps({"chunks": chunks, "sft_line": line_no, "sft": sample.raw},
                                 ensure_ascii=False) + "\n")
    return bad


def write_annotated_sft(job_output: str, input_path: str, annotated_path: str) -> None:
    """The annotate job's output ``job_output`` (for a job input of :func:`write_job_input` on ``input_path``) as
    annotated SFT JSONL at ``annotated_path`` (under a temporary name first): each sample with its assistant
    turns' tags."""
    with open(job_output, "rb") as src, atomic_write(annotated_path) as dst:
        for line in src:
            rec = json.loads(line)
            sample = parse_sample_line(json.dumps(rec["sft"]).encode(), f"{input_path}:{rec['sft_line']}")
            tags = [[tuple(t) for t in c["tags"]] for c in rec["chunks"]]
            dst.write(json.dumps(with_annotations(sample, tags), ensure_ascii=False) + "\n")
