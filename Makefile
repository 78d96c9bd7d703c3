# Quick start:  make run   (set up + run the main job on the embedded demo)
#               make test  (set up + run the fast tests; make test-all runs every tier)
# The install order matters (see README): torch first, then DeepSpeed without build isolation.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# CPU wheel by default; GPU users: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
TORCH_SPEC ?= torch==2.13.0
# Optional trackers for tracking.report_to: make setup EXTRAS="wandb tensorboard"
EXTRAS ?=
TRACKER_SPECS := wandb=wandb==0.31.0 tensorboard=tensorboard==2.21.0
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: setup demo run train full_eval predict serve test test-all lint viz mlflow-ui notebook

# make viz PORT=4142 / make mlflow-ui PORT=5001 / make notebook PORT=8889 (each tool's default otherwise)
PORT ?=
NOTEBOOK_SPEC ?= notebook==7.6.5

setup: $(VENV)/.installed demo
	$(if $(EXTRAS),$(PIP) install --quiet $(foreach e,$(EXTRAS),$(patsubst $(e)=%,%,$(filter $(e)=%,$(TRACKER_SPECS)))))

$(VENV)/.installed: pyproject.toml requirements.txt requirements-build.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -r requirements-build.txt
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation deepspeed==0.19.8
	$(PIP) install --quiet -r requirements.txt -r requirements-test.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(BIN)/food-multids demo

run: setup
	$(BIN)/kedro run

train: setup
	$(BIN)/kedro run --pipelines train

full_eval: setup
	$(BIN)/kedro run --pipelines full_eval

# The fast tier: no training, no compile, no subprocess of kedro/mlflow/jupyter, no second node.
FAST_TIER := not slow and not e2e and not multinode
test: setup
	$(BIN)/python -m pytest -m "$(FAST_TIER)" $(PYTEST_ARGS)

# Every tier (slow, e2e, multinode too): what CI runs.
test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench

# Shows the pipelines and the catalog as they are: it does not need (or regenerate) the demo data.
viz: $(VENV)/.installed
	$(BIN)/kedro viz run --host 127.0.0.1 $(if $(PORT),--port $(PORT))

# kedro-mlflow starts the `mlflow` executable: it must be on PATH.
mlflow-ui: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/kedro mlflow ui --host 127.0.0.1 $(if $(PORT),--port $(PORT))

# Jupyter itself is not part of the pinned stack (the tests execute the notebook with nbclient):
# installed into .venv on first use.
notebook: $(VENV)/.installed
	$(BIN)/python -c "import notebook" 2>/dev/null || $(PIP) install --quiet $(NOTEBOOK_SPEC)
	$(BIN)/jupyter notebook --ip 127.0.0.1 $(if $(PORT),--port $(PORT)) $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/inspect_outputs.ipynb

# New images through the best model: predict.* in conf/base/parameters.yml (or --params) -> image_predictions.
predict: $(VENV)/.installed
	$(BIN)/kedro run --pipelines predict

# The registered MLflow model over HTTP (every training run registers one):
#   make serve [ENV=mine | MODEL=models:/food_multids/3] [PORT=5001] [WORKERS=2 SERVE_THREADS=1]
# (each env registers its own name: food_multids for base/local, food_multids-<env> otherwise; the
# model's label spaces, env and version are printed before it serves)
# then POST to http://127.0.0.1:PORT/invocations. On CPU, one worker per core with one torch thread each
# serves the most images/s (bench/serve.py); on a GPU keep one worker.
MODEL ?= models:/food_multids$(if $(filter-out local base,$(ENV)),-$(ENV))/latest
WORKERS ?= 1
SERVE_THREADS ?=
serve: $(VENV)/.installed
	MLFLOW_TRACKING_URI=sqlite:///$(abspath mlflow.db) $(BIN)/food-multids describe $(MODEL)
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI=sqlite:///$(abspath mlflow.db) \
	  $(if $(SERVE_THREADS),OMP_NUM_THREADS=$(SERVE_THREADS)) $(BIN)/mlflow models serve -m $(MODEL) \
	  --env-manager local --host 127.0.0.1 --port $(or $(PORT),5001) --workers $(WORKERS)
