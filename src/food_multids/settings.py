"""Kedro project settings: a layered config loader with a project_root resolver; kedro-mlflow hooks via plugins."""

from food_multids.framework.quiet import quiet_third_party_imports

quiet_third_party_imports()  # before the other imports: Kedro imports this module before the plugins load

from food_multids.config.paths import find_project_root  # noqa: E402
from food_multids.framework.config_loader import LayeredConfigLoader  # noqa: E402
from food_multids.framework.hooks import PreflightHooks, ProjectHooks  # noqa: E402


def _project_root(*_: object) -> str:
    return find_project_root().as_posix()


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
