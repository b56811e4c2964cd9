"""``atlas import`` of a hostile graph artifact against a real Neo4j: one line, atlas unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import neo4j
import pytest

from atlas.cli import main
from atlas.store.schema import apply_schema
from atlas.store.synthetic import synthetic_graph
from atlas.testing.artifacts import HOSTILE, write_hostile

pytestmark = pytest.mark.timeout(600)


def _counts(driver: neo4j.Driver, database: str) -> tuple[int, int]:
    records, _, _ = driver.execute_query(
        "MATCH (n) WITH count(n) AS nodes OPTIONAL MATCH ()-[r]->() RETURN nodes, count(r) AS rels",
        database_=database,
    )
    return int(records[0]["nodes"]), int(records[0]["rels"])


def test_import_refuses_hostile_artifacts_and_leaves_the_atlas_unchanged(
    clean_neo4j: neo4j.Driver,
    neo4j_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    apply_schema(clean_neo4j)
    database = neo4j_settings.neo4j_database
    monkeypatch.setenv("NEO4J_URI", neo4j_settings.neo4j_uri)
    monkeypatch.setenv("NEO4J_USER", neo4j_settings.neo4j_user)
    monkeypatch.setenv("NEO4J_PASSWORD", neo4j_settings.neo4j_password.get_secret_value())
    monkeypatch.setenv("NEO4J_DATABASE", database)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    graph = synthetic_graph(11, n_layers=4, n_pos=6, n_features=40, n_logits=3, n_edges=300)
    main(["import", str(graph.save(tmp_path / "good.safetensors"))])
    capsys.readouterr()
    before = _counts(clean_neo4j, database)
    other = synthetic_graph(12, n_layers=4, n_pos=6, n_features=40, n_logits=3, n_edges=300)
    for i, variant in enumerate(sorted(HOSTILE)):
        path = write_hostile(other, variant, tmp_path / f"bad{i}.safetensors")
        with pytest.raises(SystemExit) as exc:
            main(["import", str(path)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exc.value.code != 0, variant
        assert len(lines) == 1 and lines[0].startswith("error: "), (variant, lines)
        assert str(path) in lines[0], (variant, lines)
        assert _counts(clean_neo4j, database) == before, variant
