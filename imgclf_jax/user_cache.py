"""Where imgclf_jax keeps what it can recompute: scan verdicts, compiled kernels and steps."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where imgclf_jax keeps what it can recompute (scan verdicts, compiled code): $IMGCLF_CACHE_DIR, else
    ~/.cache/imgclf_jax (under $XDG_CACHE_HOME if set)."""
    return os.environ.get("IMGCLF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imgclf_jax"
    )
