#!/usr/bin/env python
"""Run a data tool as shards on a Ray cluster, then merge the shards in order.

Everything after ``--`` is the tool's own arguments, exactly as for a single-machine run. Examples, on a local
Ray instance (or a cluster with --address auto)::

    python tools/run_on_ray.py --stage annotate --num-shards 64 -- \\
        --input raw.jsonl --output annotated.jsonl --annotator vllm --url http://node1:8000,http://node2:8000

    python tools/run_on_ray.py --stage preprocess --num-shards 64 -- \\
        --input annotated.jsonl --output-prefix data/corpus --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tok.model --append-eod

Each shard is a Ray task running the tool with --num-shards/--shard-index; a task whose worker dies is retried
and resumes; a rerun skips finished shards. The result equals a single-process run over the same input.
"""

import argparse
import logging
import sys

from megatron_anchor.bounds import ranged
from megatron_anchor.scaleout.ray_runner import STAGES, run_on_ray


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tool_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --stage STAGE --num-shards N [options] -- TOOL_ARGS...")
    p.add_argument("--stage", required=True, choices=sorted(STAGES), help="which data tool to run")
    p.add_argument("--num-shards", required=True, **ranged(int, "number of shards (Ray tasks)", ge=1))
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto' for the cluster this machine belongs to); default: start "
                        "a local Ray instance")
    p.add_argument("--max-retries", default=3, **ranged(
        int, "how often Ray reruns a shard whose worker died (the tool resumes the shard)", ge=0))
    p.add_argument("--cpus-per-task", default=1.0, **ranged(
        float, "CPUs Ray reserves per shard; give the tool's --workers as many", gt=0))
    p.add_argument("--no-merge", action="store_true", help="leave the shard outputs unmerged")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(own)
    if not tool_args:
        p.error("give the tool's arguments after --")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run_on_ray(args.stage, tool_args, args.num_shards, address=args.address,
                         max_retries=args.max_retries, cpus_per_task=args.cpus_per_task,
                         merge=not args.no_merge, show_progress=not args.no_progress)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
