# rnnlab: train → evaluate → export → serve.  `make help` lists the targets.
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
RUNS    ?= runs
BUNDLES ?= bundles
PORT    ?= 50151
LM_RUN  ?= $(RUNS)/lm-timemachine
MT_RUN  ?= $(RUNS)/mt-fra-eng
# The serve-only environment of `make test-serve` (recreated on every run).
SERVE_VENV ?= .venv-serve
# 1: `make lint` also runs `ruff format --check` (on once the whole tree has been through `ruff format`).
RUFF_FORMAT ?= 1
# Use the read-only data folder beside the checkout as an offline mirror when it is there.
ifneq ($(wildcard ../shared/data),)
export RNNLAB_DATA_MIRROR ?= $(abspath ../shared/data)
endif

# Every target below installs the project first when pyproject.toml is newer than the last install.
INSTALLED := .make/installed

.PHONY: FORCE help install protos protos-check data train-lm eval-lm train-mt eval-mt export export-mt serve demo \
	bench bench-all lint test test-serve test-bundles nginx

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The stamp is stale too when Python imports rnnlab from another checkout (an editable install made
# elsewhere, e.g. by a CI clone since deleted).
INSTALLED_FROM := $(shell cd / && $(PYTHON) -c "import importlib.util as u; s = u.find_spec('lm'); print(s.origin if s else '')" 2>/dev/null)
ifneq ($(INSTALLED_FROM),$(CURDIR)/lm/__init__.py)
$(INSTALLED): FORCE
endif
FORCE:

# torch first, so that the project's `torch>=2.5` resolves to the CPU build instead of pulling CUDA wheels.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e '.[train,serve,dev]'
	@mkdir -p $(@D) && touch $@

install: ## install torch (CPU build) first, then rnnlab with every extra
	@rm -f $(INSTALLED)
	@$(MAKE) --no-print-directory $(INSTALLED)

protos: $(INSTALLED) ## regenerate the gRPC stubs in serving/api from protos/ (grpc_tools.protoc)
	$(PYTHON) -m serving.protogen

protos-check: $(INSTALLED) ## fail if the committed stubs differ from what grpc_tools.protoc makes of protos/
	$(PYTHON) -m serving.protogen --check

data: $(INSTALLED) ## fetch every registered corpus into the cache (the mirror is tried first)
	rnnlab-lm data fetch timemachine
	rnnlab-lm data fetch tinyshakespeare
	rnnlab-lm data fetch fra-eng

train-lm: $(INSTALLED) ## char-level GRU on The Time Machine (≈ 5 min on 2 cores)
	rnnlab-lm train --corpus timemachine --out $(LM_RUN) --max-minutes 4.5

eval-lm: $(INSTALLED) ## perplexity of the trained LM on the test split
	rnnlab-lm eval $(LM_RUN) --split test --json

export: $(INSTALLED) ## export the trained LM to an ONNX bundle
	rnnlab-lm export $(LM_RUN) --out $(BUNDLES)/lm-timemachine

train-mt: $(INSTALLED) ## GRU encoder-decoder with attention, en→fr on Tatoeba
	rnnlab-mt train --out $(MT_RUN)

eval-mt: $(INSTALLED) ## BLEU and chrF on the test split, beam 4
	rnnlab-mt eval $(MT_RUN) --split test --beam 4 --json

export-mt: $(INSTALLED) ## export the translator to an ONNX bundle
	rnnlab-mt export $(MT_RUN) --out $(BUNDLES)/mt-fra-eng

serve: $(INSTALLED) ## serve every bundle in $(BUNDLES) on $(PORT)
	rnnlab-serve --models $(BUNDLES) --port $(PORT)

demo: $(INSTALLED) ## train a small model, export it, serve it and stream text from it
	bash scripts/demo.sh

bench: $(INSTALLED) ## run the quick benchmarks; JSON results in bench/results/
	$(PYTHON) -m bench.run_all

bench-all: $(INSTALLED) ## also the long ones (tiny Shakespeare 20 min, translator training ≤ 60 min)
	$(PYTHON) -m bench.run_all --all

lint: $(INSTALLED) ## ruff (check; format --check with RUFF_FORMAT=1), the package layering (import-linter)
	$(PYTHON) -m ruff check .
	@if [ "$(RUFF_FORMAT)" = 1 ]; then echo "$(PYTHON) -m ruff format --check ."; $(PYTHON) -m ruff format --check .; fi
	lint-imports

test: $(INSTALLED) nginx ## the whole test suite
	$(PYTHON) -m pytest -q -n 2

# The replica tests run deploy/nginx/nginx.conf in a real nginx (tests/serving/test_nginx.py). It comes
# from the distribution's packages: installed here when missing (CI runs as root), loudly failing if not.
nginx: ## install nginx (Debian/Ubuntu package, needs root) when it is missing
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then exit 0; fi; \
	echo "nginx is missing: installing the distribution's package (apt-get install nginx)"; \
	{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx; } \
	|| { echo "error: could not install nginx (apt-get, as root); the nginx tests need it:" \
	     "install it with 'apt-get install nginx' (or your system's package) and rerun" >&2; exit 1; }

# No $(INSTALLED): this target makes its own environment. Installing '.[serve,test]' from PyPI into a fresh
# venv took 16 s on the 2-core machine (wheels only, nothing compiled); the tests ~20 s.
test-serve: nginx ## the serving tests in a fresh venv holding rnnlab[serve] alone (no torch), on tests/bundles
	rm -rf $(SERVE_VENV)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q '.[serve,test]'
	$(SERVE_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit('torch is installed' if u.find_spec('torch') else 0)"
	env -u PYTHONPATH $(SERVE_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider tests/serving tests/e2e

test-bundles: $(INSTALLED) ## regenerate the committed test bundles in tests/bundles (seeded, ~30 s)
	$(PYTHON) scripts/make_test_bundles.py
