"""megatron-anchor: annotation-anchored pretraining and fine-tuning on megatron-core."""

__version__ = "0.1.0"
