"""`food-multids node-worker`: a node other than node 0 of a `training.nodes.launch: torchrun` run (cluster.py).

It connects to the store node 0's `kedro run` holds at the master address and port, claims its node rank
there, beats a heartbeat every second, and runs each of node 0's steps as `torchrun --node-rank K` until
node 0's result arrives: exit 0 if the run succeeded, 1 if it failed, node 0 was lost, or nothing came.
Its settings come from flags or from the variables torchrun itself reads (PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT, PET_NNODES), then NODE_RANK / MASTER_ADDR / MASTER_PORT, SLURM's and an Indexed Job's.
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
from dataclasses import dataclass

from food_multids.runtime.cluster import (
    BEAT_S,
    DEFAULT_PORT,
    MASTER_ADDR_VARS,
    MASTER_PORT_VARS,
    NUM_NODES_VARS,
    SUPERVISOR_ENV,
    NodeFailure,
    NodePlan,
    _as_int,
    _from_env,
    connect_store,
    die_with_parent,
    env_node_rank,
    ranks_text,
    read_record,
    signal_ranks,
    slurm_first_host,
    stop_tree,
)
from food_multids.runtime.launch import launcher_env
from food_multids.runtime.node_zero import torchrun_argv

logger = logging.getLogger(__name__)
POLL_S = 0.5
CONNECT_TRY_S = 10.0
DEFAULT_LOST_AFTER_S = 120.0  # before node 0's first step says its own training.nodes.lost_after_s


@dataclass(frozen=True)
class WorkerSettings:
    node_rank: int
    master_addr: str
    master_port: int
    num_nodes: int | None
    wait_s: float


def resolve_settings(node_rank: int | None, master_addr: str | None, master_port: int | None,
                     num_nodes: int | None, wait_s: float) -> WorkerSettings:
    """Flags first, then the variables torchrun reads, then the schedulers'. All problems at once."""
    problems = []
    if node_rank is None:
        found = env_node_rank()
        if found is None:
            problems.append("no node rank: pass --node-rank, or set PET_NODE_RANK or NODE_RANK (SLURM sets "
                            "SLURM_NODEID, a Kubernetes Indexed Job JOB_COMPLETION_INDEX)")
        else:
            node_rank = found[0]
    if node_rank is not None and node_rank < 1:
        problems.append(f"node rank {node_rank}: node 0 runs `kedro run` itself; workers are nodes 1, 2, ...")
    if master_addr is None:
        found = _from_env(MASTER_ADDR_VARS)
        master_addr = found[1] if found else slurm_first_host()
        if master_addr is None:
            problems.append("no master address: pass --master-addr (node 0's host name or address), or set "
                            "PET_MASTER_ADDR or MASTER_ADDR")
    if master_port is None:
        found = _from_env(MASTER_PORT_VARS)
        master_port = _as_int(*found) if found else DEFAULT_PORT
    if num_nodes is None:
        found = _from_env(NUM_NODES_VARS)
        num_nodes = _as_int(*found) if found else None
    if problems:
        raise NodeFailure("; ".join(problems))
    return WorkerSettings(node_rank, master_addr, master_port, num_nodes, wait_s)


WORKER_MODULES = ("food_multids.training.worker", "food_multids.evaluation.worker", "food_multids.inference.worker")


