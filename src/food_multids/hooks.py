"""Project hooks: pin the project root so every relative path resolves the same way."""

from __future__ import annotations

import os

from kedro.framework.hooks import hook_impl


class ProjectHooks:
    @hook_impl
    def after_context_created(self, context) -> None:
        # Nodes, training subprocesses and notebooks resolve relative parameters against this folder,
        # whatever the current directory is.
        os.environ["FOOD_MULTIDS_PROJECT_ROOT"] = str(context.project_path)
