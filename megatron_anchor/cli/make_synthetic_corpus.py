#!/usr/bin/env python
"""Write a small synthetic raw-text corpus (JSONL, one {"id", "text"} per line) for demos and tests.

Documents have 2-7 paragraphs across many topics and genres, separated by blank lines; deterministic per seed::

    python tools/make_synthetic_corpus.py --output corpus.jsonl --documents 2000
"""

import argparse
import sys

from megatron_anchor.bounds import ranged
from megatron_anchor.data.synthetic import write_raw_jsonl
from megatron_anchor.outputs import OutputError, atomic_path, check_outputs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="JSONL file to write (replaced if it exists)")
    p.add_argument("--documents", default=2000, **ranged(int, "number of documents", ge=1))
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    try:
        check_outputs([("--output", args.output)])
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with atomic_path(args.output) as tmp:
        size = write_raw_jsonl(tmp, args.documents, args.seed)
    print(f"wrote {args.documents} documents ({size / 1e6:.1f} MB) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
