"""Several machines on the engines people already run: what every node agrees on, and the store they meet in.

`training.nodes.launch: slurm`: Kedro runs in the batch script on the first node and each multi-process
step is a job step (`srun ... torchrun`, launch.py): SLURM starts, signals and ends every node's share.

`training.nodes.launch: torchrun` (Kubernetes Indexed Job, PyTorchJob/TrainJob, bare machines): node 0 runs
`kedro run`, every other node runs `food-multids node-worker`. Kedro holds a small c10d TCPStore at the
master address and port for the whole run (node_zero.py). Each worker connects to it, claims its node rank
(a second process for the same rank is refused, by name), counts a heartbeat there every second, and
waits for node 0's steps: each step is one record in the store (module, spec, processes per node, port),
which every node runs as `torchrun --node-rank K` with torchrun's static rendezvous on the step's port
(the master port + 1 or + 2, alternating, so that no node attaches to the previous step's store). A
final record carries node 0's result; the workers exit 0 or 1 with it (node_worker.py). Nothing on the
shared file system carries coordination or liveness; the launch folders hold the steps' inputs only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from food_multids.config import TrainConfig

logger = logging.getLogger(__name__)

SUPERVISOR_ENV = "FOOD_MULTIDS_SUPERVISOR_PID"  # the process the ranks die with (kedro or the node worker)
DEFAULT_PORT = 29500
BEAT_S = 1.0
STOP_GRACE_S = 300  # a signal: how long torchrun lets the ranks agree on a step and save before it kills them
STORE_PREFIX = "food_multids"
# Environment variables a scheduler sets, most specific first: torchrun's own (PET_*, as a PyTorchJob sets
# them), the plain names, SLURM's, a Kubernetes Indexed Job's completion index (the pod's place in the job).
NODE_RANK_VARS = ("PET_NODE_RANK", "NODE_RANK", "SLURM_NODEID", "JOB_COMPLETION_INDEX")
NUM_NODES_VARS = ("PET_NNODES", "NNODES", "SLURM_NNODES")
MASTER_ADDR_VARS = ("PET_MASTER_ADDR", "MASTER_ADDR")
MASTER_PORT_VARS = ("PET_MASTER_PORT", "MASTER_PORT")


class NodeFailure(RuntimeError):
    """A multi-node launch failed: a node never came, was lost, or its processes failed."""


@dataclass(frozen=True)
class NodePlan:
    """What every node of a launch agrees on; node 0 works it out and hands it to the others in the store."""

    num_nodes: int
    procs_per_node: int
    master_addr: str
    master_port: int

    def ranks_of(self, node: int) -> list[int]:
        return list(range(node * self.procs_per_node, (node + 1) * self.procs_per_node))

    def node_of(self, rank: int) -> int:
        return rank // self.procs_per_node

    def step_port(self, index: int) -> int:
        """torchrun's rendezvous port of node 0's step `index` (0, 1, ...): the master port is the run's store."""
        return self.master_port + 1 + index % 2


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


def resolve_plan(training: TrainConfig, procs_per_node: int) -> NodePlan:
    """Node count, master address and port: settings first, then the scheduler's environment (on node 0)."""
    nodes = training.nodes
    problems = []
    num_nodes = nodes.num_nodes
    if num_nodes is None:
        found = _from_env(NUM_NODES_VARS)
        if found is None:
            problems.append("training.nodes.num_nodes is not set and none of PET_NNODES, NNODES, SLURM_NNODES is in "
                            "the environment: say how many nodes take part")
        else:
            num_nodes = _as_int(*found)
    here = env_node_rank()
    if here is not None and here[0] != 0:
        problems.append(f"this machine is node {here[0]} ({here[1]}={here[0]}), but `kedro run` runs on node 0 only: "
                        "run `food-multids node-worker` on the other nodes")
    found = _from_env(MASTER_ADDR_VARS)
    master_addr = nodes.master_addr or (found and found[1]) or slurm_first_host() or socket.gethostname()
    found = _from_env(MASTER_PORT_VARS)
    port = training.master_port or (_as_int(*found) if found else DEFAULT_PORT)
    if problems:
        raise NodeFailure("; ".join(problems))
    return NodePlan(num_nodes, procs_per_node, master_addr, port)


def exit_with_supervisor(poll_s: float = 2.0) -> None:
    """In a rank: a daemon thread that ends this process once its node's supervisor is gone.

    The node's torchrun gets SIGTERM when its starter dies (die_with_parent), but a SIGTERM makes ranks
    finish the step they agree on first, and a torchrun killed outright leaves its ranks behind: this
    watch ends them within seconds, so that a supervisor killed outright (SIGKILL, out of memory) never
    leaves ranks training, and writing checkpoints, behind the back of whoever restarts the run. torchrun
    then stops the node's other ranks, as for any rank that fails.
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


def connect_store(host: str, port: int, timeout_s: float, *, is_master: bool = False):
    """The run's c10d TCPStore (node 0 holds it: `is_master`), under the project's key prefix. Its calls
    time out after `timeout_s`; a client connecting to a master that is not there yet retries that long."""
    from torch.distributed import PrefixStore, TCPStore

    store = TCPStore(host, port, is_master=is_master, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=timeout_s))
    return PrefixStore(STORE_PREFIX, store)


def read_record(store, key: str) -> dict | None:
    """A JSON record another node set, or None while it is not there (never blocks)."""
    if not store.check([key]):
        return None
    return json.loads(store.get(key))


def die_with_parent(signum: int = signal.SIGTERM):
    """A preexec_fn: the child (a node's torchrun agent) gets `signum` when the process that started it dies,
    however it dies (SIGKILL, out of memory), and stops its ranks; they never train on unwatched. prctl is
    looked up here, in the parent: between fork and exec the child only calls it (no dlopen, no lock)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, int(signum))
        if os.getppid() != parent:  # the parent died between fork and prctl: the signal will never come
            os.kill(os.getpid(), signum)

    return set_pdeathsig


def stop_tree(proc: subprocess.Popen) -> None:
    """End a launcher and every process under it at once (SIGKILL): after a failure, or past the grace a
    signal gave the ranks (the graceful part is stop_gracefully)."""
    import psutil

    try:
        family = [*psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in [*family, psutil.Process(proc.pid) if proc.poll() is None else None]:
        if p is None:
            continue
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def signal_ranks(proc: subprocess.Popen, signum: int) -> None:
    """A signal once to each rank of a torchrun agent (its children), not to the agent: the ranks stop at an
    agreed step with their checkpoint and exit 0, and torchrun ends quietly instead of reporting its own
    signal with a traceback. The agent itself gets it only while it has no ranks (still starting)."""
    import psutil

    try:
        ranks = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return
    for rank in ranks:
        try:
            rank.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    if not ranks and proc.poll() is None:
        proc.send_signal(signum)


def stop_gracefully(proc: subprocess.Popen, signum: int,
                    send: Callable[[subprocess.Popen, int], None] = signal_ranks) -> None:
    """The one stop path of every launch (one machine, a SLURM step, node 0 of a torchrun run): the signal Kedro
    got, passed on once (`send`: to the ranks by default), then up to STOP_GRACE_S for the ranks to agree on a
    step, save and stop; whatever is left then is killed. SIGINT and SIGTERM are ignored meanwhile: a second
    Ctrl-C must not end Kedro in the middle of the ranks' checkpoint."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if proc.poll() is None:
            send(proc, signum)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.error("The ranks did not stop within %d s of the signal: killed", STOP_GRACE_S)
            stop_tree(proc)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def ranks_text(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
