"""The served MLflow model under load, batching across requests on and off, vs the in-process predict path.

Starts `mlflow models serve` on 127.0.0.1 (the newest registered version of the project's store, or
MODEL=models:/food_multids/<v>) twice: with the served model's micro-batching on, then off
(FOOD_MULTIDS_SERVE_BATCHING). Each time two loads, three phases each (RSS after each phase shows whether
memory keeps growing): SINGLE_CLIENTS clients sending 1-image requests, then MULTI_CLIENTS clients
sending 8-image requests (demo validation images). Prints served images/s, p50 / p95 / p99 latency,
errors and server RSS per load, and the same images through the in-process path (records_from_request
per request, predict_records over 16 images at a time: decode, encode, model; no HTTP or JSON), then

  serve: batched X img/s, unbatched Y img/s, in-process batch-16 Z img/s, ratio X/Z

for the 1-image clients. Targets (issue 31): batched >= 0.8x in-process batch 16 and >= 2x unbatched,
p99 <= 3x p50.

  .venv/bin/python bench/serve.py                      # after `make run` (which registers a model)
  WORKERS=1 SERVER_THREADS= SINGLE_CLIENTS=16 MULTI_CLIENTS=8 REQUESTS=40 .venv/bin/python bench/serve.py
                                                       (the defaults)
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SINGLE_CLIENTS = int(os.environ.get("SINGLE_CLIENTS", "16"))
MULTI_CLIENTS = int(os.environ.get("MULTI_CLIENTS", "8"))
REQUESTS = int(os.environ.get("REQUESTS", "40"))  # per client and phase: the run is bounded and stops by itself
WORKERS = int(os.environ.get("WORKERS", "1"))  # server processes (mlflow models serve --workers)
SERVER_THREADS = os.environ.get("SERVER_THREADS", "")  # torch threads per server process ("" = torch's default)
IN_PROCESS_BATCH = 16
PHASES = 3  # each load runs three times over; RSS after each shows whether it keeps growing
STORE = f"sqlite:///{ROOT / 'mlflow.db'}"


def newest_model() -> str:
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(STORE).search_model_versions("name='food_multids'")
    if not versions:
        raise SystemExit("no registered food_multids model in mlflow.db: run `make run` first")
    return f"models:/food_multids/{max(int(v.version) for v in versions)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def start_server(model: str, port: int, batching: bool) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": STORE, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FOOD_MULTIDS_SERVE_BATCHING": "true" if batching else "false"}
    if SERVER_THREADS:
        env["OMP_NUM_THREADS"] = SERVER_THREADS
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS)], env=env,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}") from None
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise SystemExit("the server did not start in 180 s")


def post(port: int, body: bytes) -> tuple[int, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as err:
        status = err.code
    except OSError:
        status = -1
    return status, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(port: int, bodies: list[bytes], clients: int, images_per_request: int, server_pid: int) -> dict:
    """`clients` threads share `bodies` (REQUESTS each), PHASES times over: images/s, latencies, errors, RSS."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def client(k: int) -> None:
        nonlocal errors
        for body in bodies[k * REQUESTS:(k + 1) * REQUESTS]:
            status, took = post(port, body)
            with lock:
                latencies.append(took)
                errors += status != 200

    rss, wall = [], 0.0
    for _ in range(PHASES):
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall += time.perf_counter() - start
        rss.append(tree_rss_mb(server_pid))
    p50, p95, p99 = (percentile(latencies, q) * 1000 for q in (0.5, 0.95, 0.99))
    return {"img_s": PHASES * clients * REQUESTS * images_per_request / wall, "p50": p50, "p95": p95, "p99": p99,
            "errors": errors, "rss": rss}


