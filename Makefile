# The two commands of the README: `make app` and `make test`. Both set up from scratch.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# ffmpeg: Gradio encodes streamed audio with it (the app plays decoded speech as it is
# generated; without ffmpeg it plays the whole file at the end).
APP_PACKAGES := ffmpeg
APT_PACKAGES := chromium asterisk-core-sounds-en-g722 asterisk-core-sounds-en $(APP_PACKAGES)

.PHONY: app test lint format system app-system apt data clean

# requirements.txt pins the development set (the torch pair included); the project itself is
# installed editable on top, so the venv has the `vqwavenet` command.
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Debian packages the tests use (browser tests, a real-speech corpus check, the English
# prompts' transcripts for word error rates, streaming). Root on CI.
system:
	@$(MAKE) --no-print-directory apt PACKAGES="$(APT_PACKAGES)"

app-system:
	@$(MAKE) --no-print-directory apt PACKAGES="$(APP_PACKAGES)"

apt:
	@missing=""; for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (install them as root)"; fi; \
	fi

test: $(STAMP) system
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

app: $(STAMP) app-system
	$(PY) -m app --host 127.0.0.1 --port 7860

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
