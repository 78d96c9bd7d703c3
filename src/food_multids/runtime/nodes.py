"""Several machines without ssh between them (`training.nodes.launch: per_node`), as SLURM and Kubernetes run jobs.

Every node starts a process of its own: node 0 runs `kedro run` (data nodes once, then each multi-process
step), the others run `food-multids node-worker`. They meet in `<training.output_dir>/nodes/`, which must be
on storage every node sees at the same path:

  nodes/board.json            node 0's current launch: open (join it), closed, or the run finished
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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from food_multids.config import ProjectConfig
from food_multids.interrupts import RunInterrupted
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


def run_node_zero(cfg: ProjectConfig, plan: NodePlan, cmd_tail: list[str], env: dict) -> None:
    """Post a launch on the board, run node 0's share of it, and close the post."""
    board = board_dir(cfg)
    board.mkdir(parents=True, exist_ok=True)
    launch_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    node_dir = board / launch_id
    node_dir.mkdir()
    for old in sorted(p for p in board.iterdir() if p.is_dir() and p != node_dir)[:-KEEP_LAUNCHES]:
        shutil.rmtree(old, ignore_errors=True)  # heartbeats of launches long over
    (node_dir / "hostfile").write_text(plan.hostfile_text())
    post = {"state": "open", "id": launch_id, "session": session_id(board), "plan": asdict(plan), "cmd_tail": cmd_tail,
            "project_root": env.get("FOOD_MULTIDS_PROJECT_ROOT", ""), "posted_by": socket.gethostname(),
            "timeouts": {"join_timeout_s": cfg.training.nodes.join_timeout_s,
                         "lost_after_s": cfg.training.nodes.lost_after_s}}
    supervisor = NodeSupervisor(node_dir, post, 0, cfg.training.nodes.join_timeout_s, cfg.training.nodes.lost_after_s)
    logger.info("Launch %s posted for %d more node(s) (food-multids node-worker --output-dir %s)",
                launch_id, plan.num_nodes - 1, cfg.training.resolved_output_dir())
    ok = False
    try:
        supervisor.run(env, on_started=lambda: write_json_atomic(board / BOARD, post))
        ok = True
    finally:
        write_json_atomic(board / BOARD, {**post, "state": "closed", "ok": ok})


def launcher_argv(plan: NodePlan, node_dir: Path, node_rank: int, cmd_tail: list[str]) -> list[str]:
    from food_multids.runtime.launch import deepspeed_launcher

    return [deepspeed_launcher(), "--hostfile", str(node_dir / "hostfile"), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", plan.master_addr, "--master_port", str(plan.master_port),
            "--num_gpus", str(plan.procs_per_node), *cmd_tail]


