"""`food-multids` command: prepare the embedded demo (datasets + tiny local Qwen2.5-VL), and run the
pipelines on the original trainer's YAML file (`food-multids train --config FILE`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from food_multids.config.paths import find_project_root
from food_multids.console import predict as predict_cli
from food_multids.model.backbones import SUPPORTED

DEMO_DATA = Path("data/01_raw/demo")
TINY_MODEL = Path("data/06_models/tiny_qwen2_5_vl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="food-multids", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the demo datasets and the tiny model (idempotent)")
    demo.add_argument("--force", action="store_true", help="rewrite even if present")
    tiny = sub.add_parser("build-tiny-model", help="write a tiny random-weight checkpoint of a backbone family")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--family", default="qwen2_5_vl", choices=SUPPORTED, help="config.json model_type")
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--seed", type=int, default=0)
    export = sub.add_parser("export", help="write a LoRA classifier as an ordinary one (adapters merged)")
    export.add_argument("model", help="a classifier folder with LoRA adapters, or as `predict` takes it: best, "
                                      "best:<version>, models:/<name>/<version>, runs:/<run id>/model")
    export.add_argument("out", type=Path, help="the new folder")
    export.add_argument("--merge", action="store_true", required=True, help="merge the adapters into the weights")
    export.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights of the export (default float32: bf16 can round small adapter changes away)")
    describe = sub.add_parser("describe", help="what a model is: its label spaces, the env and run that trained it, "
                                                "its registry tags (`make serve` prints it before serving)")
    describe.add_argument("model", help="as `predict` takes it: best, best:<version>, a folder, "
                                        "models:/<name>/<version|latest>, runs:/<run id>/model")
    predict_cli.add_parser(sub)
    node = sub.add_parser("node-worker", help="a node other than node 0 of a training.nodes.launch: torchrun run: "
                                              "run node 0's steps through torchrun until its run ends")
    node.add_argument("--node-rank", type=int, default=None,
                      help="this node's rank, 1..N-1 (default: PET_NODE_RANK, NODE_RANK, SLURM_NODEID or "
                           "JOB_COMPLETION_INDEX)")
    node.add_argument("--master-addr", default=None,
                      help="node 0's address, where its kedro run holds the run's store (default: PET_MASTER_ADDR, "
                           "MASTER_ADDR, SLURM's first node)")
    node.add_argument("--master-port", type=int, default=None,
                      help="node 0's training.master_port (default: PET_MASTER_PORT, MASTER_PORT, else 29500); "
                           "the steps use the next two ports too")
    node.add_argument("--nnodes", type=int, default=None,
                      help="the number of nodes, checked against node 0's (default: PET_NNODES, NNODES, SLURM_NNODES)")
    node.add_argument("--wait-s", type=float, default=3600.0,
                      help="give up when node 0 is not reachable, or starts no step, for this long (default 3600: "
                           "node 0 prepares the data first)")
    node.add_argument("--output-dir", type=Path, default=None, help=argparse.SUPPRESS)  # per_node's, ignored
    for command, pipeline in PIPELINE_COMMANDS.items():
        run = sub.add_parser(command, help=f"`kedro run --pipelines {pipeline}` with a YAML file's parameters "
                                           "layered over conf/base (the original trainer's --config)")
        run.add_argument("--config", type=Path, required=True, help="the trainer's YAML file (model/data/datasets/...)")
        run.add_argument("--params", default="", help="key=value overrides on top, as `kedro run --params`")
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict_cli.run(args)
    if args.command == "node-worker":
        return run_node_worker(args)
    if args.command == "describe":
        # Reading an MLflow model imports Kedro, whose logging setup announces itself at import: `make serve`
        # prints this description first, which should start with the model.
        logging.disable(logging.INFO)
        try:
            import kedro.framework.project  # noqa: F401
        finally:
            logging.disable(logging.NOTSET)
        try:
            sys.stdout.write(describe_model(args.model, find_project_root()) + "\n")
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        except click.ClickException as exc:  # a damaged MLflow store behind a models:/ URI
            parser.error(exc.format_message())
        return 0
    if args.command == "export":
        from food_multids.model.export import export_merged

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            # The same names as `food-multids predict`: the catalog's best_model versions and MLflow URIs.
            model = predict_cli.resolve_model(args.model, find_project_root())
            merged = export_merged(model, args.out, args.dtype)
        except (OSError, ValueError) as exc:  # not found, not empty, a full disk, read-only, not a LoRA model
            parser.error(str(exc))
        except click.ClickException as exc:  # a damaged MLflow store behind a models:/ URI
            parser.error(exc.format_message())
        logging.getLogger(__name__).info("Merged %d adapted layers: %s is an ordinary classifier folder", merged,
                                         args.out)
        return 0
    if args.command in PIPELINE_COMMANDS:
        if not args.config.is_file():
            parser.error(f"--config {args.config}: no such file")
        return run_with_config(PIPELINE_COMMANDS[args.command], args.config, args.params)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from food_multids.data.demo import write_demo
    from food_multids.model.tiny import build_tiny_model_dir

    if args.command == "demo":
        root = find_project_root()
        write_demo(root / DEMO_DATA, force=args.force)
        if args.force or not (root / TINY_MODEL / "config.json").is_file():
            build_tiny_model_dir(root / TINY_MODEL)
    else:
        build_tiny_model_dir(args.out, family_name=args.family, seed=args.seed, hidden=args.hidden)
    return 0


def describe_model(spec: str, root: Path) -> str:
    """Lines naming the model behind `spec`: folder, label spaces, training env/run/step, registry version."""
    import json

    from food_multids.model.classifier import TRAINING_INFO, label_spaces_of

    folder = predict_cli.resolve_model(spec, root)
    spaces = label_spaces_of(folder)
    info_file = folder / TRAINING_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    lines = [f"Model {spec}: {folder}",
             "  label spaces: " + ", ".join(f"{name} ({count} classes)"
                                            for name, (_, count) in sorted(spaces.items(), key=lambda i: i[1][0])),
             f"  trained in the Kedro env '{info.get('kedro_env', '?')}', MLflow run {info.get('mlflow_run_id', '?')}, "
             f"best step {info.get('step', '?')} ({info.get('finetuning', '?')} fine-tuning of "
             f"{Path(str(info['backbone'])).name if info.get('backbone') else '?'})"]
    if spec.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        from food_multids.pipelines.predict.serving import TAG

        name, _, wanted = spec[len("models:/"):].partition("/")
        client = MlflowClient()
        versions = client.search_model_versions(f"name='{name}'")
        found = max(versions, key=lambda v: int(v.version)) if wanted == "latest" else \
            next((v for v in versions if str(v.version) == wanted), None)
        if found is not None:
            accuracy = (found.tags or {}).get(TAG + "final_overall_accuracy")
            lines.append(f"  registered model '{name}' version {found.version} of {len(versions)}"
                         + (f", final overall accuracy {accuracy}" if accuracy else ", not fully evaluated yet"))
    return "\n".join(lines)


def run_node_worker(args: argparse.Namespace) -> int:
    import os

    # c10d's C++ warnings (a dump of frames when node 0's store goes away) would bury the one-line message.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from food_multids.runtime.cluster import NodeFailure
    from food_multids.runtime.node_worker import resolve_settings, serve

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log = logging.getLogger(__name__)
    if args.output_dir is not None:
        log.warning("node-worker: --output-dir is no longer used (node 0 is found at --master-addr/--master-port, "
                    "not through files); drop it")
    try:
        # SIGTERM (a scheduler cancelling the job) reaches this node's ranks once, as it would under kedro run.
        message = serve(resolve_settings(args.node_rank, args.master_addr, args.master_port, args.nnodes,
                                         args.wait_s))
    except (NodeFailure, FileNotFoundError) as exc:
        log.error("node-worker: %s", exc)
        return 1
    log.info("node-worker: %s", message)
    return 0


PIPELINE_COMMANDS = {"train": "train", "full-eval": "full_eval", "run": "__default__"}


@contextlib.contextmanager
def config_as_env(root: Path, config: Path) -> Iterator[tuple[Path, str]]:
    """A conf folder in which `config` is a Kedro env: base is the project's conf/base, the env holds the
    file (both links, nothing copied). Yields (conf_source, env), the env named after the file."""
    env = re.sub(r"[^A-Za-z0-9_-]", "_", config.stem) or "config"
    env = "config" if env in ("base", "local") else env
    with tempfile.TemporaryDirectory(prefix="food-multids-conf-") as tmp:
        conf = Path(tmp)
        (conf / "base").symlink_to(root / "conf" / "base", target_is_directory=True)
        (conf / env).mkdir()
        (conf / env / "parameters.yml").symlink_to(config.resolve())
        yield conf, env


def run_with_config(pipeline: str, config: Path, params: str) -> int:
    """Exactly `kedro run --env <the file> --pipelines <pipeline>`, through Kedro's session API."""
    import click
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.runner import SequentialRunner
    from omegaconf import OmegaConf

    root = find_project_root()
    bootstrap_project(root)
    runtime = OmegaConf.to_container(OmegaConf.from_dotlist([p.strip() for p in params.split(",") if p.strip()]))
    with config_as_env(root, config) as (conf_source, env):
        logging.getLogger(__name__).info("Parameters: conf/base/parameters.yml, then %s (as Kedro env '%s')",
                                         config.resolve(), env)
        try:
            with KedroSession.create(root, env=env, conf_source=str(conf_source), runtime_params=runtime) as session:
                session.run(pipeline_names=[pipeline], runner=SequentialRunner())  # what `kedro run` uses
        except click.ClickException as exc:  # a configuration problem: the message is the whole story
            exc.show()
            return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
