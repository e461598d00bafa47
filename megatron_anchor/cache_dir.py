"""The project's cache directory: ``$MEGATRON_ANCHOR_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/megatron-anchor``.

The shell scripts under ``tools/`` (``setup_vllm_cpu.sh``, ``setup_megatron_core_env.sh``) apply the same rule.
Everything kept there can be rebuilt: deleting the folder costs time, never results.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache directory (not created)."""
    base = os.environ.get("MEGATRON_ANCHOR_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "megatron-anchor"