class NodeSupervisor:
    """One node's share of a launch: start the local DeepSpeed launcher and watch every node's heartbeat."""

    def __init__(self, node_dir: Path, post: dict, node_rank: int, join_timeout_s: float, lost_after_s: float,
                 stop_grace_s: float = 300.0):
        self.node_dir, self.post, self.me = node_dir, post, node_rank
        self.plan = NodePlan(**post["plan"])
        self.join_timeout_s, self.lost_after_s, self.stop_grace_s = join_timeout_s, lost_after_s, stop_grace_s
        self.beat = 0
        self.seen: dict[int, tuple[int, float, dict]] = {}  # node -> (last counter, when it changed, record)
        self.started = time.monotonic()
        self.master_reachable: bool | None = None  # probed by nodes > 0 while their ranks wait to join
        self.probed_at = 0.0

    def run(self, env: dict, on_started=lambda: None) -> None:
        cmd = launcher_argv(self.plan, self.node_dir, self.me, self.post["cmd_tail"])
        logger.info("Node %d of %d: %s", self.me, self.plan.num_nodes, " ".join(cmd))
        self._write("starting")
        # A session of its own: a lost node stops the whole local process tree at once, and the ranks
        # (blocked in a collective with the lost one) are not left behind.
        proc = subprocess.Popen(cmd, env={**env, NODE_DIR_ENV: str(self.node_dir), SUPERVISOR_ENV: str(os.getpid())},
                                start_new_session=True)
        try:
            on_started()
            while (code := proc.poll()) is None:
                self._write("running")
                problem = self._watch()
                if problem:
                    self._kill(proc)
                    self._write("failed", problem)
                    raise NodeFailure(problem)
                time.sleep(BEAT_S)
        except (RunInterrupted, KeyboardInterrupt) as exc:
            self._stop_gracefully(proc, getattr(exc, "signum", signal.SIGINT))
            raise
        except BaseException:
            self._kill(proc)  # whatever went wrong here, no rank outlives its supervisor
            raise
        if code == 0:
            self._write("done")
            return
        self._write("failed", f"the DeepSpeed launcher on node {self.me} exited with code {code}")
        raise NodeFailure(self._diagnose(code))

    def _stop_gracefully(self, proc: subprocess.Popen, signum: int) -> None:
        """A signal (Ctrl-C, a scheduler's SIGTERM): the same signal once to each rank of this node; all ranks
        then stop together at their next agreed (logging) step with a checkpoint. Peers see `stopping`, then
        `stopped`: not a failure."""
        import psutil

        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._write("stopping")
            try:  # runner -> DeepSpeed's launch.py -> the ranks (its SIGTERM would reach them twice)
                ranks = [c for child in psutil.Process(proc.pid).children() for c in child.children()]
            except psutil.NoSuchProcess:
                ranks = []
            for rank in ranks:
                try:
                    rank.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass
            deadline = time.monotonic() + self.stop_grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                self._write("stopping")
                time.sleep(BEAT_S)
            self._kill(proc)
            self._write("stopped", f"stopped by {signal.Signals(signum).name}")
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _write(self, state: str, message: str = "") -> None:
        self.beat += 1
        write_json_atomic(self.node_dir / f"node-{self.me}.json",
                          {"node": self.me, "host": socket.gethostname(), "pid": os.getpid(), "beat": self.beat,
                           "state": state, "message": message, "ranks": self.plan.ranks_of(self.me),
                           "master_reachable": self.master_reachable})

    def _refresh(self) -> None:
        now = time.monotonic()
        for node in range(self.plan.num_nodes):
            if node == self.me:
                continue
            record = read_json(self.node_dir / f"node-{node}.json")
            if record is None:
                continue
            last = self.seen.get(node)
            if last is None or last[0] != record["beat"]:
                self.seen[node] = (record["beat"], now, record)

    def _watch(self) -> str | None:
        """A reason to stop this node's processes now, or None."""
        self._refresh()
        now = time.monotonic()
        waited = now - self.started
        for node in range(self.plan.num_nodes):
            if node == self.me:
                continue
            if node not in self.seen:
                if waited > self.join_timeout_s:
                    return (f"node {node} (ranks {_ranks(self.plan.ranks_of(node))}) never joined launch "
                            f"{self.node_dir.name} within {self.join_timeout_s:.0f} s "
                            "(training.nodes.join_timeout_s): start `food-multids node-worker --output-dir "
                            "<training.output_dir>` there, with the same shared output folder")
                continue
            _, changed, record = self.seen[node]
            if record["state"] == "failed":
                return f"node {node} ({record['host']}) failed: {record['message']}"
            silent = now - changed
            if record["state"] == "done" and silent > self.lost_after_s:
                return (f"node {node} finished launch {self.node_dir.name} {silent:.0f} s ago, but this node's "
                        "processes are still running: stopped")
            if record["state"] not in ("done", "stopping", "stopped") and silent > self.lost_after_s:
                return self._lost([node], now)
        missing = self._not_joined()
        if missing and self.me > 0 and any(self.plan.node_of(r) == self.me for r in missing) and waited > 5 \
                and now - self.probed_at > 10:
            self.master_reachable, self.probed_at = self._probe_master(), now
        if missing and waited > self.join_timeout_s:
            return self._join_problem(missing)
        return None

    def _probe_master(self) -> bool:
        try:
            with socket.create_connection((self.plan.master_addr, self.plan.master_port), timeout=3):
                return True
        except OSError:
            return False

    def _join_problem(self, missing: list[int]) -> str:
        where = f"{self.plan.master_addr}:{self.plan.master_port}"
        unreachable = sorted(n for n, (_, _, rec) in self.seen.items() if rec.get("master_reachable") is False)
        if self.master_reachable is False:
            unreachable = sorted({*unreachable, self.me})
        nodes = _ranks(sorted({self.plan.node_of(r) for r in missing}))
        text = (f"the process group at {where} did not form within {self.join_timeout_s:.0f} s "
                f"(training.nodes.join_timeout_s): rank(s) {_ranks(missing)} on node(s) {nodes} did not join")
        if unreachable:
            text += (f"; node(s) {_ranks(unreachable)} cannot connect to the master at {where}: check that node 0 "
                     f"({self.post.get('posted_by')}) is reachable from there on that port (training.nodes.master_addr, "
                     "training.master_port, a firewall between the nodes)")
        return text

    def _not_joined(self) -> list[int]:
        world = self.plan.num_nodes * self.plan.procs_per_node
        return [r for r in range(world) if not (self.node_dir / f"joined-rank-{r}").exists()]

    def _lost(self, nodes: list[int], now: float) -> str:
        parts = []
        for node in nodes:
            _, changed, record = self.seen[node]
            parts.append(f"rank(s) {_ranks(self.plan.ranks_of(node))} on node {node} (host {record['host']}, "
                         f"node process {record['pid']}): no heartbeat for {now - changed:.0f} s")
        return ("lost " + "; ".join(parts) + ". Their processes stopped without reporting an error: the machine "
                "went down, was disconnected, or its processes were killed. Resume with "
                "training.resume_from_checkpoint: auto once every node is back")

    def _diagnose(self, code: int) -> str:
        """After this node's launcher failed: which other nodes failed too, and which went silent."""
        grace = max(5 * BEAT_S, 3.0)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._refresh()
            time.sleep(BEAT_S / 2)
        now = time.monotonic()
        ended = ("done", "failed", "stopping", "stopped")
        silent = [n for n in range(self.plan.num_nodes) if n != self.me and n in self.seen
                  and now - self.seen[n][1] >= grace and self.seen[n][2]["state"] not in ended]
        head = f"the DeepSpeed launcher on node {self.me} exited with code {code} (see the rank logs above)"
        if silent:
            return f"{self._lost(silent, now)}; {head}"
        stopped = [f"node {n} ({rec['message'] or 'a signal'})" for n, (_, _, rec) in sorted(self.seen.items())
                   if rec["state"] in ("stopping", "stopped")]
        if stopped:
            return (f"the run was stopped on {', '.join(stopped)}; this node's ranks stopped with it at the agreed "
                    "step (resume with training.resume_from_checkpoint: auto)")
        failed = [f"node {n}: {rec['message']}" for n, (_, _, rec) in sorted(self.seen.items())
                  if rec["state"] == "failed"]
        return head + (f"; also failed: {'; '.join(failed)}" if failed else "")


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
