"""The Kedro pipelines: one package per pipeline (nodes.py, pipeline.py); pipeline_registry.py assembles them."""


def section_inputs(sections: tuple[str, ...]) -> list[str]:
    """A node's parameter inputs: `params:<section>` for each section it reads (kedro-viz draws each one)."""
    return [f"params:{name}" for name in sections]
