"""The tokenizers' error, in a module of its own so that every tokenizer module (the interface in
:mod:`~megatron_anchor.tokenizer.base`, the piece encoder it uses, the concrete tokenizers) can raise it without
importing one another."""


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used as asked."""
