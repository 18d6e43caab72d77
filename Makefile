# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtualenv .venv (Python >= 3.11) on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: venv demo test diagrams screenshot bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "qkvflow needs Python >= 3.11 (set PYTHON=python3.11)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/qkvflow demo

test: $(STAMP)
	$(BIN)/python -m pytest

diagrams: $(STAMP)
	$(BIN)/qkvflow render vaswani-base -o diagrams/vaswani-base.svg
	$(BIN)/qkvflow render vaswani-base -o diagrams/vaswani-base.png
	$(BIN)/qkvflow render vaswani-base -o diagrams/vaswani-base.mmd
	$(BIN)/qkvflow render vaswani-base -o diagrams/vaswani-base.dot
	$(BIN)/qkvflow render vaswani-base -o diagrams/vaswani-base-blocks.dot --level block
	$(BIN)/qkvflow run toy-en-zh --src "I love China <eos>" --tgt "<bos> 我 爱 中国" \
	  --attention diagrams/toy-en-zh-attention.svg >/dev/null
	$(BIN)/qkvflow run toy-en-zh --src "I love China <eos>" --tgt "<bos> 我 爱 中国" \
	  --attention diagrams/toy-en-zh-attention.png >/dev/null

# The report in headless Chromium (Debian's chromium, pip install playwright), kept as a picture.
screenshot: $(STAMP)
	QKVFLOW_SCREENSHOT=$(CURDIR)/diagrams/report.png $(BIN)/python -m pytest -q tests/views/test_report.py -k chromium

bench: $(STAMP)
	$(BIN)/python benchmarks/cold_start.py
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) qkvflow-demo .pytest_cache .hypothesis src/*.egg-info
