"""Which Hugging Face ``config.json`` the importer maps, and onto which trainer settings.

The Llama family as transformers writes it: Llama 2/3 (and SmolLM/SmolLM2, which are Llama), Mistral, Qwen2/2.5
(biases on q, k and v only) and Qwen3 (per-head q/k RMSNorm); tied or untied embeddings; grouped-query attention;
Llama 3.1's RoPE scaling where its constants are megatron-core's. Everything else is refused by name
(:class:`ImportRefused` lists every problem at once) before any weight is read. Both spellings of RoPE settings are
read: ``rope_theta``/``rope_scaling`` (older folders) and ``rope_parameters`` (transformers 5).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""model_type -> the transformers class of the folders the importer maps."""

LLAMA3_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""Llama 3.1 RoPE-scaling constants that megatron-core fixes (only the factor is a setting there)."""


class ImportRefused(ValueError):
    """A Hugging Face folder the importer cannot map exactly; the message names every reason."""


def rope_settings(config: Dict) -> Tuple[float, Dict]:
    """``(theta, scaling)`` from either spelling; ``scaling`` is {} without scaling."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or {})
    if not scaling and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), ({} if kind == "default" else {**scaling, "rope_type": kind})


def _bias_fields(model_type: str, config: Dict, problems: List[str]) -> Dict:
    """megatron's bias settings for the family's biases (or a problem when megatron cannot express them)."""
    if model_type == "qwen2":  # q, k and v always carry biases in Qwen2; o_proj and the MLP never
        return {"disable_bias_linear": True, "add_qkv_bias": True}
    attention, mlp = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attention and mlp:
        return {"disable_bias_linear": False}
    if attention or mlp:
        problems.append(f"attention_bias={attention} with mlp_bias={mlp}: megatron-core has biases on every linear "
                        "layer or none (or on q, k, v only, Qwen2's), not on "
                        + ("the attention alone (o_proj included)" if attention else "the MLP alone"))
    return {"disable_bias_linear": True}


def model_fields(config: Dict, source: str = "config.json") -> Dict:
    """:class:`~megatron_anchor.training.config.ModelConfig` fields for a Hugging Face ``config.json`` (a dict).

    Raises :class:`ImportRefused` naming ``source`` and every setting that cannot be mapped exactly.
    """
    problems: List[str] = []
    model_type = config.get("model_type")
    archs = config.get("architectures") or [FAMILIES.get(model_type, "?")]
    if model_type not in FAMILIES or archs[0] != FAMILIES[model_type]:
        raise ImportRefused(f"{source}: model_type {model_type!r} (architecture {archs[0]}) is not a family the "
                            f"importer maps ({', '.join(f'{k}: {v}' for k, v in FAMILIES.items())})")
    if config.get("quantization_config"):
        problems.append(f"quantization_config {config['quantization_config'].get('quant_method', '?')!r}: "
                        "quantized weights (save the model in float32/bfloat16 first)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (the family's MLP is SwiGLU: silu)")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta, scaling = rope_settings(config)
    fields = {
        "num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
        "ffn_hidden_size": config["intermediate_size"], "num_attention_heads": heads,
        "group_query_attention": kv_heads != heads, "num_query_groups": kv_heads if kv_heads != heads else None,
        "kv_channels": head_dim if head_dim * heads != config["hidden_size"] else None,
        "max_position_embeddings": config["max_position_embeddings"], "position_embedding_type": "rope",
        "rotary_base": int(theta), "rotary_percent": 1.0, "swiglu": True, "normalization": "RMSNorm",
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
        "hidden_dropout": 0.0, "attention_dropout": float(config.get("attention_dropout", 0.0)),
        "qk_layernorm": model_type == "qwen3", "use_rope_scaling": False,
    }
    if theta != int(theta):
        problems.append(f"rope_theta {theta} is not an integer (--rotary-base is)")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor {config['partial_rotary_factor']}")
    if scaling:
        kind = scaling["rope_type"]
        if kind != "llama3":
            problems.append(f"rope scaling {kind!r} (only Llama 3.1's 'llama3' maps onto megatron-core)")
        else:
            differ = {k: scaling.get(k) for k, v in LLAMA3_CONSTANTS.items() if float(scaling.get(k, v)) != v}
            if differ:
                problems.append(f"llama3 rope scaling with {differ}: megatron-core fixes {LLAMA3_CONSTANTS}")
            fields.update(use_rope_scaling=True, rope_scaling_factor=float(scaling.get("factor", 8.0)))
    fields.update(_bias_fields(model_type, config, problems))
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", model_type == "mistral")
    if window is not None and uses_window and window < config["max_position_embeddings"]:
        problems.append(f"sliding_window {window} < max_position_embeddings {config['max_position_embeddings']}: "
                        "megatron-core's local attention has no sliding window")
    layer_types = set(config.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        problems.append(f"layer_types {sorted(layer_types)} (only full attention maps)")
    if problems:
        raise ImportRefused(f"{source}: cannot import this {FAMILIES[model_type]} exactly:\n  " + "\n  ".join(problems))
    return fields
