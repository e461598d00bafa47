"""The trainer behind ``pretrain_anchor.py``: configs, arguments, model, data, loss policies, loop, checkpoints."""
