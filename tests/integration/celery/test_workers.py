"""Workers, jobs and the inline pipeline against a real Neo4j, a real Redis and real workers.

Fast tests first (payloads, batch files, the worker command, error sorting, the retry policy),
then the inline mode on Neo4j, then real ``celery worker`` subprocesses: a batch with poison
prompts, a worker killed with SIGKILL mid-task, and Redis restarted mid-batch; then job records in
a database that does not exist, broker faults, and the exit status of the real console script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from atlas.errors import AttributionError, InputError, ServiceUnavailable
from tests import REPO_ROOT
from tests.helpers import build_tiny_world, run_console

#: A prompt long enough that attribution takes a noticeable time on the tiny model (and short
#: enough that a solo-pool worker busy with it still answers the fixture's ping in time).
SLOW_PROMPT = "The quick brown fox jumps over the lazy dog."


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(model dir, transcoder dir) of a tiny seeded Llama (character-level tokenizer)."""
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


def _specs(world: tuple[str, str], prompts: list[str]) -> list[Any]:
    from atlas.pipeline.payloads import PromptSpec

    return [PromptSpec(prompt=p, model=world[0], transcoders=world[1]) for p in prompts]


def _count(driver: Any, query: str, **params: Any) -> int:
    with driver.session() as session:
        return int(session.run(query, **params).single()[0])


def _prompt_copies(driver: Any, prompt_id: str) -> int:
    return _count(driver, "MATCH (p:Prompt {id: $id}) RETURN count(p)", id=prompt_id)


def _node_count(driver: Any, prompt_id: str) -> int:
    return _count(driver, "MATCH (n:Node {prompt: $id}) RETURN count(n)", id=prompt_id)


# --------------------------------------------------------------------------- payloads, files, CLI
def test_payloads_are_strict_and_round_trip_through_json() -> None:
    from pydantic import ValidationError

    from atlas.pipeline.payloads import AttributePayload, IngestPayload, PromptSpec

    spec = PromptSpec(prompt="a hand has", max_feature_nodes=100)
    payload = AttributePayload(spec=spec, job_id="j", item=3, enqueued_at=1.5)
    wire = json.loads(json.dumps(payload.model_dump(mode="json")))
    assert AttributePayload.model_validate(wire) == payload
    with pytest.raises(ValidationError):
        PromptSpec.model_validate({"prompt": "x", "unknown_field": 1})
    with pytest.raises(ValidationError):
        PromptSpec(prompt="   ")
    with pytest.raises(ValidationError):
        IngestPayload.model_validate({"prompt_id": "p", "artifact": "a", "extra": True})
    # the spec id ignores `force` (a forced re-run is the same request) but nothing else
    assert spec.spec_id() == spec.model_copy(update={"force": True}).spec_id()
    fewer = spec.attribution.model_copy(update={"max_n_logits": 3})
    assert spec.spec_id() != spec.model_copy(update={"attribution": fewer}).spec_id()


def test_batch_file_errors_name_the_line(tmp_path: Path) -> None:
    from atlas.pipeline.submit import parse_batch_file

    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"prompt": "a hand has"}\n\n"a spider has"\n{"prompt": "x", "max_n_logits": 2}\n'
    )
    specs = parse_batch_file(good)
    assert [s.prompt for s in specs] == ["a hand has", "a spider has", "x"]
    assert specs[2].attribution.max_n_logits == 2

    cases = {
        '{"prompt": "ok"}\n{"prompt": "broken"\n': ":2: not valid JSON",
        '{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": "x", "colour": 1}\n': ":3: colour:",
        '{"prompt": ""}\n': ":1: prompt:",
        "[1, 2]\n": ":1: expected a JSON object",
        '{"prompt": "x", "max_n_logits": 0}\n': ":1: max_n_logits:",
        "\n\n": "no prompt specs",
    }
    for text, expected in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(InputError) as err:
            parse_batch_file(bad)
        assert expected in str(err.value), (text, str(err.value))
        assert "\n" not in str(err.value)


