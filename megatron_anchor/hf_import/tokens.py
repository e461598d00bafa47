"""The imported model's tokenizer folder: the source's Hugging Face tokenizer, with the annotation delimiters added
as special tokens when asked (``--add-annotation-tokens``).

New delimiters get the next ids after the tokenizer's own (``tokenizers`` appends added tokens), and are written
into ``tokenizer.json`` and into ``tokenizer_config.json``'s ``additional_special_tokens`` so that transformers,
vLLM and the data tools (``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``) all see them. Text that
spells a delimiter stays ordinary text (:class:`~megatron_anchor.tokenizer.HuggingFaceAnchorTokenizer`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import List

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN
from megatron_anchor.hf_import.families import ImportRefused

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
"""Files of the source folder copied into the checkpoint's tokenizer folder (when present)."""


def missing_delimiters(folder: str) -> List[str]:
    """Delimiters that ``folder``'s ``tokenizer.json`` does not hold (reads only that file)."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ImportRefused(f"{folder}: no tokenizer.json (a fast Hugging Face tokenizer is needed; save the "
                            "model's tokenizer with transformers first)")
    tok = Tokenizer.from_file(path)
    return [t for t in (ANN_OPEN, ANN_CLOSE) if tok.token_to_id(t) is None]


def write_tokenizer_folder(src: str, dst: str, add_delimiters: bool) -> List[str]:
    """Copy the tokenizer files of ``src`` into ``dst``; with ``add_delimiters``, add the missing delimiters as
    special tokens. Returns the delimiters added (empty when they were there already or not asked for)."""
    from tokenizers import AddedToken, Tokenizer

    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    added = missing_delimiters(src) if add_delimiters else []
    if not added:
        return []
    tok = Tokenizer.from_file(os.path.join(dst, "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(os.path.join(dst, "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(dst, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        extra = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = extra + [t for t in added if t not in extra]
        if name == "tokenizer_config.json" and isinstance(config.get("added_tokens_decoder"), dict):
            for t in added:
                config["added_tokens_decoder"][str(tok.token_to_id(t))] = {
                    "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                    "special": True}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
    return added
