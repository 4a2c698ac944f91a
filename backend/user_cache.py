"""Where glmchat keeps what it can rebuild (demo models, kernel tunings): a leaf module, so the kernels can ask
for it without importing anything above them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def cache_root(cache_dir: Union[str, Path, None] = None) -> Path:
    """``cache_dir``, else $GLMCHAT_CACHE_DIR, else the user cache dir (platformdirs)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("GLMCHAT_CACHE_DIR"):
        return Path(os.environ["GLMCHAT_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("glmchat"))
