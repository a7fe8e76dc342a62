# The two commands of the README. Everything else is a helper for them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test env lint bench clean

## quickstart: create the environment if needed and run the quickstart pipeline locally
quickstart: env
	$(BIN)/stepflow run examples.quickstart.pipeline:training

## test: create the environment and services if needed, then lint and run the whole test suite
test: env
	bash scripts/test.sh

## env: a virtualenv with stepflow (editable) and the development tools
env: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml examples/plugin-subprocess/pyproject.toml plugins/stepflow-docker/pyproject.toml \
		plugins/stepflow-sagemaker/pyproject.toml plugins/stepflow-localcloud/pyproject.toml plugins/stepflow-dask/pyproject.toml \
		plugins/stepflow-vertex/pyproject.toml plugins/stepflow-azureml/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' -e examples/plugin-subprocess -e plugins/stepflow-docker \
		-e plugins/stepflow-sagemaker -e plugins/stepflow-vertex -e plugins/stepflow-azureml -e plugins/stepflow-localcloud \
		-e plugins/stepflow-dask
	touch $@

lint: env
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: env
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
