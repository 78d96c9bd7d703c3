"""Progress bars that stay quiet when output is not a terminal (CI logs, Kedro log files)."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", mode: str = "auto", **kwargs: Any) -> tqdm:
    """tqdm bar; mode 'auto' shows it only on a TTY, 'always'/'never' force it (FOOD_MULTIDS_PROGRESS too)."""
    mode = os.environ.get("FOOD_MULTIDS_PROGRESS", mode)
    disable = {"always": False, "never": True}.get(mode, not sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
