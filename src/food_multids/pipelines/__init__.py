"""The Kedro pipelines: one package per pipeline (nodes.py, pipeline.py); pipeline_registry.py assembles them."""


def section_inputs(sections: tuple[str, ...]) -> list[str]:
    """A node's parameter inputs: `params:<section>` for each section it reads (kedro-viz draws each one)."""
    return [f"params:{name}" for name in sections]


def node_sections(node, parameters: dict) -> dict:
    """What Kedro passes `node` from a whole `parameters` dict, as keyword arguments: the sections its
    arguments name (`model`, `training`, ...). For scripts, notebooks, benchmarks and tests that call a
    node function directly: `train_deepspeed(train_set, subset, full, **node_sections(train_deepspeed, params))`.
    Whole sections only: the data nodes also take single keys (num_labels, seed): run_data_nodes runs them."""
    import inspect

    from food_multids.config import TOP_LEVEL_KEYS

    return {name: parameters.get(name) for name in inspect.signature(node).parameters if name in TOP_LEVEL_KEYS}