def test_batch_cli_malformed_file_enqueues_nothing(
    tmp_path: Path, neo4j_settings: Any, neo4j_driver: Any
) -> None:
    from atlas.cli import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a hand has"}\n{"prompt": "a spider has", "bogus": 1}\n')
    jobs_before = _count(neo4j_driver, "MATCH (j:Job) RETURN count(j)")
    env = {
        "ATLAS_HOME": str(neo4j_settings.atlas_home),
        "NEO4J_URI": neo4j_settings.neo4j_uri,
        "REDIS_URL": "",
    }
    result = CliRunner().invoke(cli, ["batch", str(bad)], env=env)
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError)
    assert ":2: bogus:" in str(result.exception)
    assert _count(neo4j_driver, "MATCH (j:Job) RETURN count(j)") == jobs_before


def test_importing_the_tasks_loads_no_model_and_no_torch() -> None:
    """Models load lazily in the worker process, never at import (so never before a fork)."""
    code = (
        "import sys, workers.tasks as t\n"
        "from atlas import engine\n"
        "assert 'torch' not in sys.modules, 'torch imported at import time'\n"
        "assert not engine.PROCESS_ENGINES._items\n"
        "names = set(t.app.tasks)\n"
        "assert {'atlas.attribute', 'atlas.ingest', 'atlas.annotate'} <= names, names\n"
        "c = t.app.conf\n"
        "assert c.task_acks_late and c.worker_prefetch_multiplier == 1\n"
        "assert c.task_reject_on_worker_lost and c.accept_content == ['json']\n"
        "assert c.broker_transport_options['visibility_timeout'] >= 3600\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))}
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"  # never contacted at import
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_worker_command_sets_up_a_gpu_worker(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    from atlas.cli import cli

    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execvpe", lambda f, argv, env: calls.append((f, argv, env)))
    env = {"REDIS_URL": redis_url}
    result = CliRunner().invoke(cli, ["worker", "--gpu", "1", "-c", "4", "--threads", "2"], env=env)
    assert result.exit_code == 0, result.output
    (_, argv, child_env) = calls[0]
    assert child_env["CUDA_VISIBLE_DEVICES"] == "1"
    assert child_env["OMP_NUM_THREADS"] == "2"
    joined = " ".join(argv)
    assert "-A workers.tasks worker" in joined
    assert "-c 1 " in joined  # one process per GPU, whatever -c said
    assert "--prefetch-multiplier 1" in joined
    assert "-Q attribute,ingest" in joined
    assert "-n atlas-gpu1@%h" in joined

    calls.clear()
    result = CliRunner().invoke(cli, ["worker", "--queues", "ingest", "-c", "2"], env=env)
    assert result.exit_code == 0
    assert "CUDA_VISIBLE_DEVICES" not in calls[0][2] or "CUDA_VISIBLE_DEVICES" in os.environ
    assert "-Q ingest -c 2" in " ".join(calls[0][1])

    result = CliRunner().invoke(cli, ["worker"], env={"REDIS_URL": ""})
    assert result.exit_code != 0
    assert "no broker configured" in str(result.exception)

    calls.clear()  # an unreachable broker: one clear error, no worker retrying forever
    result = CliRunner().invoke(cli, ["worker"], env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code != 0 and not calls
    assert "127.0.0.1:1" in str(result.exception)


def test_errors_are_sorted_into_transient_and_permanent() -> None:
    import neo4j.exceptions as nex
    import redis.exceptions as rex

    from atlas.retry import classify

    assert classify(ServiceUnavailable("Neo4j at x is not reachable"))[0] is True
    assert classify(nex.ServiceUnavailable("down"))[0] is True
    assert classify(rex.ConnectionError("refused"))[0] is True
    assert classify(InputError("prompt has 5001 tokens"))[0] is False
    assert classify(AttributionError("out of memory even at batch size 1"))[0] is False
    transient, reason = classify(RuntimeError("boom\nsecond line"))
    assert transient is False and reason == "RuntimeError: boom"


def test_inline_run_retries_transient_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inline pipeline retries a transient fault with backoff (atlas.retry) and records a
    permanent one as a failed result without retrying."""
    from atlas import retry
    from atlas.pipeline import payloads, steps

    sleeps: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", sleeps.append)
    calls = iter([ServiceUnavailable("Neo4j down"), ServiceUnavailable("Neo4j down"), None])

    def step(*_: Any, **__: Any) -> payloads.StepResult:
        exc = next(calls)
        if exc is not None:
            raise exc
        return payloads.StepResult(outcome="computed")

    monkeypatch.setattr(steps, "attribute_step", step)
    payload = payloads.AttributePayload(spec=payloads.PromptSpec(prompt="a cat"))
    assert steps.run_inline(payload, None, driver=None).outcome == "computed"  # type: ignore[arg-type]
    assert sleeps == [1.0, 2.0]  # exponential backoff

    sleeps.clear()

    def bad(*_: Any, **__: Any) -> payloads.StepResult:
        raise InputError("bad prompt")

    monkeypatch.setattr(steps, "attribute_step", bad)
    result = steps.run_inline(payload, None, driver=None)  # type: ignore[arg-type]
    assert result.outcome == "failed" and result.reason == "bad prompt"
    assert sleeps == []


def test_task_retry_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Celery wrapper retries transient faults (with growing countdowns) up to a cap,
    then records the item failed; permanent faults are recorded at once."""
    import workers.tasks as tasks
    from atlas.retry import TASK_BACKOFF

    class _Retry(Exception):
        pass

    class _Task:
        name = "atlas.attribute"
        app = type("App", (), {"atlas_settings": None})()

        def __init__(self, retries: int) -> None:
            self.request = type("R", (), {"retries": retries})()
            self.countdowns: list[float] = []

        def retry(self, exc: BaseException, countdown: float, max_retries: int) -> Exception:
            self.countdowns.append(countdown)
            return _Retry()

    recorded: list[tuple[Any, Any, str]] = []
    from atlas.pipeline import steps

    monkeypatch.setattr(tasks, "get_driver", lambda settings: "driver")
    monkeypatch.setattr(
        steps, "record_failure", lambda d, s, j, i, reason: recorded.append((j, i, reason))
    )
    first, later = _Task(0), _Task(5)
    for task in (first, later):
        with pytest.raises(_Retry):
            tasks._retry_or_fail(task, ServiceUnavailable("Redis down"), [("job", 1)])
    assert 2.0 <= first.countdowns[0] <= 2.5 and later.countdowns[0] >= 64.0
    assert recorded == []

    out = tasks._retry_or_fail(
        _Task(TASK_BACKOFF.max_retries or 0), ServiceUnavailable("down"), [("job", 2), ("job", 4)]
    )["results"][0]
    assert out["outcome"] == "failed" and "gave up after" in out["reason"]
    out = tasks._retry_or_fail(_Task(0), InputError("prompt too long"), [("job", 3)])["results"][0]
    assert out["outcome"] == "failed" and out["reason"] == "prompt too long"
    # every item of a chunk that gave up is recorded
    assert [(j, i) for j, i, _ in recorded] == [("job", 2), ("job", 4), ("job", 3)]


# --------------------------------------------------------------------------- inline mode (Neo4j)
def test_inline_batch_is_idempotent_and_rerun_skips_done(
    clean_neo4j: Any, neo4j_settings: Any, tiny_world: tuple[str, str]
) -> None:
    from atlas.graph import Graph, artifact_path
    from atlas.pipeline.submit import submit
    from atlas.store.jobs import JobStore

    driver = clean_neo4j
    settings = neo4j_settings
    assert settings.redis_url is None  # the embedded default: no broker, inline
    specs = _specs(tiny_world, ["hello world", "The cat sat", "1 + 2 = 3"])
    job, skipped = submit(settings, specs, source="test", driver=driver)
    assert skipped == 0
    store = JobStore(driver, settings.neo4j_database)
    summary = store.summary(job)
    assert (summary.done, summary.failed, summary.remaining) == (3, 0, 0)
    items = store.items(job)
    for item, spec in zip(items, specs, strict=True):
        assert item.outcome == "computed" and item.attempts == 1
        path = artifact_path(settings.resolved_artifact_dir, item.prompt_id or "")
        graph = Graph.load(path)
        # the id computed BEFORE running the model is the id of what the engine produced
        assert graph.prompt_id == item.prompt_id
        assert graph.metadata.prompt == spec.prompt
        assert _prompt_copies(driver, graph.prompt_id) == 1
        assert _node_count(driver, graph.prompt_id) == graph.n_nodes
        assert {"attribute_s", "ingest_s", "save_s"} <= set(item.timings)

    # re-running the same batch (plus one new prompt) only computes the new one
    job2, skipped2 = submit(
        settings, [*specs, *_specs(tiny_world, ["abc"])], source="test", driver=driver
    )
    assert skipped2 == 3
    items2 = store.items(job2)
    assert [i.outcome for i in items2] == ["present", "present", "present", "computed"]
    assert _count(driver, "MATCH (p:Prompt) RETURN count(p)") == 4

    # a worker handed an already-stored prompt (redelivery) recomputes nothing
    from atlas.pipeline.payloads import AttributePayload
    from atlas.pipeline.steps import attribute_step

    result = attribute_step(AttributePayload(spec=specs[0]), settings, driver=driver)
    assert result.outcome == "present" and result.prompt_id == items[0].prompt_id
    assert _count(driver, "MATCH (p:Prompt) RETURN count(p)") == 4


# --------------------------------------------------------------------------- real workers
def _wait_job(settings: Any, driver: Any, job: str, timeout_s: float = 240.0) -> Any:
    from atlas.pipeline.submit import wait_for_job

    return wait_for_job(settings, driver, job, timeout_s=timeout_s, poll_s=0.5)


def test_batch_through_a_worker_with_poison_prompts(
    clean_neo4j: Any, service_settings: Any, celery_worker: Any, tiny_world: tuple[str, str]
) -> None:
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import submit
    from atlas.store.jobs import JobStore

    driver = clean_neo4j
    good = ["a hand has", "the cat", "2 + 3 =", "blue sky"]
    specs = _specs(tiny_world, good[:2])
    specs.append(PromptSpec(prompt="x" * 1000, model=tiny_world[0], transcoders=tiny_world[1]))
    specs += _specs(tiny_world, good[2:])
    specs.append(PromptSpec(prompt="hi", model="/nonexistent/model", transcoders=tiny_world[1]))
    job, _ = submit(service_settings, specs, source="test", driver=driver)
    summary = _wait_job(service_settings, driver, job)
    assert (summary.done, summary.failed) == (4, 2), celery_worker.log_text()[-3000:]
    store = JobStore(driver, service_settings.neo4j_database)
    failed = {i.idx: i for i in store.items(job, ["failed"])}
    assert set(failed) == {2, 5}
    assert "more than the limit" in (failed[2].reason or "")
    assert "nonexistent" in (failed[5].reason or "")
    assert all(i.attempts == 1 for i in failed.values())  # permanent: never retried
    done = store.items(job, ["done"])
    assert all(_prompt_copies(driver, i.prompt_id or "") == 1 for i in done)
    assert {"queue_s", "attribute_s", "ingest_s"} <= set(done[0].timings)


@pytest.fixture()
def own_redis(tmp_path: Path) -> Any:
    """A Redis (AOF on) of this test's own, so a restart or a short visibility timeout
    affects nobody else."""
    from atlas.services import redis_local

    directory = tmp_path / "redis"
    server = redis_local.start(directory, die_with_parent=True)
    yield server
    redis_local.stop(directory)


def _on_own_redis(neo4j_settings: Any, own_redis: Any, visibility_s: int) -> Any:
    """The test Neo4j's settings on this module's own Redis, with a short visibility timeout
    (these tests kill or restart what the session's Redis serves to other tests)."""
    return neo4j_settings.model_copy(
        update={"redis_url": own_redis.url, "celery_visibility_timeout_s": visibility_s}
    )


def test_worker_killed_mid_task_is_redelivered_exactly_once(
    tmp_path: Path,
    clean_neo4j: Any,
    neo4j_settings: Any,
    own_redis: Any,
    start_worker: Callable[..., Any],
    tiny_world: tuple[str, str],
) -> None:
    from atlas.graph import Graph, artifact_path
    from atlas.pipeline.submit import submit
    from atlas.store.jobs import JobStore

    driver = clean_neo4j
    visibility = 12
    settings = _on_own_redis(neo4j_settings, own_redis, visibility)
    pause = tmp_path / "pause-dir"
    pause.mkdir()
    (pause / "pause").touch()  # the first worker stops right after claiming its chunk
    env = {"CELERY_VISIBILITY_TIMEOUT_S": str(visibility), "ATLAS_TEST_PAUSE_DIR": str(pause)}
    first = start_worker(settings=settings, extra_env=env)
    specs = _specs(tiny_world, [SLOW_PROMPT, "hello there", "one more"])
    job, _ = submit(settings, specs, source="test", driver=driver)
    store = JobStore(driver, settings.neo4j_database)
    deadline = time.monotonic() + 180
    while not list(pause.glob("held-*")):
        assert time.monotonic() < deadline, first.log_text()[-3000:]
        assert first.proc.poll() is None, first.log_text()[-3000:]
        time.sleep(0.1)
    first.proc.send_signal(signal.SIGKILL)  # mid-task: no ack, no clean-up
    first.proc.wait(timeout=30)
    assert store.items(job)[0].state == "attributing"
    (pause / "pause").unlink()  # the next worker runs through

    second = start_worker(settings=settings, extra_env=env)
    summary = _wait_job(settings, driver, job, timeout_s=240)
    assert (summary.done, summary.failed) == (3, 0), second.log_text()[-3000:]
    items = store.items(job)
    assert items[0].attempts >= 2  # the killed delivery and the redelivery
    for item in items:
        assert item.prompt_id is not None
        assert _prompt_copies(driver, item.prompt_id) == 1
        graph = Graph.load(artifact_path(settings.resolved_artifact_dir, item.prompt_id))
        assert _node_count(driver, item.prompt_id) == graph.n_nodes
    assert _count(driver, "MATCH (p:Prompt) RETURN count(p)") == 3
    second.stop()


def test_redis_restart_mid_batch_completes(
    clean_neo4j: Any,
    neo4j_settings: Any,
    own_redis: Any,
    start_worker: Callable[..., Any],
    tiny_world: tuple[str, str],
) -> None:
    from atlas.pipeline.submit import submit
    from atlas.services import redis_local
    from atlas.store.jobs import JobStore

    driver = clean_neo4j
    visibility = 15
    settings = _on_own_redis(neo4j_settings, own_redis, visibility)
    worker = start_worker(
        settings=settings, extra_env={"CELERY_VISIBILITY_TIMEOUT_S": str(visibility)}
    )
    prompts = [f"prompt number {i} is here" for i in range(10)]
    job, _ = submit(settings, _specs(tiny_world, prompts), source="test", driver=driver)
    store = JobStore(driver, settings.neo4j_database)
    deadline = time.monotonic() + 120
    while store.summary(job).done < 2:
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.1)
    assert store.summary(job).remaining > 0  # really mid-batch
    redis_local.stop(own_redis.directory)  # SIGTERM: Redis writes its AOF and exits
    time.sleep(2.0)
    redis_local.start(own_redis.directory, port=own_redis.port, die_with_parent=True)
    summary = _wait_job(settings, driver, job, timeout_s=300)
    assert (summary.done, summary.failed) == (10, 0), worker.log_text()[-3000:]
    for item in store.items(job):
        assert _prompt_copies(driver, item.prompt_id or "") == 1
    worker.stop()


# --------------------------------------------------------------------------- job records' database
def test_job_records_use_the_configured_database(neo4j_schema: Any) -> None:
    """Community Neo4j has one user database: job records aimed at another must fail with the
    store's one-line error, never land silently in the home database."""
    from atlas.errors import StoreError
    from atlas.store.jobs import JobStore, ensure_job_schema, prompts_present

    driver = neo4j_schema
    store = JobStore(driver, "nosuchdb")
    calls: list[Callable[[], Any]] = [
        lambda: store.create("j-nosuchdb", [{"prompt": "x"}], ["s"], source="t", mode="inline"),
        lambda: store.summary("j-nosuchdb"),
        lambda: ensure_job_schema(driver, "nosuchdb"),
        lambda: prompts_present(driver, "nosuchdb", ["p"]),
    ]
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        message = str(info.value)
        assert "nosuchdb" in message and "\n" not in message, message
    assert _count(driver, "MATCH (j:Job {id: 'j-nosuchdb'}) RETURN count(j)") == 0

    home = JobStore(driver, "neo4j")  # the same calls in the configured database work
    home.create("j-home-db", [{"prompt": "x"}], ["s"], source="t", mode="inline")
    assert home.summary("j-home-db").n_items == 1


# --------------------------------------------------------------------------- broker errors
def test_only_broker_faults_read_as_redis_unreachable(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, neo4j_settings: Any
) -> None:
    """A Redis that does not answer is ServiceUnavailable; a bug in sending (here a TypeError
    from the send itself) is raised as it is, not reported as an unreachable Redis."""
    from atlas.pipeline.payloads import AttributePayload, PromptSpec
    from workers import app as celery_app

    payloads = [AttributePayload(spec=PromptSpec(prompt="a cat"), job_id="j", item=0)]
    from atlas.services import _proc

    down = neo4j_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{_proc.free_port()}/0"}
    )
    with pytest.raises(ServiceUnavailable, match="is not reachable"):
        celery_app.send_attribute(down, payloads)

    def broken(*_: Any, **__: Any) -> None:
        raise TypeError("Object of type set is not JSON serializable")

    monkeypatch.setattr(celery_app.AtlasCelery, "send_task", broken)
    up = neo4j_settings.model_copy(update={"redis_url": redis_url})
    with pytest.raises(TypeError, match="not JSON serializable"):
        celery_app.send_attribute(up, payloads)


# --------------------------------------------------------------------------- exit codes
def _console(args: list[str], settings: Any, **env: str) -> subprocess.CompletedProcess[str]:
    """The real console script (``.venv/bin/atlas``), as a user's shell or CI runs it."""
    return run_console(args, settings, timeout=300, **env)


def test_failed_prompts_exit_nonzero_inline(
    tmp_path: Path, clean_neo4j: Any, neo4j_settings: Any, tiny_world: tuple[str, str]
) -> None:
    """``batch`` and ``jobs retry`` with a failed prompt exit 1 through the console script; a
    batch that fully succeeds exits 0."""
    model, tcs = tiny_world
    lines = [{"prompt": "hello world", "model": model, "transcoders": tcs}]
    lines.append({"prompt": "hi", "model": "/nonexistent/model", "transcoders": tcs})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = _console(["batch", str(bad)], neo4j_settings)
    assert out.returncode == 1, (out.stdout, out.stderr[-2000:])
    assert "1 done, 1 failed of 2" in out.stderr
    job = out.stdout.strip().splitlines()[-1]

    out = _console(["jobs", "retry", job], neo4j_settings)
    assert out.returncode == 1, (out.stdout, out.stderr[-2000:])
    assert "re-sending 1 items" in out.stderr

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(lines[0]) + "\n")
    out = _console(["batch", str(good)], neo4j_settings)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])


def test_failed_prompts_exit_nonzero_through_celery(
    clean_neo4j: Any, service_settings: Any, celery_worker: Any, tiny_world: tuple[str, str]
) -> None:
    tcs = tiny_world[1]
    args = ["enqueue", "hello", "--model", "/nonexistent/model", "--transcoders", tcs, "--wait"]
    out = _console([*args, "--timeout", "240"], service_settings)
    assert out.returncode == 1, (out.stderr[-2000:], celery_worker.log_text()[-2000:])
    assert "0 done, 1 failed of 1" in out.stderr
