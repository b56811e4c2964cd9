"""What a hostile or careless user meets at the store's boundary, against a real Neo4j: raw Cypher
over the graph only, regex patterns of bounded cost, bounded results, a server out of memory
reported once, one-line messages, no driver warnings, terminal escapes neutralised."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import neo4j
import pytest

from atlas.errors import CypherRefused, InputError, StoreBusy, StoreError
from atlas.store import read, supernodes
from atlas.store.connection import read_rows
from atlas.store.cypher import ResultTooLarge, run_cypher
from atlas.store.ingest import ingest_graph
from atlas.store.synthetic import synthetic_graph
from tests import REPO_ROOT

pytestmark = pytest.mark.timeout(600)

REPO = REPO_ROOT


def small(seed: int) -> Any:
    return synthetic_graph(
        seed, n_layers=4, n_pos=6, n_features=40, n_logits=3, n_edges=300, feature_pool=30
    )


def atlas_cli(settings: Any, tmp_path: Path, *args: str, timeout_s: float = 120) -> Any:
    """``atlas ARGS`` as a user runs it (the console entry point in a fresh process),
    against the test Neo4j; the child's peak resident memory is kept as ``max_rss_mb``."""
    rss = tmp_path / f"rss-{time.monotonic_ns()}"
    # VmHWM: this process's peak, not the forked parent's (ru_maxrss keeps that across exec)
    code = (
        "import atexit, re, sys\n"
        "def peak():\n"
        "    status = open('/proc/self/status').read()\n"
        "    open(" + repr(str(rss)) + ", 'w').write(re.search(r'VmHWM:\\s*(\\d+)', status)[1])\n"
        "atexit.register(peak)\n"
        "from atlas.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEO4J_")}
    env.update(
        NEO4J_URI=settings.neo4j_uri,
        NEO4J_USER=settings.neo4j_user,
        NEO4J_PASSWORD=settings.neo4j_password.get_secret_value(),
        ATLAS_HOME=str(tmp_path / "home"),
        PYTHONPATH=str(REPO),
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    proc.elapsed_s = time.monotonic() - t0  # type: ignore[attr-defined]
    proc.max_rss_mb = int(rss.read_text()) / 1024 if rss.exists() else None  # type: ignore[attr-defined]
    return proc


# --------------------------------------------------------------------------- issue 19 item 5
SERVER_COMMANDS = [
    "TERMINATE TRANSACTIONS 'neo4j-transaction-1'",
    "terminate transaction 'neo4j-transaction-1'",
    "SHOW TRANSACTIONS",
    "SHOW TRANSACTIONS YIELD transactionId, currentQuery RETURN *",
    "SHOW PROCEDURES",
    "SHOW FUNCTIONS",
    "SHOW SETTINGS",
    "SHOW USERS",
    "SHOW DATABASES",
    "SHOW INDEXES",
    "/* hidden */ SHOW // comment\n TRANSACTIONS",
]
OTHER_PROCEDURES = [
    "CALL dbms.listConfig() YIELD name RETURN name",
    "CALL dbms.components()",
    "CALL db.ping()",
    "CALL db.info()",
    "CALL `dbms`.`listConfig`()",
]
OTHER_DATABASES = [
    "USE neo4j MATCH (n) RETURN count(n) AS n",
    "USE system SHOW USERS",
    "CALL { USE neo4j MATCH (n) RETURN n } RETURN count(*) AS n",
]


@pytest.mark.parametrize("text", SERVER_COMMANDS + OTHER_PROCEDURES + OTHER_DATABASES)
def test_raw_cypher_refuses_what_is_not_a_query_over_the_graph(db: neo4j.Driver, text: str) -> None:
    with pytest.raises(CypherRefused) as exc:
        run_cypher(db, text)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("refused: ")


def test_queries_over_the_graph_still_run(db: neo4j.Driver) -> None:
    """Keywords inside strings, names and properties are data, and the graph's own vocabulary
    procedures are allowed."""
    ingest_graph(db, small(1))
    ok = [
        "MATCH (p:Prompt) WHERE p.text <> 'SHOW USERS; TERMINATE TRANSACTIONS' RETURN count(p) AS n",
        "MATCH (p:Prompt) RETURN p.show AS show_, p.`use` AS u LIMIT 1",
        "CALL db.labels() YIELD label RETURN label",
        "CALL db.schema.nodeTypeProperties()",
        "MATCH (f:Feature) WHERE f.fid =~ 'tset0/.*' RETURN count(f) AS n",
    ]
    for text in ok:
        run_cypher(db, text)
    labels = {r["label"] for r in run_cypher(db, "CALL db.labels() YIELD label").rows}
    assert "Prompt" in labels


def test_another_clients_transaction_cannot_be_terminated(
    db: neo4j.Driver, neo4j_uri: str, neo4j_settings: Any
) -> None:
    """One client holds a transaction open (a long query in progress); another client's
    ``atlas cypher`` cannot list or terminate it, and the first client commits."""
    ingest_graph(db, small(2))
    owner = neo4j.GraphDatabase.driver(
        neo4j_uri,
        auth=(neo4j_settings.neo4j_user, neo4j_settings.neo4j_password.get_secret_value())
        if neo4j_settings.neo4j_password.get_secret_value()
        else None,
    )
    started, release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def long_query() -> None:
        try:
            with owner.session(database="neo4j") as s, s.begin_transaction() as tx:
                tx.run("MATCH (p:Prompt) SET p.held = true").consume()
                started.set()
                release.wait(60)
                outcome["n"] = tx.run("MATCH (p:Prompt) RETURN count(p) AS n").single()["n"]
                tx.commit()
        except Exception as exc:  # reported below
            outcome["error"] = exc
            started.set()

    thread = threading.Thread(target=long_query)
    thread.start()
    try:
        assert started.wait(30)
        ids = [
            r["transactionId"]
            for r in db.execute_query(
                "SHOW TRANSACTIONS YIELD transactionId, currentQuery "
                "WHERE currentQuery IS NULL OR NOT currentQuery STARTS WITH 'SHOW'"
            ).records
        ]
        assert ids, "the owner's transaction is not listed"
        for tid in ids:
            with pytest.raises(CypherRefused):
                run_cypher(db, f"TERMINATE TRANSACTIONS '{tid}'")
            with pytest.raises(CypherRefused):
                run_cypher(db, "TERMINATE TRANSACTIONS $id", {"id": tid})
        with pytest.raises(CypherRefused):
            run_cypher(db, "SHOW TRANSACTIONS")
    finally:
        release.set()
        thread.join(60)
        owner.close()
    assert "error" not in outcome, outcome
    assert outcome["n"] == 1
    held = db.execute_query("MATCH (p:Prompt) WHERE p.held RETURN count(p) AS n")
    assert held.records[0]["n"] == 1


# --------------------------------------------------------------------------- issue 19 item 6
PATHOLOGICAL_LABEL = "a" * 33 + "!"


def _plant_label(db: neo4j.Driver, label: str) -> None:
    ingest_graph(db, small(3))
    db.execute_query(
        "MATCH (f:Feature) WITH f ORDER BY f.fid LIMIT 1 SET f.label = $label, "
        "f.top_tokens = [$label]",
        label=label,
    )


def test_supernode_patterns_run_in_the_dialect_they_are_checked_in(db: neo4j.Driver) -> None:
    """Python-only syntax is accepted and runs; valid Java-style classes run too; a pattern that
    would backtrack without end stops within the time budget with one line."""
    _plant_label(db, PATHOLOGICAL_LABEL)
    db.execute_query(
        "MATCH (f:Feature) WITH f ORDER BY f.fid SKIP 1 LIMIT 2 SET f.label = 'hand ' + f.fid"
    )
    assert supernodes.define_from_label(db, "named", r"(?P<w>hand) .*") == 2
    assert supernodes.define_from_label(db, "alpha", r"\p{Alpha}+ .*") == 2
    assert supernodes.define_from_token(db, "tok", r"a+!") == 1
    for pattern in (r"(a+)+b", r"(a|aa)+b", r"(.*){7}b", ".*" * 8 + "b"):
        t0 = time.monotonic()
        try:
            n = supernodes.define_from_label(db, "evil", pattern, timeout_s=2.0)
        except InputError as exc:
            assert "\n" not in str(exc) and "took longer than" in str(exc)
        else:
            assert n == 0  # the correct answer: nothing ends in "b"
        assert time.monotonic() - t0 < 10, pattern
    t0 = time.monotonic()
    with pytest.raises(InputError, match="took longer than 2 s"):
        supernodes.define_from_label(db, "evil", r"(a+?)+b", timeout_s=2.0)
    assert time.monotonic() - t0 < 10


def test_raw_cypher_refuses_regexes_of_unbounded_cost(db: neo4j.Driver) -> None:
    _plant_label(db, PATHOLOGICAL_LABEL)
    costly = [
        ("MATCH (f:Feature) WHERE f.label =~ '(a+)+b' RETURN f.fid", {}),
        ("MATCH (f:Feature) WHERE f.label =~ '(a|aa)*b' RETURN f.fid", {}),
        ("MATCH (f:Feature) WHERE f.label =~ '(.*){7}b' RETURN f.fid", {}),
        ("MATCH (f:Feature) WHERE f.label =~ '" + ".*" * 7 + "b' RETURN f.fid", {}),
        ("MATCH (f:Feature) WHERE f.label =~ $p RETURN f.fid", {"p": "(a*)*b"}),
        ("MATCH (f:Feature) WHERE f.label =~ '" + "a" * 300 + "' RETURN f.fid", {}),
        ("MATCH (f:Feature), (g:Feature) WHERE f.label =~ g.label RETURN f.fid", {}),
        ("MATCH (f:Feature) WHERE f.label =~ '(a+' + ')+b' RETURN f.fid", {}),
    ]
    for text, params in costly:
        t0 = time.monotonic()
        with pytest.raises(CypherRefused) as exc:
            run_cypher(db, text, params, timeout_s=5)
        assert time.monotonic() - t0 < 5 and "\n" not in str(exc.value), text
    res = run_cypher(db, "MATCH (f:Feature) WHERE f.label =~ 'a+!' RETURN count(f) AS n")
    assert res.rows == [{"n": 1}]
    res = run_cypher(
        db, "MATCH (f:Feature) WHERE f.label =~ $p RETURN count(f) AS n", {"p": "a{33}!"}
    )
    assert res.rows == [{"n": 1}]


# --------------------------------------------------------------------------- issue 19 item 7
def test_result_bytes_are_capped(db: neo4j.Driver) -> None:
    t0 = time.monotonic()
    with pytest.raises(ResultTooLarge, match=r"^result over 1 MB; narrow the query"):
        run_cypher(db, "RETURN range(1, 10000000) AS r", max_bytes=2**20)
    with pytest.raises(ResultTooLarge):
        run_cypher(db, "UNWIND range(1, 5000) AS i RETURN range(1, 1000) AS r", max_bytes=2**20)
    assert time.monotonic() - t0 < 60
    small_rows = run_cypher(db, "UNWIND range(1, 100) AS i RETURN i", max_bytes=2**20)
    assert len(small_rows.rows) == 100 and not small_rows.truncated


def test_cli_stops_a_huge_result_early_with_bounded_memory(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path
) -> None:
    proc = atlas_cli(neo4j_settings, tmp_path, "cypher", "RETURN range(1, 10000000) AS r")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert re.fullmatch(
        r"error: result over 64 MB; narrow the query or raise CYPHER_RESULT_MB\n", proc.stderr
    )
    assert proc.max_rss_mb is not None and proc.max_rss_mb < 1024, proc.max_rss_mb


def _transaction_memory_limit(db: neo4j.Driver) -> int:
    """The smaller non-zero of the per-transaction and the global transaction memory limits."""
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    records = db.execute_query(
        "SHOW SETTINGS YIELD name, value WHERE name IN "
        "['db.memory.transaction.max', 'dbms.memory.transaction.total.max'] RETURN value"
    ).records
    limits = []
    for r in records:
        m = re.fullmatch(r"([\d.]+)\s*([KMGT]iB|B)", str(r["value"]))
        if m and float(m.group(1)) > 0:
            limits.append(int(float(m.group(1)) * units[m.group(2)]))
    assert limits, "the test server has no transaction memory limit"
    return min(limits)


def test_server_out_of_memory_is_one_permanent_line(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A query over the server's transaction memory limit fails once, with one line: it is not
    retried as a transient fault (the driver would retry it for 30 s, with a warning each)."""
    n = _transaction_memory_limit(db) // 6
    text = f"UNWIND range(1, {n}) AS x WITH collect(x) AS c RETURN size(c) AS n"
    with caplog.at_level(logging.INFO, logger="neo4j"), pytest.raises(StoreError) as exc:
        run_cypher(db, text)
    assert not isinstance(exc.value, StoreBusy) and not exc.value.transient
    assert "out of memory" in str(exc.value) and "\n" not in str(exc.value)
    assert not [r for r in caplog.records if "retried" in r.getMessage()]
    proc = atlas_cli(neo4j_settings, tmp_path, "cypher", text)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "out of memory" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- issue 19 item 8
HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\x1b[0m \u202eevil\x9b31m tab\there"


def test_table_output_neutralises_terminal_escapes_and_json_stays_exact(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path
) -> None:
    g = small(4)
    g.metadata.prompt = HOSTILE_TEXT
    ingest_graph(db, g)
    db.execute_query("MATCH (f:Feature) SET f.label = $t", t="label\x1b[5m")
    table = atlas_cli(neo4j_settings, tmp_path, "query", "prompts")
    assert table.returncode == 0, table.stderr
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\t"):
        assert raw not in table.stdout
    assert "\\x1b" in table.stdout
    as_json = atlas_cli(neo4j_settings, tmp_path, "query", "prompts", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert "\x1b" not in as_json.stdout and "\x9b" not in as_json.stdout
    assert "\u202e" not in as_json.stdout
    assert json.loads(as_json.stdout)[0]["text"] == HOSTILE_TEXT
    # names are validated; a pattern and the member labels are stored text too
    assert supernodes.define_from_label(db, "sn", "label\x1b\\[5m") > 0
    shown = atlas_cli(neo4j_settings, tmp_path, "supernode", "show", "sn")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "label\\x1b[5m" in shown.stdout


# --------------------------------------------------------------------------- issue 19 item 13
def test_ordinary_queries_log_no_server_notifications(
    db: neo4j.Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty supernode on an empty atlas: the queries name labels and properties that do not
    exist yet, which the server would report as warnings."""
    db.execute_query("MERGE (:Supernode {name: 'empty'})")
    with caplog.at_level(logging.DEBUG, logger="neo4j.notifications"):
        assert read.active_prompts(db, "supernode:empty") == []
        assert read.neighbours(db, "supernode:empty") == []
        assert read.paths(db, "supernode:empty", "logit:x")["paths"] == []
        assert supernodes.list_supernodes(db)
    assert not [r for r in caplog.records if r.name.startswith("neo4j.notifications")]


def test_cli_says_one_line_or_nothing_on_stderr(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path
) -> None:
    db.execute_query("MERGE (:Supernode {name: 'empty'})")
    proc = atlas_cli(neo4j_settings, tmp_path, "query", "neighbours", "supernode:empty")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = atlas_cli(neo4j_settings, tmp_path, "cypher", "MATCH (n RETURN n")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr


def test_multi_line_server_messages_become_one_line(db: neo4j.Driver) -> None:
    """A syntax error's message quotes the query over several lines, with a caret."""
    with pytest.raises(StoreError) as exc:
        read_rows(db, "MATCH (n\nRETURN n", database="neo4j", what="probe")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("probe: ")
