"""The command-line tools: one module per tool, each with its parser and ``main(argv) -> int``.

Every tool runs three ways, the same code behind each: the console script installed with the package
(``anchor-preprocess-data ...``), ``python -m megatron_anchor.cli.preprocess_data ...``, and, from a checkout,
``python tools/preprocess_data.py ...`` (a wrapper kept for Megatron-LM habits). Importing this package is free:
each tool's heavy imports happen when its own module is imported.
"""

CONSOLE_SCRIPTS = {
    "anchor-ablation-sft": "ablation_sft",
    "anchor-annotate": "annotate",
    "anchor-annotator-server": "annotator_server",
    "anchor-binding-study": "binding_study",
    "anchor-distill-annotator": "distill_annotator",
    "anchor-evaluate-ability": "evaluate_ability",
    "anchor-evaluate-diversity": "evaluate_diversity",
    "anchor-evaluate-midtraining": "evaluate_midtraining",
    "anchor-export-hf": "export_hf",
    "anchor-generate": "generate",
    "anchor-import-hf": "import_hf",
    "anchor-inspect-dataset": "inspect_dataset",
    "anchor-make-synthetic-corpus": "make_synthetic_corpus",
    "anchor-merge-datasets": "merge_datasets",
    "anchor-preprocess-data": "preprocess_data",
    "anchor-preprocess-sft": "preprocess_sft",
    "anchor-run-on-ray": "run_on_ray",
    "anchor-train-tokenizer": "train_tokenizer",
}
"""Console script name -> tool module under ``megatron_anchor.cli`` (its ``main`` is the entry point). The one list
of tools: setup.py reads this literal without importing the package (so without torch), the wrappers under
tools/ and the tests follow it. Names are ``anchor-`` and the module's name with dashes."""
