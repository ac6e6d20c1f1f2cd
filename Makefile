# The two commands of the README. Each builds (once, cached by requirement hash) the Python
# environment it needs under ~/.cache/abqueue and runs in it; see scripts/env.sh.
.PHONY: demo test bench

demo:
	@venv=$$(scripts/env.sh) && $$venv/bin/abq demo $(ARGS)

# The control plane (scripts/controlplane.sh, ~25 minutes once, then cached) is built before the tests
# where Go is installed; without Go its tests are skipped, saying why.
test:
	@venv=$$(scripts/env.sh vllm) && { ! command -v go > /dev/null || scripts/controlplane.sh > /dev/null; } \
		&& $$venv/bin/ruff check . && $$venv/bin/ruff format --check . && $$venv/bin/mypy \
		&& ABQ_REQUIRE_VLLM=1 $$venv/bin/python -m pytest -q -n auto --dist worksteal

bench:
	@venv=$$(scripts/env.sh) && $$venv/bin/python bench/overhead.py