def main() -> None:
    import pandas as pd
    import torch

    from food_multids.inference.inputs import records_from_request
    from food_multids.inference.model import load_model
    from food_multids.inference.predict import predict_records
    from food_multids.inference.source import local_model_dir

    os.environ.setdefault("MLFLOW_TRACKING_URI", STORE)
    model = os.environ.get("MODEL") or newest_model()
    images = sorted((ROOT / "data/01_raw/demo/shapes/images/val").glob("*.jpg"))
    images += sorted((ROOT / "data/01_raw/demo/digits/images/val").glob("*.png"))
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]

    def rows(i: int, n: int) -> list[dict]:
        return [{"image": encoded[(i * n + j) % len(encoded)], "dataset_name": "shapes" if (i + j) % 2 else "digits"}
                for j in range(n)]

    singles = [rows(i, 1) for i in range(SINGLE_CLIENTS * REQUESTS)]
    eights = [rows(i, 8) for i in range(MULTI_CLIENTS * REQUESTS)]
    loads = {"1-image": ([json.dumps({"dataframe_records": r}).encode() for r in singles], SINGLE_CLIENTS, 1),
             "8-image": ([json.dumps({"dataframe_records": r}).encode() for r in eights], MULTI_CLIENTS, 8)}

    # In process, the same single images: decoded request by request, through the model 16 at a time.
    loaded = load_model(local_model_dir(model), torch.device("cpu"))
    spaces = loaded.label_spaces

    def in_process(requests: list[list[dict]]) -> None:
        for at in range(0, len(requests), IN_PROCESS_BATCH):
            records = pd.concat([records_from_request(pd.DataFrame(r), spaces, 64_000_000)
                                 for r in requests[at:at + IN_PROCESS_BATCH]], ignore_index=True)
            records["sample_id"] = range(len(records))
            predict_records(loaded, records, top_k=5, batch_size=IN_PROCESS_BATCH, progress_mode="never")

    in_process(singles[:3 * IN_PROCESS_BATCH])  # warm-up
    start = time.perf_counter()
    in_process(singles)
    reference = len(singles) / (time.perf_counter() - start)

    results = {}
    for batching in (True, False):
        port = free_port()
        server = start_server(model, port, batching)
        try:
            for body in loads["1-image"][0][:3] + loads["8-image"][0][:3]:
                post(port, body)  # warm-up
            warm = tree_rss_mb(server.pid)
            for name, (bodies, clients, per_request) in loads.items():
                results[batching, name] = {**load(port, bodies, clients, per_request, server.pid), "warm": warm}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)

    print(f"model {model}; server: {WORKERS} worker(s), torch threads {SERVER_THREADS or 'default'}; in-process "
          f"torch threads {torch.get_num_threads()}; {PHASES} phases x {REQUESTS} requests per client")
    print(f"in-process, batch {IN_PROCESS_BATCH}: {reference:8.1f} images/s (the 1-image requests' images)")
    for (batching, name), r in results.items():
        clients = SINGLE_CLIENTS if name == "1-image" else MULTI_CLIENTS
        print(f"batching {'on ' if batching else 'off'} {clients:2d} clients x {name} requests: {r['img_s']:8.1f} "
              f"images/s, p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms, p99 {r['p99']:.0f} ms (p99/p50 "
              f"{r['p99'] / r['p50']:.2f}), errors {r['errors']}, RSS {r['warm']:.0f} MB after warm-up, then "
              + ", ".join(f"{m:.0f}" for m in r["rss"]))
    on, off = results[True, "1-image"]["img_s"], results[False, "1-image"]["img_s"]
    print(f"serve: batched {on:.1f} img/s, unbatched {off:.1f} img/s, in-process batch-16 {reference:.1f} img/s, "
          f"ratio {on / reference:.2f}")
    print(f"targets: batched/in-process {on / reference:.2f} (>= 0.8), batched/unbatched {on / off:.2f} (>= 2), "
          f"p99/p50 {results[True, '1-image']['p99'] / results[True, '1-image']['p50']:.2f} (<= 3)")


if __name__ == "__main__":
    main()
