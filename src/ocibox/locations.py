"""Where ocibox keeps things, from the environment only (imported by every command: keep it tiny)."""

from __future__ import annotations

import os


def default_root() -> str:
    """The store: $OCIBOX_ROOT, else $XDG_DATA_HOME/ocibox, else ~/.local/share/ocibox."""
    if root := os.environ.get("OCIBOX_ROOT"):
        return root
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "ocibox")
