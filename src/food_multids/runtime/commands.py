"""The launchers' paths: a leaf module (the single-machine launch, a SLURM job step and each node's torchrun
all need one; none imports the others for it)."""

from __future__ import annotations

import os
import shutil
import sys


def deepspeed_launcher() -> str:
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if launcher is None:
        raise FileNotFoundError("the `deepspeed` launcher is not on PATH; install deepspeed in this environment")
    return launcher


def torchrun_launcher() -> str:
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if launcher is None:
        raise FileNotFoundError("`torchrun` (installed with torch) is not on PATH")
    return launcher
