"""Node 0 of a `training.nodes.launch: torchrun` run (see cluster.py): the run's store, and each step's launch.

`open_session` (a hook, before the first node) starts the store in the Kedro process at the master address
and port and beats node 0's heartbeat there. `run_step` waits until every other node has claimed its rank,
sets the step's record, starts `torchrun --node-rank 0` for it and watches the others' heartbeats and
results while it runs; a node that never came, a lost node, a failed node or a signal becomes a stop with a
message naming nodes, ranks and hosts. `finish_session` (a hook, when the run ends) hands the workers node
0's result and closes the store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time

from food_multids.config import TrainConfig
from food_multids.helpers.interrupts import RunInterrupted
from food_multids.runtime.cluster import (
    BEAT_S,
    STOP_GRACE_S,
    SUPERVISOR_ENV,
    NodeFailure,
    NodePlan,
    connect_store,
    die_with_parent,
    ranks_text,
    read_record,
    resolve_plan,
    stop_gracefully,
    stop_tree,
)
from food_multids.runtime.commands import torchrun_launcher

logger = logging.getLogger(__name__)
BYE_WAIT_S = 10.0  # at the end: how long node 0 keeps the store up for the workers to read its result


def torchrun_argv(plan: NodePlan, node_rank: int, index: int, rdzv_timeout_s: float, module: str,
                  spec: str) -> list[str]:
    """One node's torchrun agent for node 0's step `index`: static rendezvous at the step's port."""
    return [torchrun_launcher(), f"--nnodes={plan.num_nodes}", f"--node-rank={node_rank}",
            f"--nproc-per-node={plan.procs_per_node}", f"--master-addr={plan.master_addr}",
            f"--master-port={plan.step_port(index)}", "--max-restarts=0", "--rdzv-backend=static",
            f"--rdzv-conf=timeout={int(rdzv_timeout_s)}",
            f"--shutdown-timeout={STOP_GRACE_S}", "-m", module, "--spec", spec]


