"""Annotators that run inside the annotate job's process: the embedded default and distilled models.

``--annotator default`` is the embedded rule-based annotator; ``--annotator distilled:PATH`` a model written by
``tools/distill_annotator.py`` (:mod:`megatron_anchor.annotation.distilled`). Both tag a batch of chunks at
once, need no server and no cache, and give the same tags for the same text in any shard or process.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Protocol, Sequence, Union

from megatron_anchor.annotation import default_annotator
from megatron_anchor.annotation.format import Tag
from megatron_anchor.annotation.llm.tagschema import SchemaError, TagSchema, load_schema

DISTILLED_PREFIX = "distilled:"


class LocalAnnotatorError(ValueError):
    """An annotator that cannot be opened (unknown name, bad model file, schema mismatch); says what to do."""


class LocalAnnotator(Protocol):
    """What the annotate job needs from an in-process annotator."""

    schema: Optional[TagSchema]
    """The tag schema its tags follow (None: the embedded annotator's fixed keys)."""

    def annotate_batch(self, texts: Sequence[str]) -> List[List[Tag]]:
        """Tags for each text, in order."""
        ...


class EmbeddedAnnotator:
    """:mod:`megatron_anchor.annotation.default_annotator` behind the batch interface."""

    schema: Optional[TagSchema] = None

    def annotate_batch(self, texts: Sequence[str]) -> List[List[Tag]]:
        return [default_annotator.annotate_text(t) for t in texts]


def open_local_annotator(spec: str, schema_path: Optional[Union[str, Path]] = None) -> LocalAnnotator:
    """The annotator named by ``spec`` (``default`` or ``distilled:PATH``).

    For a distilled model, ``schema_path`` (when given) must be the schema the model was trained for: a model
    from another schema would write tags the rest of the pipeline does not expect.
    """
    if spec == "default":
        return EmbeddedAnnotator()
    if not spec.startswith(DISTILLED_PREFIX) or not spec[len(DISTILLED_PREFIX):]:
        raise LocalAnnotatorError(f"unknown annotator {spec!r} (choose default, vllm or distilled:PATH)")
    from megatron_anchor.annotation.distilled.model import DistilledAnnotator, ModelFileError

    path = Path(spec[len(DISTILLED_PREFIX):])
    try:
        model = DistilledAnnotator.load(path)
    except (ModelFileError, ImportError) as e:
        raise LocalAnnotatorError(str(e)) from None
    if schema_path is not None:
        try:
            wanted = load_schema(schema_path)
        except SchemaError as e:
            raise LocalAnnotatorError(str(e)) from None
        if wanted.fingerprint() != model.schema.fingerprint():
            raise LocalAnnotatorError(
                f"{path} was trained for another tag schema (keys {', '.join(model.keys)}; fingerprint "
                f"{model.schema.fingerprint()}) than {schema_path} (keys {', '.join(k.name for k in wanted.keys)}; "
                f"fingerprint {wanted.fingerprint()}): retrain it with tools/distill_annotator.py --schema "
                f"{schema_path}, or leave out --schema to use the model's own"
            )
    return model
