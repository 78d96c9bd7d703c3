"""Run the data + train nodes for a parameters JSON in a fresh process; write the result JSON.

    python tests/training/driver.py params.json result.json
Used by the tests that kill a training process or need a process of their own.
"""

import json
import sys

from food_multids.pipelines import node_sections
from food_multids.pipelines.data.nodes import run_data_nodes
from food_multids.pipelines.train.nodes import train_deepspeed


def main(params_file: str, result_file: str) -> None:
    import logging

    logging.basicConfig(level=logging.INFO)
    params = json.loads(open(params_file).read())
    train_set, _, subset, full = run_data_nodes(params)
    history, manifest = train_deepspeed(train_set, subset, full, **node_sections(train_deepspeed, params))
    with open(result_file, "w") as fh:
        json.dump({"history": history, "manifest": manifest}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:3])
