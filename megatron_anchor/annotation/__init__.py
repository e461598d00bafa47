"""Annotations: the interleaved serialisation, chunking, the annotated JSONL schema and annotators."""
