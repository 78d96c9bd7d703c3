"""Kedro project settings: a layered config loader with a project_root resolver; kedro-mlflow hooks via plugins."""

import warnings

from food_multids.config_loader import LayeredConfigLoader
from food_multids.hooks import PreflightHooks, ProjectHooks
from food_multids.paths import find_project_root


def _project_root(*_: object) -> str:
    return find_project_root().as_posix()


# Third-party noise printed four times on every `kedro run`: omegaconf's resolver API as Kedro and
# kedro-mlflow call it.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)

HOOKS = (PreflightHooks(), ProjectHooks())
# Telemetry asks for consent interactively; the project never sends it.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-telemetry",)

# Parameters are layered: conf/<env>/parameters.yml overrides only the keys it names (config_loader.py).
CONFIG_LOADER_CLASS = LayeredConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"project_root": _project_root},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
}
