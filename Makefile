# Two commands on a fresh machine: `make run` (the app on the simulated probe) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch; plain `torch` would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
UI_DEBS := xvfb xauth libgl1 libgl1-mesa-dri libmtdev1

.PHONY: install run test test-fast ui-deps bench clean

# constraints.txt: the exact versions tested (closed-loop figures drift with other versions).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e ".[train,export,dev]"
	touch $(STAMP)

install: $(STAMP)

# Xvfb and Mesa so the UI tests run (not skip) on a machine with no display.
ui-deps:
	@if ! command -v xvfb-run >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(UI_DEBS) >/dev/null; \
	  else echo "xvfb-run missing and not root: UI tests will be skipped"; fi; fi

# The bedside app guiding on the simulated probe with the shipped model.
# With no display it falls back to the headless mode by itself.
run: install
	$(BIN)/pocus app

test: install ui-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not ui"

clean:
	rm -rf $(VENV) build *.egg-info
