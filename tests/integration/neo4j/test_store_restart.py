"""Neo4j restarted during an ``atlas import`` batch: the import retries, nothing is lost.

A dedicated local Neo4j (not the session's shared server, since this test restarts it) on a free
port; ``atlas import`` runs as a subprocess over a directory of synthetic graphs; once a few
prompts are stored the server is stopped (SIGTERM) and started again on the same store and port.
The import must finish with exit code 0 and leave every prompt exactly once, complete, with the
node, edge and aggregate counts of the graphs (recomputed here independently of the ingester).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import neo4j
import pytest

from atlas.cli.transfer import IMPORT_DRIVER_RETRY_S
from atlas.graph import Graph, NodeKind
from atlas.services import _proc
from atlas.store import queries as Q
from atlas.store.synthetic import synthetic_graph
from tests.servers import TEST_JVM_OPTIONS, launcher_build_root, spawn, subprocess_env

pytestmark = [pytest.mark.neo4j, pytest.mark.slow, pytest.mark.timeout(600)]

N_GRAPHS = 30
#: restart once this many prompts are stored (the rest go in after the restart)
STOP_AFTER = 3
#: seconds the server stays down: longer than the driver's own retry window for ``atlas import``
#: (``IMPORT_DRIVER_RETRY_S``), so the import's visible retry loop must ride the outage out
DOWN_S = 2 * IMPORT_DRIVER_RETRY_S
HEAP = "512m"
PAGECACHE = "512m"


def make_graph(seed: int) -> Graph:
    """A smallish graph; a small feature pool so features and feature pairs recur across prompts."""
    return synthetic_graph(
        seed, n_layers=6, n_pos=8, n_features=150, n_edges=1500, feature_pool=200
    )


def feature_pairs(g: Graph) -> dict[tuple[str, str], float]:
    """Summed weight of each (source feature, target feature) pair of one graph: its AGG rows."""
    tset = g.metadata.transcoders.content_hash
    kind, layer, feat = g.kind.tolist(), g.layer.tolist(), g.feature.tolist()
    pairs: dict[tuple[str, str], float] = defaultdict(float)
    for s, t, w in zip(
        g.edge_source.tolist(), g.edge_target.tolist(), g.edge_weight.tolist(), strict=True
    ):
        if kind[s] == NodeKind.FEATURE and kind[t] == NodeKind.FEATURE:
            pairs[(f"{tset}/{layer[s]}/{feat[s]}", f"{tset}/{layer[t]}/{feat[t]}")] += w
    return pairs


def n_distinct_features(g: Graph) -> int:
    return len(
        {
            (int(g.layer[i]), int(g.feature[i]))
            for i in range(g.n_nodes)
            if g.kind[i] == NodeKind.FEATURE
        }
    )


class Server:
    """A launcher Neo4j this test may stop and start again (same home, same port)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _proc.free_port()
        self.uri = f"bolt://127.0.0.1:{self.port}"

    def start(self) -> float:
        from atlas.services import neo4j_local

        t0 = time.monotonic()
        neo4j_local.start(
            home=self.home,
            port=self.port,
            heap=HEAP,
            pagecache=PAGECACHE,
            build_root=launcher_build_root(),
            die_with_parent=True,
            jvm_options=TEST_JVM_OPTIONS,
        )
        return time.monotonic() - t0

    def stop(self) -> float:
        from atlas.services import neo4j_local

        t0 = time.monotonic()
        neo4j_local.stop(home=self.home)
        return time.monotonic() - t0


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    from atlas.errors import ConfigError

    srv = Server(tmp_path / "neo4j-home")
    try:
        srv.start()
    except ConfigError as exc:  # no Java (or Maven for a first build) on this machine
        pytest.skip(f"cannot start a local Neo4j: {exc}")
    try:
        yield srv
    finally:
        srv.stop()


def count_complete(driver: neo4j.Driver) -> int | None:
    """Complete prompts stored, or None while the server does not answer."""
    try:
        recs = driver.execute_query(Q.COUNT_PROMPTS, database_="neo4j").records
    except (neo4j.exceptions.DriverError, neo4j.exceptions.Neo4jError):
        return None
    return int(recs[0]["n"])


def scalar(driver: neo4j.Driver, cypher: str) -> Any:
    return driver.execute_query(cypher, database_="neo4j").records[0][0]


