"""What training and evaluation both run on: devices and the process group (device.py), the DeepSpeed
launcher and SLURM job steps (launch.py), several machines on torchrun (cluster.py, node_zero.py,
node_worker.py), crash-safe files (files.py)
and the scoring loop (scoring.py). It imports nothing from training/, evaluation/ or pipelines/."""
