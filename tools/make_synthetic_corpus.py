#!/usr/bin/env python
"""Write a small synthetic raw-text corpus (JSONL, one {"id", "text"} per line) for demos and tests.

Documents have 2-7 paragraphs across many topics and genres, separated by blank lines; deterministic per seed::

    python tools/make_synthetic_corpus.py --output corpus.jsonl --documents 2000
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anchor.data.synthetic import write_raw_jsonl  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="JSONL file to write (replaced if it exists)")
    p.add_argument("--documents", type=int, default=2000, help="number of documents")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    size = write_raw_jsonl(tmp, args.documents, args.seed)
    os.replace(tmp, args.output)
    print(f"wrote {args.documents} documents ({size / 1e6:.1f} MB) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
