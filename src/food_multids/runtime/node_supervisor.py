"""One node's share of a per_node launch (see nodes.py): start the local DeepSpeed launcher, write this
node's heartbeat, watch the other nodes', and turn a node that never came, a process group that did not
form, a lost node or a signal into a stop with a message."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from food_multids.config import ProjectConfig
from food_multids.helpers.interrupts import RunInterrupted
from food_multids.runtime.commands import deepspeed_launcher
from food_multids.runtime.files import write_json_atomic
from food_multids.runtime.nodes import (
    BEAT_S,
    BOARD,
    KEEP_LAUNCHES,
    NODE_DIR_ENV,
    SUPERVISOR_ENV,
    NodeFailure,
    NodePlan,
    board_dir,
    read_json,
    session_id,
)

logger = logging.getLogger(__name__)


def launcher_argv(plan: NodePlan, node_dir: Path, node_rank: int, cmd_tail: list[str]) -> list[str]:
    return [deepspeed_launcher(), "--hostfile", str(node_dir / "hostfile"), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", plan.master_addr, "--master_port", str(plan.master_port),
            "--num_gpus", str(plan.procs_per_node), *cmd_tail]


class NodeSupervisor:
    """One node's share of a launch: start the local DeepSpeed launcher and watch every node's heartbeat."""

    def __init__(self, node_dir: Path, post: dict, node_rank: int, stop_grace_s: float = 300.0):
        """`post`: node 0's launch record (plan, command, its training.nodes timeouts, which every node uses)."""
        self.node_dir, self.post, self.me = node_dir, post, node_rank
        self.plan = NodePlan(**post["plan"])
        self.join_timeout_s = post["timeouts"]["join_timeout_s"]
        self.lost_after_s = post["timeouts"]["lost_after_s"]
        self.stop_grace_s = stop_grace_s
        self.host = socket.gethostname()
        self.all_joined = False  # once true, the join marks are not looked at again
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
                          {"node": self.me, "host": self.host, "pid": os.getpid(), "beat": self.beat,
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
        if self.all_joined:
            return []
        world = self.plan.num_nodes * self.plan.procs_per_node
        missing = [r for r in range(world) if not (self.node_dir / f"joined-rank-{r}").exists()]
        self.all_joined = not missing
        return missing

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
    supervisor = NodeSupervisor(node_dir, post, 0)
    logger.info("Launch %s posted for %d more node(s) (food-multids node-worker --output-dir %s)",
                launch_id, plan.num_nodes - 1, cfg.training.resolved_output_dir())
    ok = False
    try:
        supervisor.run(env, on_started=lambda: write_json_atomic(board / BOARD, post))
        ok = True
    finally:
        write_json_atomic(board / BOARD, {**post, "state": "closed", "ok": ok})
