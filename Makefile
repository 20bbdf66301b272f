# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create the virtualenv if it is missing and install mltag into it first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mltag-installed
DEMO_OUT ?= demo_out

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mltag demo --out $(DEMO_OUT)

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
