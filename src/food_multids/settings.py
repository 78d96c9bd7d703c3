"""Kedro project settings: config loader with a project_root resolver, kedro-mlflow hooks via plugins."""

from kedro.config import OmegaConfigLoader

from food_multids.hooks import ProjectHooks
from food_multids.paths import find_project_root


def _project_root(*_: object) -> str:
    return find_project_root().as_posix()


HOOKS = (ProjectHooks(),)
# Telemetry asks for consent interactively; the project never sends it.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-telemetry",)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"project_root": _project_root},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
}
