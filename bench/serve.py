"""The served MLflow model under load vs the in-process predict function, same images, same batch size.

Starts `mlflow models serve` on 127.0.0.1 (the newest registered version of the project's store, or
MODEL=models:/food_multids/<v>), drives it with CLIENTS concurrent clients, each sending REQUESTS
requests of BATCH base64 images (three times over, to see whether memory keeps growing) (demo validation images), then stops it. Prints served images/s, p50 /
p95 / p99 request latency, errors, the server's RSS (process tree) before and after the load, and the
same requests through the in-process path (records_from_request + predict_records: decode, encode,
model) at the same batch size, one request at a time.

  .venv/bin/python bench/serve.py                      # after `make run` (which registers a model)
  CLIENTS=8 BATCH=8 REQUESTS=40 WORKERS=2 SERVER_THREADS=1 .venv/bin/python bench/serve.py   (the defaults)

Targets (tiny model, CPU): served throughput with 8 clients >= 0.7x in-process; p99 <= 3x p50.
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
CLIENTS = int(os.environ.get("CLIENTS", "8"))
BATCH = int(os.environ.get("BATCH", "8"))
REQUESTS = int(os.environ.get("REQUESTS", "40"))  # per client: the run is bounded and stops by itself
# On CPU, one server process per core with one torch thread each (the request's Python work runs in
# parallel); on a GPU, WORKERS=1 and SERVER_THREADS unset.
WORKERS = int(os.environ.get("WORKERS", "2"))  # server processes (mlflow models serve --workers)
SERVER_THREADS = os.environ.get("SERVER_THREADS", "1")  # torch threads per server process ("" = torch's default)
PHASES = 3  # the load runs three times over; RSS after each shows whether it keeps growing
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


def start_server(model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": STORE, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    if SERVER_THREADS:
        env["OMP_NUM_THREADS"] = SERVER_THREADS
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS)], env=env, stdout=subprocess.DEVNULL,
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
    batches = [[{"image": encoded[(i * BATCH + j) % len(encoded)], "dataset_name": "shapes" if j % 2 else "digits"}
                for j in range(BATCH)] for i in range(CLIENTS * REQUESTS)]
    bodies = [json.dumps({"dataframe_records": b}).encode() for b in batches]

    # In process, the same requests one after another: decode + encode + model, no HTTP or JSON.
    loaded = load_model(local_model_dir(model), torch.device("cpu"))
    spaces = loaded.label_spaces
    for b in batches[:3]:  # warm-up
        predict_records(loaded, records_from_request(pd.DataFrame(b), spaces, 64_000_000), top_k=5, batch_size=BATCH,
                        progress_mode="never")
    start = time.perf_counter()
    for b in batches:
        predict_records(loaded, records_from_request(pd.DataFrame(b), spaces, 64_000_000), top_k=5, batch_size=BATCH,
                        progress_mode="never")
    in_process = len(batches) * BATCH / (time.perf_counter() - start)
    del loaded

    port = free_port()
    server = start_server(model, port)
    try:
        for body in bodies[:3]:
            post(port, body)  # warm-up
        rss_start = tree_rss_mb(server.pid)
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

        rss_after = []
        wall = 0.0
        for _ in range(PHASES):
            threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall += time.perf_counter() - start
            rss_after.append(tree_rss_mb(server.pid))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    served = PHASES * len(bodies) * BATCH / wall
    p50, p95, p99 = (percentile(latencies, q) * 1000 for q in (0.5, 0.95, 0.99))
    print(f"model {model}; {CLIENTS} clients x {REQUESTS} requests x {BATCH} images; server: {WORKERS} worker(s), "
          f"torch threads {SERVER_THREADS or 'default'}; in-process torch threads {torch.get_num_threads()}")
    print(f"served:     {served:8.1f} images/s  ({PHASES * len(bodies) / wall:.1f} requests/s, {wall:.1f} s)")
    print(f"in-process: {in_process:8.1f} images/s  (same requests, one at a time)")
    print(f"ratio served / in-process: {served / in_process:.2f}  (target >= 0.7)")
    print(f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms; p99/p50 {p99 / p50:.2f}  (target <= 3)")
    print(f"errors: {errors}  (target 0)")
    print(f"server RSS (all workers): {rss_start:.0f} MB after warm-up, then "
          + ", ".join(f"{r:.0f}" for r in rss_after) + f" MB after each of the {PHASES} load phases")


if __name__ == "__main__":
    main()
