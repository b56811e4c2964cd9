"""Atlas questions against a real Neo4j on a synthetic atlas with planted feature groups:
supernode proposals recover the groups; the global circuit's edges equal the per-prompt edges
of the exported graphs; the contrast finds the planted difference; bad input is one line and
writes nothing."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import neo4j
import pytest
from click.testing import CliRunner

from atlas.cli import cli, main
from atlas.graph import NodeKind
from atlas.store import read
from atlas.store.contrast import contrast
from atlas.store.global_circuit import global_circuit
from atlas.store.ingest import ingest_graph
from atlas.store.prompt_filter import parse_filter, select_prompts
from atlas.store.proposals import list_proposals, propose_supernodes
from tests.planted import TSET, group_fids, planted_atlas, planted_graph

pytestmark = pytest.mark.timeout(600)


def invoke(settings: Any, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), obj={"settings": settings}, catch_exceptions=True)


@pytest.fixture
def refused(
    neo4j_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> Any:
    """Runs ``atlas ARGS`` as the console does; returns its one error line (asserted)."""
    monkeypatch.setenv("NEO4J_URI", neo4j_settings.neo4j_uri)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
        return err

    return run


@pytest.fixture
def planted(db: neo4j.Driver) -> neo4j.Driver:
    for g in planted_atlas(40):
        ingest_graph(db, g)
    return db


def _supernodes(driver: neo4j.Driver) -> list[tuple[str, str]]:
    with driver.session() as s:
        return [
            (r["n"], r["k"])
            for r in s.run("MATCH (s:Supernode) RETURN s.name AS n, s.kind AS k ORDER BY n")
        ]


def test_proposals_recover_planted_groups(
    planted: neo4j.Driver, neo4j_settings: Any, refused: Any
) -> None:
    found = propose_supernodes(planted, None, min_prompts=3)
    for g in range(3):
        want = set(group_fids(g))
        assert any(set(p["members"]) == want for p in found), (g, [p["members"] for p in found])
    best = found[0]
    assert best["coactivation"] > 0.9 and best["coherence"] > 0.9
    stored = {r["name"]: r for r in list_proposals(planted, kind="proposed")}
    assert set(stored) == {p["name"] for p in found}
    assert stored[best["name"]]["n_members"] == 4

    # CLI: list, accept with a rename, reject; a new run keeps the accepted one
    r = invoke(neo4j_settings, "supernode", "list", "--kind", "proposed", "--format", "json")
    assert r.exit_code == 0, r.output
    assert {x["name"] for x in json.loads(r.output)} == set(stored)
    names = sorted(stored)
    r = invoke(neo4j_settings, "supernode", "accept", names[0], "--as", "Group A")
    assert r.exit_code == 0, r.output
    r = invoke(neo4j_settings, "supernode", "reject", names[1])
    assert r.exit_code == 0, r.output
    kinds = dict(_supernodes(planted))
    assert kinds["Group A"] == "accepted" and names[1] not in kinds
    r = invoke(
        neo4j_settings,
        "supernode",
        "propose",
        "--prompts",
        "text:groups .*1",
        "--min-prompts",
        "3",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert any(set(p["members"]) == set(group_fids(1)) for p in doc)
    kinds = dict(_supernodes(planted))
    assert kinds["Group A"] == "accepted"
    assert sum(k == "proposed" for k in kinds.values()) == len(doc)
    # refusals: an accepted one cannot be rejected or accepted again
    for args in (
        ["reject", "Group A"],
        ["accept", "Group A"],
        ["reject", "nope"],
        ["accept", doc[0]["name"], "--as", "Group A"],
    ):
        refused("supernode", *args)


def test_prompt_filters(planted: neo4j.Driver) -> None:
    all_ids = select_prompts(planted, None)
    assert len(all_ids) == 40
    g1 = set(select_prompts(planted, "text:groups .*1"))
    with_answer = set(select_prompts(planted, "answer:w11"))
    # the answer is the first active group's logit
    texts = read.prompt_texts(planted, all_ids)
    assert with_answer == {p for p, t in texts.items() if t.split("groups ")[1].split()[0] == "1"}
    assert with_answer <= g1
    assert set(select_prompts(planted, "text:groups .*1 & !answer:w11")) == g1 - with_answer
    ids = set(select_prompts(planted, f"id:{all_ids[0][:6]}"))
    assert all_ids[0] in ids
    propose_supernodes(planted, None, min_prompts=3)
    name = list_proposals(planted, kind="proposed")[0]["name"]
    assert set(select_prompts(planted, f"supernode:{name}")) <= set(all_ids)
    assert str(parse_filter(" tag:x & !text:a ")) == "tag:x & !text:a"


def _recompute(
    driver: neo4j.Driver, ids: list[str], from_fids: set[str], to_token: int
) -> dict[tuple[str, str], list[float]]:
    """Per (source, target) key: [prompts, summed weight], from the exported graphs."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for pid in ids:
        graph, _ = read.export_graph(driver, pid)

        def key(i: int, graph: Any = graph) -> str | None:
            k = int(graph.kind[i])
            if k == NodeKind.FEATURE:
                fid = f"{TSET}/{int(graph.layer[i])}/{int(graph.feature[i])}"
                return "@from" if fid in from_fids else f"feature|{fid}"
            if k == NodeKind.LOGIT:
                tid = int(graph.token_id[i])
                return "@to" if tid == to_token else f"logit|planted-model/{tid}"
            if k == NodeKind.TOKEN:
                return f"token|planted-model/{int(graph.token_id[i])}"
            return None

        per: dict[tuple[str, str], float] = defaultdict(float)
        for s, t, w in zip(
            graph.edge_source.tolist(),
            graph.edge_target.tolist(),
            graph.edge_weight.tolist(),
            strict=True,
        ):
            ks, kt = key(s), key(t)
            if ks is None or kt is None or ks == kt:
                continue
            per[(ks, kt)] += w
        for pair, w in per.items():
            out[pair][0] += 1
            out[pair][1] += w
    return out


