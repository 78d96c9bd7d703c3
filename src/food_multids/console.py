"""`food-multids` command: prepare the embedded demo (datasets + tiny local Qwen2.5-VL)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from food_multids.paths import find_project_root

DEMO_DATA = Path("data/01_raw/demo")
TINY_MODEL = Path("data/06_models/tiny_qwen2_5_vl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="food-multids", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the demo datasets and the tiny model (idempotent)")
    demo.add_argument("--force", action="store_true", help="rewrite even if present")
    tiny = sub.add_parser("build-tiny-model", help="write a tiny random-weight Qwen2.5-VL checkpoint")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from food_multids.demo import write_demo
    from food_multids.model.factory import build_tiny_model_dir

    if args.command == "demo":
        root = find_project_root()
        write_demo(root / DEMO_DATA, force=args.force)
        if args.force or not (root / TINY_MODEL / "config.json").is_file():
            build_tiny_model_dir(root / TINY_MODEL)
    else:
        build_tiny_model_dir(args.out, seed=args.seed, hidden=args.hidden)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
