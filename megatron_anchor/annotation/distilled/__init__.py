"""The distilled annotator: a fast tagger trained on an LLM-annotated sample (docs/annotator.md).

``tools/distill_annotator.py`` trains one (:mod:`.train`) and reports its agreement and tag entropy against the
teacher on held-out chunks (:mod:`.evaluate`); ``tools/annotate.py --annotator distilled:PATH`` tags a corpus
with it (:class:`.model.DistilledAnnotator`).
"""
