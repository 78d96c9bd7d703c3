"""Several machines without ssh between them (`training.nodes.launch: per_node`), as SLURM and Kubernetes run jobs.

Every node starts a process of its own: node 0 runs `kedro run` (data nodes once, then each multi-process
step), the others run `food-multids node-worker`. They meet in `<training.output_dir>/nodes/`, which must be
on storage every node sees at the same path:

  nodes/board.json            node 0's run: started (session), a launch open (join it) or closed, finished
  nodes/<launch id>/hostfile  the DeepSpeed hostfile of the launch (names only: no ssh is used)
  nodes/<launch id>/node-K.json
                              node K's heartbeat (a counter written every second) and its state
  nodes/<launch id>/joined-rank-R
                              written by rank R once it is in the process group

Each node starts `deepspeed --no_ssh --node_rank K --hostfile ... --master_addr A --master_port P` over
the same launch folder, and watches the others: a node that never shows up, a rank that cannot join
within `join_timeout_s`, or a node whose heartbeat stops for `lost_after_s` stops the run on every node
with a message naming the nodes and ranks, instead of a collective that waits forever. Heartbeats are
compared by their counter against this machine's own clock, so the nodes' clocks need not agree.
This module: the plan, the board and the ranks' side; node_supervisor.py: one node's share of a launch;
node_worker.py: the `food-multids node-worker` loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from food_multids.config import ProjectConfig
from food_multids.runtime.files import write_json_atomic

logger = logging.getLogger(__name__)

BOARD = "board.json"
NODE_DIR_ENV = "FOOD_MULTIDS_NODE_DIR"  # set for the ranks of a per_node launch: where they report joining
SUPERVISOR_ENV = "FOOD_MULTIDS_SUPERVISOR_PID"  # the process the ranks die with (kedro or the node worker)
DEFAULT_PORT = 29500
BEAT_S = 1.0
KEEP_LAUNCHES = 4  # launch folders kept on the board besides the current one (a few hundred bytes each)
# Environment variables a scheduler sets, most specific first: torchrun's names, SLURM's, a Kubernetes
# Indexed Job's completion index (the pod's place in the job).
NODE_RANK_VARS = ("NODE_RANK", "SLURM_NODEID", "JOB_COMPLETION_INDEX")
NUM_NODES_VARS = ("NNODES", "SLURM_NNODES")


class NodeFailure(RuntimeError):
    """A per_node launch failed: a node never came, was lost, or its processes failed."""


@dataclass(frozen=True)
class NodePlan:
    """What every node of a launch agrees on; node 0 works it out and posts it."""

    num_nodes: int
    procs_per_node: int
    master_addr: str
    master_port: int

    def ranks_of(self, node: int) -> list[int]:
        return list(range(node * self.procs_per_node, (node + 1) * self.procs_per_node))

    def node_of(self, rank: int) -> int:
        return rank // self.procs_per_node

    def hostfile_text(self) -> str:
        # DeepSpeed's launcher reads the node list from a hostfile; with --no_ssh the names only order them.
        return "".join(f"node-{k} slots={self.procs_per_node}\n" for k in range(self.num_nodes))


def _from_env(names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return name, value
    return None


def _as_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise NodeFailure(f"the environment variable {name}={value!r} is not an integer") from None


def env_node_rank() -> tuple[int, str] | None:
    """This node's rank from the scheduler's environment, and the variable it came from."""
    found = _from_env(NODE_RANK_VARS)
    return None if found is None else (_as_int(*found), found[0])


def slurm_first_host() -> str | None:
    """The first node of a SLURM allocation (node 0 of `srun`), via `scontrol show hostnames`."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    scontrol = shutil.which("scontrol")
    if not nodelist or scontrol is None:
        return None
    out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    names = out.stdout.split()
    return names[0] if out.returncode == 0 and names else None


def resolve_plan(cfg: ProjectConfig, procs_per_node: int) -> NodePlan:
    """Node count, master address and port: settings first, then the scheduler's environment (on node 0)."""
    nodes = cfg.training.nodes
    problems = []
    num_nodes = nodes.num_nodes
    if num_nodes is None:
        found = _from_env(NUM_NODES_VARS)
        if found is None:
            problems.append("training.nodes.num_nodes is not set and neither NNODES nor SLURM_NNODES is in the "
                            "environment: say how many nodes take part")
        else:
            num_nodes = _as_int(*found)
    here = env_node_rank()
    if here is not None and here[0] != 0:
        problems.append(f"this machine is node {here[0]} ({here[1]}={here[0]}), but `kedro run` runs on node 0 only: "
                        "run `food-multids node-worker --output-dir <training.output_dir>` on the other nodes")
    master_addr = nodes.master_addr or os.environ.get("MASTER_ADDR") or slurm_first_host() or socket.gethostname()
    port = cfg.training.master_port or _as_int("MASTER_PORT", os.environ.get("MASTER_PORT") or str(DEFAULT_PORT))
    if problems:
        raise NodeFailure("; ".join(problems))
    return NodePlan(num_nodes, procs_per_node, master_addr, port)


def board_dir(cfg: ProjectConfig) -> Path:
    return cfg.training.resolved_output_dir() / "nodes"


def read_json(path: Path) -> dict | None:
    """A JSON file another node writes (atomically); None while it does not exist yet."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # not there yet, a stale NFS handle, a half-copied file: next time
        return None


# The board this Kedro run announced itself on, and its session id (hooks.py opens and finishes it).
_session: dict = {"id": None, "board": None}


def open_session(board: Path) -> None:
    """Announce node 0's run before its first node: a worker then knows a run is on, and a launch left
    over from a crashed earlier run is replaced."""
    board.mkdir(parents=True, exist_ok=True)
    _session.update(id=uuid.uuid4().hex[:12], board=board)
    write_json_atomic(board / BOARD, {"state": "session", "session": _session["id"], "started_at": time.time()})


def session_id(board: Path) -> str:
    if _session["board"] != board:  # a launch outside a Kedro run (a script calling the nodes)
        open_session(board)
    return _session["id"]


def finish_sessions(ok: bool, message: str = "") -> None:
    """Tell the node workers that node 0's run ended (they exit, 0 if it succeeded)."""
    if _session["board"] is not None:
        write_json_atomic(_session["board"] / BOARD, {"state": "finished", "session": _session["id"], "ok": ok,
                                                      "message": message[:2000], "finished_at": time.time()})
    _session.update(id=None, board=None)


def mark_joined(rank: int) -> None:
    """Called by each rank right after it joined the process group (see device.init_distributed)."""
    folder = os.environ.get(NODE_DIR_ENV)
    if folder:
        (Path(folder) / f"joined-rank-{rank}").write_text(str(os.getpid()))


def exit_with_supervisor(poll_s: float = 2.0) -> None:
    """In a rank: a daemon thread that ends this process once its node's supervisor is gone.

    The launcher runs in a session of its own (so that a lost node can be stopped as a whole), so a
    supervisor killed outright (SIGKILL, out of memory) would otherwise leave its ranks training, and
    writing checkpoints, behind the back of whoever restarts the run. DeepSpeed's launcher then stops the
    node's other ranks, as for any rank that fails.
    """
    import threading

    pid = int(os.environ.get(SUPERVISOR_ENV) or 0)
    if not pid:
        return

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.error("The node's supervisor (process %d: kedro run or food-multids node-worker) is gone: "
                             "this rank stops", pid)
                os._exit(70)
            except PermissionError:  # alive, owned by someone else (cannot happen for our own parent)
                pass

    threading.Thread(target=watch, name="exit-with-supervisor", daemon=True).start()


