"""What training and evaluation both run on: devices and the process group (device.py), the DeepSpeed
launcher (launch.py), several machines without ssh (nodes.py, node_worker.py), crash-safe files (files.py)
and the scoring loop (scoring.py). It imports nothing from training/, evaluation/ or pipelines/."""
