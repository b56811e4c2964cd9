# Circuit Atlas: the two commands are `make test` and `make demo`; each sets up what it needs.
.PHONY: setup test demo smoke lint fmt typecheck db-start db-stop db-status help

help:
	@echo "make test   set-up + ruff format --check + ruff check + mypy + pytest (what CI runs)"
	@echo "make demo   set-up + atlas demo (toy prompts through the workers into Neo4j, then the answers)"
	@echo "make smoke  set-up + services check (Neo4j + schema, Redis, a task through a worker)"
	@echo "make setup  only the idempotent set-up (.venv, Redis, Java, Maven, launcher build)"

setup:
	dev/setup.sh

test:
	dev/test.sh

demo:
	dev/demo.sh

smoke: setup
	.venv/bin/python dev/services_demo.py

lint:
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

fmt:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

typecheck:
	.venv/bin/mypy

db-start:
	.venv/bin/atlas db start

db-stop:
	.venv/bin/atlas db stop

db-status:
	.venv/bin/atlas db status
