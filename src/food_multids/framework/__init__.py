"""The Kedro/MLflow shell around the library: what a `kedro run` prints and links at its end."""