def test_global_circuit_agrees_with_exported_graphs(
    planted: neo4j.Driver, neo4j_settings: Any
) -> None:
    r = invoke(
        neo4j_settings,
        "supernode",
        "define",
        "G0",
        *[x for f in group_fids(0)[:2] for x in ("--feature", f.split("/", 1)[1])],
    )
    assert r.exit_code == 0, r.output
    res = global_circuit(planted, neo4j_settings, "supernode:G0", "logit:w10", "text:groups 0")
    ids = res["prompts"]
    assert ids and set(ids) <= set(select_prompts(planted, "text:groups 0"))
    keys = {(e["source"], e["target"]) for e in res["edges"]}
    later = {f"feature|{f}" for f in group_fids(0)[2:]}
    # the planted route: G0 -> layer 2 -> layer 3 -> logit, and G0 -> logit directly
    assert ("@from", "@to") in keys
    assert any(s == "@from" and t in later for s, t in keys)
    assert any(s in later and t == "@to" for s, t in keys)
    truth = _recompute(planted, ids, set(group_fids(0)[:2]), 10)
    for e in res["edges"]:
        n, w = truth[(e["source"], e["target"])]
        assert e["n_prompts"] == n
        assert e["mean_w"] == pytest.approx(w / n, rel=1e-5)
        assert e["era"] == pytest.approx(w / len(ids), rel=1e-5)
    top = max(res["edges"], key=lambda e: e["score"])
    assert top["n_prompts"] == len(ids)
    r = invoke(
        neo4j_settings,
        "query",
        "global",
        "--from",
        "supernode:G0",
        "--to",
        "logit:w10",
        "--prompts",
        "text:groups 0",
    )
    assert r.exit_code == 0, r.output
    assert "global circuit" in r.output