def test_import_survives_neo4j_restart(server: Server, tmp_path: Path) -> None:
    from pydantic import SecretStr

    from atlas.settings import AtlasSettings

    graphs = [make_graph(seed) for seed in range(N_GRAPHS)]
    assert len({g.prompt_id for g in graphs}) == N_GRAPHS
    gdir = tmp_path / "graphs"
    for g in graphs:
        g.save(gdir / f"{g.prompt_id}.safetensors")

    settings = AtlasSettings(
        _env_file=None,  # type: ignore[call-arg]
        atlas_home=tmp_path / "atlas-home",
        neo4j_uri=server.uri,
        neo4j_user="neo4j",
        neo4j_password=SecretStr(""),
        redis_url=None,
    )
    env = subprocess_env(settings, drop=("NEO4J_", "INGEST_"))
    out_log, err_log = tmp_path / "import.out", tmp_path / "import.err"
    # small UNWIND batches: each prompt is several statements, so the restart can hit one mid-way
    argv = [sys.executable, "-m", "atlas", "import", str(gdir), "--batch-size", "100"]

    driver = neo4j.GraphDatabase.driver(server.uri, auth=None)
    try:
        with out_log.open("wb") as out, err_log.open("wb") as err:
            proc = spawn(argv, cwd=tmp_path, env=env, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 180
            stored_before = 0
            while time.monotonic() < deadline and proc.poll() is None:
                stored_before = count_complete(driver) or 0
                if stored_before >= STOP_AFTER:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "import ended before the restart:\n" + err_log.read_text()
            assert STOP_AFTER <= stored_before < N_GRAPHS
            stop_s = server.stop()
            time.sleep(DOWN_S)
            assert proc.poll() is None, (
                "import gave up while Neo4j was down:\n" + err_log.read_text()
            )
            start_s = server.start()
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = err_log.read_text(errors="replace")
        stdout = out_log.read_text(errors="replace")
        print(
            f"restart after {stored_before} prompts: stop {stop_s:.1f} s, down {DOWN_S:.0f} s, "
            f"start {start_s:.1f} s",
            f"\n--- import stderr ---\n{stderr}\n--- import stdout ---\n{stdout}",
        )
        assert code == 0, stderr
        # the import said it was retrying, one line per retry
        retries = re.findall(
            r"^warning: .*: Neo4j unreachable, retrying in \d+ s \(.*\)$", stderr, re.M
        )
        assert retries, stderr
        # ... and the driver's own retry and connection warnings stay off stderr
        assert not re.search(r"^WARNING neo4j|will be retried", stderr, re.M), stderr
        summary = re.search(
            r"(\d+) prompt\(s\) ingested \(\d+ edges\), (\d+) already stored", stdout
        )
        assert summary is not None, stdout
        # a prompt whose commit reached the server just before the connection broke is found
        # stored by the retry ("already stored"): together they are the whole batch
        assert int(summary[1]) + int(summary[2]) == N_GRAPHS
        assert int(summary[1]) >= N_GRAPHS - 1  # the database was empty: this import wrote all

        # every prompt exactly once and complete; nothing half-written
        recs = driver.execute_query(
            "MATCH (p:Prompt) RETURN p.id AS id, p.complete AS complete", database_="neo4j"
        ).records
        ids = [r["id"] for r in recs]
        assert sorted(ids) == sorted(g.prompt_id for g in graphs)
        assert all(r["complete"] is True for r in recs)
        per_prompt = driver.execute_query(
            "MATCH (n:Node) RETURN n.prompt AS id, count(n) AS n", database_="neo4j"
        ).records
        assert {r["id"]: r["n"] for r in per_prompt} == {g.prompt_id: g.n_nodes for g in graphs}
        assert scalar(driver, "MATCH (n:Node) RETURN count(n)") == sum(g.n_nodes for g in graphs)
        assert scalar(driver, "MATCH ()-[e:EDGE]->() RETURN count(e)") == sum(
            g.n_edges for g in graphs
        )
        assert scalar(driver, "MATCH (:Node)-[o:OF]->() RETURN count(o)") == sum(
            sum(1 for k in g.kind.tolist() if k != NodeKind.ERROR) for g in graphs
        )

        # the aggregates counted each prompt exactly once
        want: dict[tuple[str, str], list[float]] = defaultdict(list)
        for g in graphs:
            for key, w in feature_pairs(g).items():
                want[key].append(w)
        got = {
            (r["s"], r["t"]): r
            for r in driver.execute_query(
                "MATCH (a:Feature)-[g:AGG]->(b:Feature) RETURN a.fid AS s, b.fid AS t, "
                "g.n_prompts AS n, g.sum_w AS sw, g.max_w AS mx, g.min_w AS mn",
                database_="neo4j",
            ).records
        }
        assert set(got) == set(want)
        assert sum(r["n"] for r in got.values()) == sum(len(feature_pairs(g)) for g in graphs)
        assert max(len(ws) for ws in want.values()) > 1  # pairs do recur across prompts
        for key, ws in want.items():
            r = got[key]
            assert r["n"] == len(ws), key
            assert r["sw"] == pytest.approx(sum(ws), abs=1e-4), key
            assert r["mx"] == pytest.approx(max(ws), abs=1e-5), key
            assert r["mn"] == pytest.approx(min(ws), abs=1e-5), key
        assert scalar(driver, "MATCH (f:Feature) RETURN sum(f.n_prompts)") == sum(
            n_distinct_features(g) for g in graphs
        )

        # a bad file (here: JSON without metadata) is one clear line naming it, not retried
        bad = tmp_path / "bad.json"
        bad.write_text('{"nodes": []}')
        bad_run = subprocess.run(
            [sys.executable, "-m", "atlas", "import", str(bad), str(gdir)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = bad_run.stderr.strip().splitlines()
        assert bad_run.returncode == 1 and len(lines) == 1, bad_run.stderr
        assert lines[0].startswith(f"error: {bad}: "), lines
        assert scalar(driver, "MATCH (p:Prompt) RETURN count(p)") == N_GRAPHS
    finally:
        driver.close()
