"""Third-party warnings that every `kedro` command would print, silenced where they are raised.

Called from settings.py, which Kedro imports (bootstrap_project) before it loads the plugins' commands:
kedro-mlflow's command module defines KedroPipelineModel, and MLflow warns about its predict method's
missing type hints (with raw ANSI codes) when the class is defined. Importing it here first, with the
warning recorded and dropped, defines the class once, quietly; every later import finds it defined.
"""

from __future__ import annotations

import warnings


def quiet_third_party_imports() -> None:
    # omegaconf's resolver API as Kedro and kedro-mlflow call it: printed four times per `kedro run`.
    warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        import kedro_mlflow.mlflow  # noqa: F401 - defines KedroPipelineModel under the recording