class NodeWorker:
    def __init__(self, settings: WorkerSettings):
        self.s = settings
        self.where = f"{settings.master_addr}:{settings.master_port}"
        self.host = socket.gethostname()
        self.lost_after_s = DEFAULT_LOST_AFTER_S
        self.signum: int | None = None
        self.node0: dict = {}
        self.procs_per_node = 1
        self.proc: subprocess.Popen | None = None  # this node's torchrun, while a step runs
        self.node0_seen = time.monotonic()  # when node 0's heartbeat last moved (set by the heartbeat thread)
        self._stop = threading.Event()

    # ---- joining -----------------------------------------------------------------------------------------
    def _connect(self):
        """Node 0's store; it may start after this worker (node 0 prepares the data first): retry until wait_s."""
        deadline = time.monotonic() + self.s.wait_s
        while True:
            try:
                return connect_store(self.s.master_addr, self.s.master_port, min(CONNECT_TRY_S, self.s.wait_s))
            except Exception:
                if self.signum is not None:
                    raise NodeFailure(f"stopped by {signal.Signals(self.signum).name} before node 0's store at "
                                      f"{self.where} answered") from None
                if time.monotonic() >= deadline:
                    raise NodeFailure(
                        f"cannot reach node 0's store at {self.where} within {self.s.wait_s:.0f} s (--wait-s): is "
                        "`kedro run` running on node 0 with training.nodes.launch: torchrun and this master address "
                        "and port (training.nodes.master_addr, training.master_port), and is the port reachable from "
                        "here?") from None

    def _claim(self, store) -> None:
        me = json.dumps({"host": self.host, "pid": os.getpid()})
        got = store.compare_set(f"node/{self.s.node_rank}", "", me)
        got = got.decode() if isinstance(got, bytes) else got
        if got != me:
            other = json.loads(got)
            raise NodeFailure(f"node rank {self.s.node_rank} is already taken in the run at {self.where} by "
                              f"{other['host']} (process {other['pid']}): another worker was started as node "
                              f"{self.s.node_rank} (give each node its own --node-rank / PET_NODE_RANK), or this "
                              "node's worker was restarted during node 0's run (restart the whole run: "
                              "training.resume_from_checkpoint: auto continues it)")
        self.node0 = json.loads(store.get("node/0"))
        num_nodes = self.node0.get("num_nodes")
        if num_nodes is not None and (self.s.node_rank >= num_nodes or self.s.num_nodes not in (None, num_nodes)):
            message = (f"this is node {self.s.node_rank}" + (f" of {self.s.num_nodes} (--nnodes / PET_NNODES)"
                                                             if self.s.num_nodes else "") +
                       f", but node 0's run has {num_nodes} nodes (0..{num_nodes - 1}): check "
                       "training.nodes.num_nodes, the node ranks and --nnodes")
            store.set(f"gone/{self.s.node_rank}", json.dumps({"message": message}))
            raise NodeFailure(message)

    def _heartbeat(self) -> None:
        """This node's beat, and node 0's observed, once a second, on a connection of its own: a store call that
        hangs (node 0's machine frozen or cut off) stalls only this thread, which the watchdog then sees."""
        try:
            store = connect_store(self.s.master_addr, self.s.master_port, 30.0)
            last = None
            while not self._stop.wait(BEAT_S):
                store.add(f"beat/{self.s.node_rank}", 1)
                beat = store.add("beat/0", 0)
                if beat != last:
                    last, self.node0_seen = beat, time.monotonic()
        except Exception:  # node 0's store is gone: the watchdog or the main loop says so
            return

    def _watchdog(self) -> None:
        """Without touching the store: node 0's heartbeat has not moved for lost_after_s, whatever the main loop
        is blocked in. Stop this node's ranks and exit with the message."""
        while not self._stop.wait(BEAT_S):
            silent = time.monotonic() - self.node0_seen
            if silent > self.lost_after_s:
                logger.error("node-worker: %s", self._lost_node0(f"no heartbeat for {silent:.0f} s"))
                if self.proc is not None:
                    stop_tree(self.proc)
                os._exit(1)

    # ---- the loop ----------------------------------------------------------------------------------------
    def serve(self) -> str:
        """Run node 0's steps until its result; return its final message (raise NodeFailure if it failed)."""
        store = self._connect()
        self._guarded(lambda: self._claim(store))
        logger.info("Node %d: joined node 0 (%s) at %s", self.s.node_rank, self.node0.get("host"), self.where)
        for target, name in ((self._heartbeat, "node-heartbeat"), (self._watchdog, "node-0-watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()
        index = 0
        try:
            while True:
                record = self._next_record(store, index)
                if record["kind"] == "finish":
                    return self._finished(store, record)
                self._run_step(store, index, record)
                index += 1
        except NodeFailure as exc:
            self._leave(store, str(exc))
            raise
        finally:
            self._stop.set()

    def _finished(self, store, record: dict) -> str:
        self._guarded(lambda: store.set(f"bye/{self.s.node_rank}", "1"))
        if record["ok"]:
            return "node 0's run finished"
        raise NodeFailure(f"node 0's run failed: {record['message'] or 'see its log'}")

    def _leave(self, store, message: str) -> None:
        """Tell node 0 why this node left (it names it at its next step instead of waiting for a heartbeat)."""
        try:
            if not store.check([f"gone/{self.s.node_rank}"]):
                store.set(f"gone/{self.s.node_rank}", json.dumps({"message": message}))
        except Exception:  # node 0 is gone too
            pass

    def _next_record(self, store, index: int) -> dict:
        """Node 0's next record. No deadline while node 0's heartbeat moves: it may evaluate for hours."""
        while True:
            record = self._guarded(lambda: read_record(store, f"step/{index}"))
            if record is not None:
                return record
            if self.signum is not None:
                raise NodeFailure(f"stopped by {signal.Signals(self.signum).name} while waiting for node 0's next step")
            time.sleep(POLL_S)

    def _guarded(self, call):
        try:
            return call()
        except NodeFailure:
            raise
        except Exception:  # the connection to node 0's store broke: node 0's kedro run is gone
            raise NodeFailure(self._lost_node0("its store at " + self.where + " stopped answering")) from None

    def _lost_node0(self, why: str) -> str:
        ranks = ranks_text(list(range(self.procs_per_node)))
        return (f"lost rank(s) {ranks} on node 0 (host {self.node0.get('host', '?')}, kedro process "
                f"{self.node0.get('pid', '?')}): {why}. Its run was killed or its machine went down; this node's "
                "processes stopped. Resume with training.resume_from_checkpoint: auto")

    def _run_step(self, store, index: int, record: dict) -> None:
        plan = NodePlan(record["num_nodes"], record["procs_per_node"], self.s.master_addr, self.s.master_port)
        self.procs_per_node, self.lost_after_s = plan.procs_per_node, record["timeouts"]["lost_after_s"]
        spec = record["spec"]
        if record["module"] not in WORKER_MODULES or not spec.endswith("/spec.json") or not os.path.isfile(spec):
            message = (f"node 0's step {index} names module {record['module']!r} with spec {spec!r}: not one of this "
                       f"project's workers, or the spec is not on this node (is training.output_dir on storage every "
                       "node shares at the same path?)")
            self._set_status(store, index, "failed", message)
            raise NodeFailure(message)
        cmd = torchrun_argv(plan, self.s.node_rank, index, max(record["timeouts"]["join_timeout_s"], 60),
                            record["module"], spec)
        logger.info("Node %d: step %d (ranks %s): %s", self.s.node_rank, index,
                    ranks_text(plan.ranks_of(self.s.node_rank)), " ".join(cmd))
        env = {**launcher_env(plan.procs_per_node), SUPERVISOR_ENV: str(os.getpid())}
        self.proc = proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                            preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509 - see die_with_parent
        forwarded = False
        try:
            while (code := proc.poll()) is None:
                if self.signum is not None and not forwarded:
                    signal_ranks(proc, self.signum)  # once to each rank: they agree on a step and save
                    forwarded = True
                if not forwarded:
                    self._guarded(lambda: store.check(["node/0"]))  # node 0's kedro still holds the store
                time.sleep(POLL_S)
        except BaseException:
            stop_tree(proc)
            raise
        finally:
            self.proc = None
        if self.signum is not None:
            message = f"stopped by {signal.Signals(self.signum).name}"
            self._set_status(store, index, "stopped", message)
            raise NodeFailure(f"{message}: this node's ranks stopped at the step all ranks agreed on")
        if code != 0:
            message = f"torchrun on node {self.s.node_rank} exited with code {code} (see the rank logs there)"
            self._set_status(store, index, "failed", message)
            # Node 0's own account comes as its next record (a failure there ends this node's ranks too).
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                record = self._guarded(lambda: read_record(store, f"step/{index + 1}"))
                if record is not None and record["kind"] == "finish":
                    self._finished(store, record)  # raises with node 0's message
                time.sleep(POLL_S)
            raise NodeFailure(message)
        self._set_status(store, index, "done", "")
        logger.info("Node %d: step %d done", self.s.node_rank, index)

    def _set_status(self, store, index: int, state: str, message: str) -> None:
        try:
            store.set(f"status/{index}/{self.s.node_rank}", json.dumps({"state": state, "message": message}))
        except Exception:  # node 0 is gone; the caller says what happened
            pass


def serve(settings: WorkerSettings) -> str:
    """Run as node `settings.node_rank` until node 0's run ends; SIGTERM/SIGINT go once to this node's ranks."""
    worker = NodeWorker(settings)

    def on_signal(signum, _frame) -> None:
        if worker.signum is None:
            logger.warning("Node %d: %s: passing it to this node's ranks once", settings.node_rank,
                           signal.Signals(signum).name)
        worker.signum = signum

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.serve()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