class Session:
    """The run's store on node 0 and the steps launched through it."""

    def __init__(self, training: TrainConfig):
        plan = resolve_plan(training, 1)
        self.num_nodes, self.master_addr, self.master_port = plan.num_nodes, plan.master_addr, plan.master_port
        self.join_timeout_s = training.nodes.join_timeout_s
        self.lost_after_s = training.nodes.lost_after_s
        self.opened = time.monotonic()
        self.index = 0
        try:
            self.store = connect_store(self.master_addr, self.master_port, 30.0, is_master=True)
        except Exception as exc:  # the port is taken (another run on this machine), or the address is not ours
            raise NodeFailure(f"could not open the run's store at {self.master_addr}:{self.master_port}: {exc} "
                              "(training.nodes.master_addr, training.master_port)") from None
        self.host = socket.gethostname()
        self.store.set("node/0", json.dumps({"host": self.host, "pid": os.getpid(), "num_nodes": self.num_nodes}))
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="node-0-heartbeat", daemon=True)
        self._beat.start()
        self.seen: dict[int, tuple[int, float]] = {}  # node -> (last counter, when it changed)
        logger.info("Node 0 of %d: the run's store is at %s:%d; start `food-multids node-worker --master-addr %s "
                    "--master-port %d` on the other nodes", self.num_nodes, self.master_addr, self.master_port,
                    self.master_addr, self.master_port)

    def _beat_loop(self) -> None:
        store = connect_store(self.master_addr, self.master_port, 30.0)
        while not self._stop.wait(BEAT_S):
            try:
                store.add("beat/0", 1)
            except Exception:  # the store is closing
                return

    # ---- a step ------------------------------------------------------------------------------------------
    def run_step(self, plan: NodePlan, module: str, spec: str, env: dict) -> None:
        if plan.num_nodes != self.num_nodes:
            raise NodeFailure(f"this step asks for {plan.num_nodes} nodes but the run's store was opened for "
                              f"{self.num_nodes}")
        index = self.index  # the record the workers wait for; it moves on only once a record is there
        claims = self._await_claims()
        cmd = torchrun_argv(plan, 0, index, self.join_timeout_s, module, spec)
        self.store.set(f"step/{index}", json.dumps({
            "kind": "step", "module": module, "spec": spec, "num_nodes": plan.num_nodes,
            "procs_per_node": plan.procs_per_node, "port": plan.step_port(index),
            "timeouts": {"join_timeout_s": self.join_timeout_s, "lost_after_s": self.lost_after_s}}))
        self.index += 1
        logger.info("Step %d on %d node(s) x %d process(es): %s", index, plan.num_nodes, plan.procs_per_node,
                    " ".join(cmd))
        proc = subprocess.Popen(cmd, env={**env, SUPERVISOR_ENV: str(os.getpid())}, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509 - see die_with_parent
        try:
            while (code := proc.poll()) is None:
                problem = self._watch(plan, index, claims)
                if problem:
                    stop_tree(proc)
                    raise NodeFailure(problem)
                time.sleep(BEAT_S)
        except (RunInterrupted, KeyboardInterrupt) as exc:
            # torchrun passes the signal once to each rank of this node; the workers do the same on theirs
            # (a scheduler signals every node). The ranks agree on a step, save and stop.
            stop_gracefully(proc, getattr(exc, "signum", signal.SIGINT))
            raise
        except BaseException:
            stop_tree(proc)  # whatever went wrong here, no rank outlives its launcher
            raise
        if code != 0:
            raise NodeFailure(self._diagnose(plan, index, claims, code))

    def _await_claims(self) -> dict[int, dict]:
        """Every other node's claim (host, pid of its node worker), waiting up to join_timeout_s from the
        session's start for the ones not there yet."""
        claims: dict[int, dict] = {}
        while True:
            for node in range(1, self.num_nodes):
                if node not in claims:
                    record = read_record(self.store, f"node/{node}")
                    if record is not None:
                        claims[node] = record
            missing = [n for n in range(1, self.num_nodes) if n not in claims]
            for node in claims:
                left = read_record(self.store, f"gone/{node}")
                if left is not None:
                    raise NodeFailure(f"node {node} ({claims[node]['host']}) left the run: {left['message']}")
            if not missing:
                self._refresh()
                now = time.monotonic()
                silent = [n for n in claims if now - self.seen[n][1] > self.lost_after_s]
                if silent:
                    raise NodeFailure(self._lost(NodePlan(self.num_nodes, 1, self.master_addr, self.master_port),
                                                 silent, claims, now, ranks=False))
                return claims
            if time.monotonic() - self.opened > self.join_timeout_s:
                raise NodeFailure(
                    f"node(s) {ranks_text(missing)} never joined within {self.join_timeout_s:.0f} s "
                    f"(training.nodes.join_timeout_s): start `food-multids node-worker --master-addr "
                    f"{self.master_addr} --master-port {self.master_port} --node-rank K` there (or set PET_NODE_RANK, "
                    f"PET_MASTER_ADDR, PET_MASTER_PORT), and check that port {self.master_port} of node 0 is "
                    "reachable from them")
            time.sleep(BEAT_S / 2)

    def _refresh(self) -> None:
        now = time.monotonic()
        for node in range(1, self.num_nodes):
            beat = self.store.add(f"beat/{node}", 0)
            last = self.seen.get(node)
            if last is None or last[0] != beat:
                self.seen[node] = (beat, now)

    def _watch(self, plan: NodePlan, index: int, claims: dict[int, dict]) -> str | None:
        """A reason to stop this node's processes now, or None."""
        self._refresh()
        now = time.monotonic()
        for node in range(1, self.num_nodes):
            status = read_record(self.store, f"status/{index}/{node}")
            if status is not None and status["state"] == "failed":
                return f"node {node} ({claims[node]['host']}) failed: {status['message']}"
            if now - self.seen[node][1] > self.lost_after_s:
                return self._lost(plan, [node], claims, now)
        return None

    def _lost(self, plan: NodePlan, nodes: list[int], claims: dict[int, dict], now: float, ranks: bool = True) -> str:
        parts = [(f"rank(s) {ranks_text(plan.ranks_of(n))} on " if ranks else "") + f"node {n} (host "
                 f"{claims[n]['host']}, node process {claims[n]['pid']}): no heartbeat for "
                 f"{now - self.seen[n][1]:.0f} s"
                 for n in nodes]
        return ("lost " + "; ".join(parts) + ". Their processes stopped without reporting an error: the machine "
                "went down, was disconnected, or its processes were killed. Resume with "
                "training.resume_from_checkpoint: auto once every node is back")

    def _diagnose(self, plan: NodePlan, index: int, claims: dict[int, dict], code: int) -> str:
        """After this node's torchrun failed: which other nodes failed too, stopped, or went silent."""
        grace = max(5 * BEAT_S, 3.0)
        deadline = time.monotonic() + grace
        statuses: dict[int, dict] = {}
        while time.monotonic() < deadline and len(statuses) < self.num_nodes - 1:
            self._refresh()
            for node in range(1, self.num_nodes):
                status = read_record(self.store, f"status/{index}/{node}")
                if status is not None:
                    statuses[node] = status
            time.sleep(BEAT_S / 2)
        now = time.monotonic()
        silent = [n for n in range(1, self.num_nodes) if n not in statuses and now - self.seen[n][1] >= grace]
        head = f"torchrun on node 0 exited with code {code} (see the rank logs above)"
        if silent:
            return f"{self._lost(plan, silent, claims, now)}; {head}"
        stopped = [f"node {n} ({s['message']})" for n, s in sorted(statuses.items()) if s["state"] == "stopped"]
        if stopped:
            return (f"the run was stopped on {', '.join(stopped)}; this node's ranks stopped with it at the agreed "
                    "step (resume with training.resume_from_checkpoint: auto)")
        failed = [f"node {n} ({claims[n]['host']}): {s['message']}" for n, s in sorted(statuses.items())
                  if s["state"] == "failed"]
        return head + (f"; also failed: {'; '.join(failed)}" if failed else "")

    # ---- the end -----------------------------------------------------------------------------------------
    def finish(self, ok: bool, message: str = "") -> None:
        """Hand the workers node 0's result (their next step record), wait briefly for each to read it, close."""
        try:
            self.store.set(f"step/{self.index}", json.dumps({"kind": "finish", "ok": ok, "message": message[:2000]}))
            deadline = time.monotonic() + BYE_WAIT_S
            waiting = [n for n in range(1, self.num_nodes) if self.store.check([f"node/{n}"])]
            while waiting and time.monotonic() < deadline:  # a worker that left (gone/K) reads nothing more
                waiting = [n for n in waiting
                           if not self.store.check([f"bye/{n}"]) and not self.store.check([f"gone/{n}"])]
                time.sleep(0.1)
        finally:
            self._stop.set()
            self._beat.join(timeout=2 * BEAT_S)
            self.store = None


_session: dict[str, Session | None] = {"current": None}


def open_session(training: TrainConfig) -> Session:
    """The run's store (a hook opens it before the first node, so workers can claim their ranks early)."""
    if _session["current"] is None:
        _session["current"] = Session(training)
    return _session["current"]


def finish_session(ok: bool, message: str = "") -> None:
    """Tell the node workers that node 0's run ended (they exit, 0 if it succeeded)."""
    session, _session["current"] = _session["current"], None
    if session is not None:
        session.finish(ok, message)


def run_node_zero(training: TrainConfig, plan: NodePlan, module: str, spec: str, env: dict) -> None:
    open_session(training).run_step(plan, module, spec, env)
