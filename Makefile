# The two commands the README promises:
#   make serve   set up, fetch sample data, build the datastore, start the MONAI Label server on 127.0.0.1:8000
#   make test    set up, then run the whole test suite
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup data serve test bench-quick
setup:
	@bash scripts/setup_venv.sh

data: setup
	$(PY) -m sample_data

serve: data
	$(PY) -m networks.model_card

test: setup
	$(PY) -m pytest -q

bench-quick: setup
	$(PY) -m benchmarks.quantization --quick
