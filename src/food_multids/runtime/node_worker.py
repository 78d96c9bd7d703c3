"""`food-multids node-worker`: a node other than node 0 of a per_node run (see runtime/nodes.py).

It waits for node 0's launches on the board in `<training.output_dir>/nodes/`, joins each one through
the DeepSpeed launcher with its own node rank, and exits when node 0's run ends: 0 if it succeeded,
1 if it failed, was lost, or nothing came within `--wait-s`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from food_multids.config.paths import find_project_root
from food_multids.runtime.launch import launcher_env
from food_multids.runtime.node_supervisor import NodeSupervisor
from food_multids.runtime.nodes import BOARD, NodeFailure, NodePlan, env_node_rank, read_json

logger = logging.getLogger(__name__)
POLL_S = 1.0


def resolve_node_rank(explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    found = env_node_rank()
    if found is None:
        raise NodeFailure("no node rank: pass --node-rank, or set NODE_RANK (SLURM sets SLURM_NODEID, a Kubernetes "
                          "Indexed Job JOB_COMPLETION_INDEX)")
    return found[0]


def serve_launches(output_dir: Path, node_rank: int, wait_s: float) -> None:
    """Join node 0's launches until its run ends; raise NodeFailure on any failure or timeout."""
    if node_rank < 1:
        raise NodeFailure(f"node rank {node_rank}: node 0 runs `kedro run` itself; workers are nodes 1, 2, ...")
    board = output_dir / "nodes"
    initial = read_json(board / BOARD)  # what a finished earlier run left: not this run's end
    joined_sessions: set[str] = set()
    seen: set[str] = set()
    deadline = time.monotonic() + wait_s
    logger.info("Node %d: waiting for node 0's launches in %s", node_rank, board)
    while True:
        record = read_json(board / BOARD)
        if record and record.get("state") == "finished" and (
                record.get("session") in joined_sessions or record != initial):
            if record.get("ok"):
                logger.info("Node %d: node 0's run finished", node_rank)
                return
            raise NodeFailure(f"node 0's run failed: {record.get('message') or 'see its log'}")
        if record and record.get("state") == "open" and record["id"] not in seen:
            seen.add(record["id"])
            if _poster_alive(board / record["id"], record["timeouts"]["lost_after_s"]):
                _join(board / record["id"], record, node_rank)
                joined_sessions.add(record["session"])
                deadline = time.monotonic() + wait_s
            else:
                logger.warning("Ignoring launch %s: node 0 is not running it (it ended, or was left over from an "
                               "earlier run)", record["id"])
        if time.monotonic() > deadline:
            raise NodeFailure(
                f"no launch from node 0 appeared in {board} within {wait_s:.0f} s (--wait-s): is `kedro run` running "
                "on node 0 with training.nodes.launch: per_node and this training.output_dir, on storage both "
                "nodes share?" if not joined_sessions else
                f"node 0 posted no further launch and did not finish within {wait_s:.0f} s (--wait-s)")
        time.sleep(POLL_S)


def _poster_alive(node_dir: Path, within_s: float) -> bool:
    """Node 0's heartbeat for this launch changes within `within_s` (usually a second; longer where a network
    file system caches what it reads); a left-over post's never does."""
    first = read_json(node_dir / "node-0.json")
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        time.sleep(POLL_S / 2)
        now = read_json(node_dir / "node-0.json")
        if now and now.get("state") in ("done", "failed", "stopped"):
            return False
        if now and (first is None or now["beat"] != first["beat"]):
            return True
    return False


def _join(node_dir: Path, record: dict, node_rank: int) -> None:
    plan = NodePlan(**record["plan"])
    if node_rank >= plan.num_nodes:
        raise NodeFailure(f"this is node {node_rank}, but node 0's launch {record['id']} has {plan.num_nodes} nodes "
                          f"(0..{plan.num_nodes - 1}): check training.nodes.num_nodes / NNODES / SLURM_NNODES")
    supervisor = NodeSupervisor(node_dir, record, node_rank)
    env = launcher_env(record["project_root"] or str(find_project_root()))
    logger.info("Node %d: joining launch %s (%d nodes x %d processes, master %s:%d)", node_rank, record["id"],
                plan.num_nodes, plan.procs_per_node, plan.master_addr, plan.master_port)
    supervisor.run(env)
    logger.info("Node %d: launch %s done", node_rank, record["id"])
