"""The DeepSpeed launcher's path: a leaf module (the single-machine launch and each node's share of a
per_node launch both need it; neither imports the other for it)."""

from __future__ import annotations

import os
import shutil
import sys


def deepspeed_launcher() -> str:
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if launcher is None:
        raise FileNotFoundError("the `deepspeed` launcher is not on PATH; install deepspeed in this environment")
    return launcher
