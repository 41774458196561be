# Two commands on a fresh machine: `make demo` and `make test`. Both build their own virtual
# environment and install what they need (Python packages, and the npm packages of the test
# identity provider and of the MCP conformance tool when npm is available).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
NODE_DIRS := tests/idp tests/conformance
PYTEST_ARGS ?=

.PHONY: demo test lint format node clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

node:
	@for dir in $(NODE_DIRS); do \
	  if [ ! -f $$dir/package-lock.json ]; then continue; fi; \
	  if ! command -v npm >/dev/null 2>&1; then \
	    echo "npm not found: tests that need $$dir will skip"; continue; fi; \
	  if [ ! -f $$dir/node_modules/.stamp ] || [ $$dir/package-lock.json -nt $$dir/node_modules/.stamp ]; then \
	    npm ci --prefix $$dir --no-audit --no-fund --loglevel=error && touch $$dir/node_modules/.stamp; \
	  fi; \
	done

# make demo PORT=8010 MCP_PORT=8011 DEMO_DIR=/tmp/demo
PORT     ?= 8000
MCP_PORT ?= 8001
DEMO_DIR ?= instance/demo

demo: $(STAMP)
	@$(BIN)/broker demo --port $(PORT) --mcp-port $(MCP_PORT) --dir $(DEMO_DIR)

test: $(STAMP) node
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy broker providers migrations

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) tests/idp/node_modules tests/conformance/node_modules instance/demo
