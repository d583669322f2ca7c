# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install browser postgres demo test test-fast test-gpu gpu-check bench bench-quick repro offline-world lint format clean

# Installs the package with the whole pinned stack (requirements/constraints.txt: a set seen to install
# together here). Re-runs only when the pins change.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	# Three wheels share one cv2 folder: fail the install early if the result does not import.
	$(PY) -c "import cv2, mediapipe, dlib, face_recognition_models, insightface, onnxruntime; print('imports ok, cv2', cv2.__version__)"
	touch $(STAMP)

install: $(STAMP)

# The dashboards' browser tests drive Debian's chromium through Playwright (executable_path); Playwright's own
# browser download is never used. Installed only when missing (needs root or sudo, as on CI).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }
	@command -v chromium >/dev/null 2>&1 || { echo "chromium is still missing: install Debian's chromium package"; exit 1; }

# The PostgreSQL tests (review store, MLflow server backend) start a throw-away cluster from Debian's server
# binaries (initdb/pg_ctl under /usr/lib/postgresql/*/bin); installed only when missing, as chromium above.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing Debian's postgresql for the PostgreSQL tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "initdb is still missing: install Debian's postgresql package"; exit 1; }

demo: install
	$(VENV)/bin/magicid demo

test: install browser postgres
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The GPU checks of tests/gpu (issue 25), on a machine with CUDA; elsewhere they skip with the reason (`make test`
# collects and skips them too).
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu

# On a GPU machine that has the GPU stack but not this project's pins: installs only the missing small wheels
# (scripts/gpu_wheels.sh collects them), runs tests/gpu and the benchmarks with --device cuda, within 8 minutes.
gpu-check:
	scripts/gpu_check.sh

bench: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

bench-quick: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f --quick || exit 1; done

# The DVC pipeline, all six stages of dvc.yaml (sample_data -> build_idzoom -> validate, fit_backbone -> train ->
# evaluate); stage commands call the venv's `magicid`.
repro: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

# The offline world from scratch (issue 23): the data stages of dvc.yaml (sample set -> IDZoom version -> validation),
# then `magicid fit-world --refit` into fit_world.out_dir (models/offline_world: backbone + adapter + report +
# checksums). About 45 minutes on 2 CPU cores (README "Fitting the offline world"); `--set model.device=cuda` on a GPU.
# Interrupted: `magicid fit-world --resume` continues it.
offline-world: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro validate
	$(VENV)/bin/magicid fit-world --data data/idzoom --refit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs .pytest_cache
