"""The store's CLI against a real Neo4j: import, export, query, cypher, supernode, annotate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import neo4j
import pytest
import torch
from click.testing import CliRunner

from atlas.cli import cli, main
from atlas.graph import Graph, NodeKind
from atlas.store.synthetic import synthetic_graph, word

pytestmark = pytest.mark.timeout(600)


def small(seed: int) -> Graph:
    return synthetic_graph(
        seed,
        n_layers=4,
        n_pos=6,
        n_features=40,
        n_logits=3,
        n_edges=300,
        feature_pool=30,
        vocab_size=12,
    )


def invoke(settings: Any, *args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), obj={"settings": settings}, catch_exceptions=True)
    return result


def test_import_export_query_cycle(db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path) -> None:
    from atlas.interchange import write_json

    graphs = [small(s) for s in range(3)]
    graphs[0].save(tmp_path / "a.safetensors")
    write_json(graphs[1], tmp_path / "b.json")
    graphs[2].save(tmp_path / "sub" / "c.safetensors")
    r = invoke(
        neo4j_settings,
        "import",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.json"),
        str(tmp_path / "sub"),
    )
    assert r.exit_code == 0, r.output
    assert "3 prompt(s) ingested" in r.output
    r = invoke(neo4j_settings, "import", str(tmp_path / "a.safetensors"))
    assert "0 prompt(s) ingested" in r.output and "1 already stored" in r.output

    out = tmp_path / "out.json"
    r = invoke(neo4j_settings, "export", graphs[0].prompt_id[:10], "--out", str(out))
    assert r.exit_code == 0, r.output
    from atlas.interchange import graph_from_json

    back = graph_from_json(out)
    assert back.prompt_id == graphs[0].prompt_id
    assert torch.allclose(back.dense_adjacency(), graphs[0].dense_adjacency(), atol=1e-6)
    r = invoke(
        neo4j_settings, "export", graphs[0].prompt_id, "--out", str(tmp_path / "x.safetensors")
    )
    assert r.exit_code == 0, r.output
    assert torch.equal(
        Graph.load(tmp_path / "x.safetensors").dense_adjacency(), graphs[0].dense_adjacency()
    )

    g = graphs[0]
    tok = word(int(g.input_ids[1])).strip()
    logit = word(int(g.token_id[g.n_nodes - 1])).strip()
    r = invoke(
        neo4j_settings,
        "query",
        "paths",
        "--from",
        f"token:{tok}",
        "--to",
        f"logit:{logit}",
        "--max-hops",
        "3",
        "--format",
        "json",
        "--limit",
        "5",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert set(doc) >= {"paths", "aggregate"}
    for p in doc["paths"]:
        assert set(p) == {"prompt", "nodes", "weights", "score"}
    r = invoke(neo4j_settings, "query", "paths", "--from", f"token:{tok}", "--to", f"logit:{logit}")
    assert r.exit_code == 0, r.output

    i = next(i for i in range(g.n_nodes) if g.kind[i] == NodeKind.FEATURE)
    feat = f"feature:{int(g.layer[i])}/{int(g.feature[i])}"
    for args in (
        ["query", "active", feat],
        ["query", "contributors", f"logit:{logit}"],
        ["query", "neighbours", feat],
        ["query", "compare", graphs[0].prompt_id, graphs[1].prompt_id],
        ["query", "prompts"],
        ["supernode", "define", "first", "--feature", feat.split(":")[1]],
        ["supernode", "list"],
        ["supernode", "show", "first"],
        ["query", "supernode-graph", graphs[0].prompt_id],
        ["query", "active", "supernode:first"],
        ["annotate"],
        ["cypher", "MATCH (f:Feature) WHERE f.label IS NOT NULL RETURN count(f) AS n"],
        ["supernode", "delete", "first"],
    ):
        r = invoke(neo4j_settings, *args)
        assert r.exit_code == 0, (args, r.output, r.exception)
        r = (
            invoke(neo4j_settings, *args[:1], *args[1:], "--format", "json")
            if args[0] in ("query",)
            else r
        )
        assert r.exit_code == 0, (args, r.output, r.exception)
    r = invoke(
        neo4j_settings, "cypher", "MATCH (p:Prompt) RETURN count(p) AS n", "--format", "json"
    )
    assert json.loads(r.output)["rows"] == [{"n": 3}]


def test_cli_refusals_are_one_line(
    db: neo4j.Driver,
    neo4j_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("NEO4J_URI", neo4j_settings.neo4j_uri)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for argv, needle in (
        (["cypher", "MATCH (n) DETACH DELETE n"], "refused"),
        (["cypher", "LOAD CSV FROM 'file:///etc/passwd' AS r RETURN r"], "LOAD CSV"),
        (["query", "paths", "--from", "feature:x", "--to", "logit:y"], "bad feature"),
        (["supernode", "show", "nope"], "no supernode"),
        (["export", "abcdef", "--out", str(tmp_path / "o.json")], "no stored prompt"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        main(["import", str(bad)])
    assert "error: " in capsys.readouterr().err


def test_multi_file_import_goes_past_refused_files_and_says_what_it_stored(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """A refused file among several: the good ones are stored, and the one error line names the
    refused file and what was ingested (a bad file does not hide the others' fate)."""
    monkeypatch.setenv("NEO4J_URI", neo4j_settings.neo4j_uri)
    monkeypatch.setenv("NEO4J_DATABASE", neo4j_settings.neo4j_database)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    good_a = small(40).save(tmp_path / "a.safetensors")
    good_b = small(41).save(tmp_path / "c.safetensors")
    bad = tmp_path / "b.json"
    bad.write_text('{"nodes": []}')
    with pytest.raises(SystemExit) as exc:
        main(["import", str(good_a), str(bad), str(good_b)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 1
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), lines
    assert "2 prompt(s) ingested" in lines[0], lines
    with db.session(database=neo4j_settings.neo4j_database) as s:
        assert s.run("MATCH (p:Prompt) RETURN count(p) AS n").single()["n"] == 2
