# Two commands on a fresh machine:  `make serve` (embedded default)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: serve test install
install: $(STAMP)

# the first run sets up $(VENV) (minutes, quietly): one line before each long step says what it is doing
$(STAMP): pyproject.toml
	@echo "eep-hpc: setting up $(VENV) (first run, or pyproject.toml changed)"
	@test -x $(PY) || { echo "eep-hpc: creating the virtual environment $(VENV)"; python3 -m venv $(VENV); }
	@echo "eep-hpc: upgrading pip"
	@$(PY) -m pip install -q --upgrade pip
	@# the CPU build of torch (the CI machine carries this wheel); an unpinned torch would pull GBs of CUDA
	@$(PY) -c "import torch" 2>/dev/null || { echo "eep-hpc: installing torch 2.13.0"; \
		$(PY) -m pip install -q torch==2.13.0; }
	@echo "eep-hpc: installing eep-hpc and its dependencies (pip install -e '.[test]')"
	@$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@
	@echo "eep-hpc: $(VENV) is ready"

serve: $(STAMP)
	$(VENV)/bin/eep-hpc serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)
