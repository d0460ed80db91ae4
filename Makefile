# Copyright MedAttnSlicer contributors. Apache-2.0.
# The two commands the README promises:
#   make serve   set up, fetch sample data, build the datastore, start the MONAI Label server on 127.0.0.1:8000
#   make test    set up, then run the whole test suite
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup data serve test bench-quick lint
setup:
	@bash scripts/setup_venv.sh
	@$(PY) networks/kernels/build.py

data: setup
	$(PY) -m sample_data

# the MONAI Label server on the sample liver datastore, every model at or above its quality floor, bound to 127.0.0.1 (monailabel's launcher runs
# "python" from PATH: the venv's)
serve: data
	PATH="$(CURDIR)/.venv/bin:$$PATH" MONAILABEL_PYEXE="$(CURDIR)/$(PY)" .venv/bin/monailabel start_server \
		--app monailabel_app --studies .data/datastore/liver --host $(HOST) --port $(PORT)

# the app on a local PACS: Orthanc (Debian orthanc + orthanc-dicomweb) on 127.0.0.1:$(PACS_PORT) holding the sample DICOM
# CT (storage in .data/orthanc, kept between runs), and the server with --studies <its DICOMweb URL>; Ctrl-C stops both
PACS_PORT ?= 8042
.PHONY: serve-pacs
serve-pacs: data
	@set -e; ready=$$(mktemp -u); \
	$(PY) -m scripts.local_pacs --port $(PACS_PORT) --storage .data/orthanc --ready-file $$ready & pacs=$$!; \
	trap 'kill $$pacs 2>/dev/null || true' EXIT INT TERM; \
	for i in $$(seq 120); do [ -s $$ready ] && break; kill -0 $$pacs 2>/dev/null || exit 1; sleep 0.5; done; \
	[ -s $$ready ] || { echo "serve-pacs: Orthanc did not start"; exit 1; }; \
	PATH="$(CURDIR)/.venv/bin:$$PATH" MONAILABEL_PYEXE="$(CURDIR)/$(PY)" .venv/bin/monailabel start_server \
		--app monailabel_app --studies "$$(cat $$ready)" --host $(HOST) --port $(PORT)

# retrain the weights bundled in monailabel_app/model (fixed seeds; writes bundled_weights.json with held-out Dice),
# then each recipe's leave-one-volume-out figures (trained on all labelled volumes but one, evaluated on that one)
.PHONY: weights
weights: data
	$(PY) -m monailabel_app.train_bundled
	$(PY) -m monailabel_app.train_bundled --leave-one-out

# choose SaDNN-seg's training recipe on a validation split of the training volumes (the held-out CT is never seen),
# recorded in bundled_weights.json; the choice is then copied into networks/registry.py (a test checks they agree)
.PHONY: select-recipe
select-recipe: data
	$(PY) -m monailabel_app.select_recipe --family sadnn_seg \
		--candidate max_epochs=300 --candidate max_epochs=600

# OpenMP threads sleep rather than spin while waiting: on a shared, loaded machine spinning threads that wait for a
# descheduled peer made the suite up to 5x slower
# the small sample models the tests use are trained first, one per core at a time (cached outside the checkout)
test: setup
	$(PY) -m sample_models --jobs $$(nproc)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest -q

bench-quick: setup
	$(PY) -m benchmarks.quantization --quick

# The INT8 and kernel tests again with FBGEMM, ATen and our kernels forced to the AVX2 class (CPUs without AVX-512
# VNNI), whatever this CPU is; .ci/run calls it where the CPU's own class is higher (networks/isa.py)
.PHONY: test-avx2
test-avx2: setup
	$(PY) -m sample_models --jobs $$(nproc)
	MEDATTN_ISA=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} \
		$(PY) -m pytest -q tests/test_attention_kernels.py tests/test_quantization.py tests/test_attention_classifiers_int8.py

# re-quantise the bundled FP32 weights (INT8 families) without training, and re-evaluate them
.PHONY: requantize
requantize: data
	$(PY) -m monailabel_app.train_bundled --requantize

# lint and format check (ruff, configured in pyproject.toml); .ci/run runs it
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