def test_contrast_finds_the_planted_group(planted: neo4j.Driver, neo4j_settings: Any) -> None:
    res = contrast(planted, neo4j_settings, "text:groups 2", "!text:groups .*2")
    top = res["features"][:4]
    assert {r["item"] for r in top} == {f"feature|{f}" for f in group_fids(2)}
    assert all(r["k_b"] == 0 and r["q_value"] < 1e-3 and r["effect"] > 0.9 for r in top)
    assert res["edges"][0]["item"].split(" -> ")[0] in {f"feature|{f}" for f in group_fids(2)}
    assert res["paths"] and res["paths"][0]["item"].endswith("logit|planted-model/12")
    r = invoke(
        neo4j_settings,
        "query",
        "contrast",
        "--a",
        "text:groups 2",
        "--b",
        "!text:groups .*2",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_a"] == res["n_a"]
    feats = res["summary"]["features"]
    assert feats["n_significant"] >= 4 and feats["min_q"] == res["features"][0]["q_value"]
    assert feats["n_tested"] >= feats["n_significant"] + feats["n_shared"]
    assert not set(feats["shared"]) & {f"feature|{f}" for f in group_fids(2)}
    r = invoke(
        neo4j_settings, "query", "contrast", "--a", "text:groups 2", "--b", "!text:groups .*2"
    )
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the table title wraps
    assert f"{feats['n_tested']} tested, {feats['n_significant']} with q < 0.05" in text


BAD_INPUT = [
    ["query", "global", "--from", "supernode:nope", "--to", "logit:w10"],
    ["query", "global", "--from", "feature:3/999", "--to", "logit:w10"],
    ["query", "global", "--from", "feature:0/100", "--to", "logit:nothing"],
    ["query", "global", "--from", "feature:0/100", "--to", "image"],
    [
        "query",
        "global",
        "--from",
        "feature:0/100",
        "--to",
        "logit:w10",
        "--prompts",
        "colour:red",
    ],
    [
        "query",
        "global",
        "--from",
        "feature:0/100",
        "--to",
        "logit:w10",
        "--prompts",
        "text:zzz",
    ],
    ["query", "global", "--from", "feature:0/100", "--to", "logit:w10", "--prompts", "text:("],
    [
        "query",
        "global",
        "--from",
        "feature:0/100",
        "--to",
        "logit:w10",
        "--prompts",
        "tag:none",
    ],
    [
        "query",
        "global",
        "--from",
        "feature:0/100",
        "--to",
        "logit:w10",
        "--prompts",
        "job:nojob",
    ],
    ["query", "contrast", "--a", "all", "--b", "text:groups 0"],
    ["query", "contrast", "--a", "text:groups 0", "--b", "answer:nothing"],
    ["query", "contrast", "--a", "text:groups 0", "--b", "supernode:nope"],
    ["supernode", "propose", "--prompts", "bogus"],
    ["supernode", "propose", "--prompts", "text:zzz"],
    ["supernode", "propose", "--prompts", "!all"],
    ["supernode", "propose", "--min-prompts", "0"],
    ["supernode", "propose", "--concept-threshold", "0"],
    ["supernode", "propose", "--prompts", "text:a & "],
]


def test_bad_input_is_one_line_and_writes_nothing(planted: neo4j.Driver, refused: Any) -> None:
    propose_supernodes(planted, None, min_prompts=3)
    before = _supernodes(planted)
    for args in BAD_INPUT:
        refused(*args)
        assert _supernodes(planted) == before, args


def test_text_only_atlas_has_no_image_end(db: neo4j.Driver, refused: Any) -> None:
    ingest_graph(db, planted_graph(7, []))
    assert "contains both" in refused("query", "global", "--from", "image", "--to", "logit:w19")


def test_annotation_with_a_label_source(planted: neo4j.Driver) -> None:
    from atlas.circuits.label_sources import FeatureEvidence
    from atlas.store.labels import label_features

    class Contexts:
        name = "contexts"

        def labels(self, evidence: Any) -> list[str | None]:
            assert all(isinstance(e, FeatureEvidence) for e in evidence)
            return [f"ctx {e.contexts[0]}" if e.contexts else None for e in evidence]

    n = label_features(planted, source=Contexts())
    assert n > 0
    with planted.session() as s:
        rec = s.run(
            "MATCH (f:Feature {fid: $fid}) RETURN f.label AS label, f.top_act_prompts AS p",
            fid=group_fids(0)[0],
        ).single()
    assert rec is not None and rec["label"].startswith("ctx ") and "[" in rec["label"]
    assert len(rec["p"]) == 10
    label_features(planted)
    with planted.session() as s:
        label = s.run(
            "MATCH (f:Feature {fid: $fid}) RETURN f.label AS label", fid=group_fids(0)[0]
        ).single()
    assert label is not None and label["label"].startswith("on: ")


@pytest.mark.slow
def test_validation_ablates_a_proposal_on_the_real_model(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Any
) -> None:
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import submit
    from atlas.store.proposals import validate_proposal
    from tests.helpers import build_tiny_world

    model, tcs = build_tiny_world(tmp_path / "world")
    texts = ["abcab", "abcba", "bcabc", "cabca"]
    specs = [PromptSpec(prompt=t, model=model, transcoders=tcs) for t in texts]
    job, _ = submit(neo4j_settings, specs, source="test", driver=db)
    assert len(select_prompts(db, f"job:{job}")) == 4
    found = propose_supernodes(db, f"job:{job}", min_prompts=2, store=True)
    assert found
    name = found[0]["name"]
    res = validate_proposal(db, neo4j_settings, name, model=model, transcoders=tcs, n_prompts=2)
    assert res["validation_prompts"] == 2 and res["validation_kl"] >= 0.0
    row = next(r for r in list_proposals(db, kind="proposed") if r["name"] == name)
    assert row["validation_kl"] == pytest.approx(res["validation_kl"])
    with db.session() as s:
        n = s.run(
            "MATCH (i:Intervention)-[:TOUCHES]->(:Supernode {name: $n}) RETURN count(i) AS n",
            n=name,
        ).single()
    assert n is not None and n["n"] == 2


def _proposal_state(driver: neo4j.Driver) -> list[Any]:
    with driver.session() as s:
        nodes = s.run(
            "MATCH (s:Supernode) OPTIONAL MATCH (s)-[:HAS]->(f:Feature) "
            "RETURN s.name AS n, s.kind AS k, s.score AS score, s.level AS level, "
            "s.parts AS parts, collect(f.fid) AS members ORDER BY n"
        ).data()
        sagg = s.run("MATCH ()-[g:SAGG]->() RETURN count(g) AS n").single()
    return [nodes, sagg["n"] if sagg else 0]


def test_proposals_are_stored_all_or_nothing(
    planted: neo4j.Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while storing the third proposal leaves the earlier run's proposals as they
    were and nothing of the new run; a run that succeeds then stores both levels."""
    from atlas.store import proposals

    first = propose_supernodes(planted, None, min_prompts=3)
    before = _proposal_state(planted)
    assert {r["n"] for r in before[0]} == {p["name"] for p in first}

    real, calls = proposals._store_one, []

    def failing(tx: Any, prop: dict[str, Any], pattern: str) -> None:
        calls.append(prop["name"])
        if len(calls) == 3:
            raise RuntimeError("disk full (simulated)")
        real(tx, prop, pattern)

    monkeypatch.setattr(proposals, "_store_one", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        propose_supernodes(planted, "text:groups .*1", min_prompts=3)
    assert len(calls) == 3
    assert _proposal_state(planted) == before

    monkeypatch.setattr(proposals, "_store_one", real)
    found = propose_supernodes(planted, "text:groups .*1", min_prompts=3)
    stored = {r["name"]: r for r in list_proposals(planted, kind="proposed")}
    assert set(stored) == {p["name"] for p in found}
    for p in found:
        assert stored[p["name"]]["level"] == p["level"]
        assert stored[p["name"]]["parts"] == p["parts"]
    levels = [p["level"] for p in found]
    assert levels == sorted(levels) and levels[0] == 1
    for c in (p for p in found if p["level"] == 2):
        assert c["name"].startswith("C") and set(c["parts"]) <= set(stored)


def test_cli_proposes_tight_groups_only_on_request(
    planted: neo4j.Driver, neo4j_settings: Any
) -> None:
    args = ["supernode", "propose", "--min-prompts", "3", "--format", "json"]
    r = invoke(neo4j_settings, *args, "--no-concepts")
    assert r.exit_code == 0, r.output
    assert {p["level"] for p in json.loads(r.output)} == {1}
    r = invoke(neo4j_settings, *args, "--concept-threshold", "1.0", "--dry-run")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    tight = [p for p in doc if p["level"] == 1]
    assert [p["level"] for p in doc] == sorted(p["level"] for p in doc)
    for c in (p for p in doc if p["level"] == 2):  # a concept is a union of tight groups + more
        parts = {m for p in tight if p["name"] in c["parts"] for m in p["members"]}
        assert parts <= set(c["members"]) and len(c["parts"]) >= 1


def test_a_new_run_never_overwrites_an_accepted_proposal(planted: neo4j.Driver) -> None:
    """A proposal accepted under its own name keeps its kind and members when a new run
    proposes the same group again: the new one takes a free name."""
    from atlas.store.proposals import accept

    first = propose_supernodes(planted, None, min_prompts=3)
    kept = first[0]
    accept(planted, kept["name"])
    again = propose_supernodes(planted, None, min_prompts=3)
    assert again[0]["members"] == kept["members"]
    assert again[0]["name"] == f"{kept['name']} (2)"
    kinds = dict(_supernodes(planted))
    assert kinds[kept["name"]] == "accepted"
    members = {
        r["fid"]
        for r in planted.execute_query(
            "MATCH (:Supernode {name: $n})-[:HAS]->(f:Feature) RETURN f.fid AS fid",
            n=kept["name"],
        ).records
    }
    assert members == set(kept["members"])
