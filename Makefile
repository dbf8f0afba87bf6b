# The two commands of the README.
.PHONY: demo test

demo:
	@./scripts/setup.sh
	@.venv/bin/spine-fl simulate --out results/default

test:
	@./scripts/setup.sh
	@.venv/bin/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder
