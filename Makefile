# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create the virtualenv if it is missing and install mltag into it first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mltag-installed
DEMO_OUT ?= demo_out

.PHONY: demo test install browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mltag demo --out $(DEMO_OUT)

# The report test renders the HTML in headless Chromium; install it where apt-get can (root on
# Debian/Ubuntu). Without it that one check is skipped, with the reason printed.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1; } || \
	  echo "note: no chromium available; the report's browser check will be skipped"

# Lint and format are checked first (ruff, configured in pyproject.toml), then the suite.
# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
