"""Store logic that needs no database: ingestion rows, validation, refusal by text, labels."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from atlas.circuits.labels import common_tags, short_label
from atlas.circuits.lens import logit_lens
from atlas.errors import CypherRefused, InputError
from atlas.graph import NodeKind
from atlas.store import queries as Q
from atlas.store.cypher import check_read_only, parse_params
from atlas.store.ingest import feature_ref, graph_rows
from atlas.store.supernodes import validate_name, validate_pattern
from atlas.store.synthetic import synthetic_graph


def test_rows_cover_every_node_and_edge_once() -> None:
    g = synthetic_graph(1, n_features=80, n_edges=900)
    rows = graph_rows(g)
    all_nodes = [r for rs in rows.nodes.values() for r in rs]
    assert sorted(r["idx"] for r in all_nodes) == list(range(g.n_nodes))
    assert len({r["id"] for r in all_nodes}) == g.n_nodes
    assert len(rows.edges) == g.n_edges
    # features deduplicated per prompt, with the max activation
    fids = {r["fid"] for r in rows.features}
    assert len(fids) == len(rows.features)
    want = defaultdict(float)
    for i in range(g.n_nodes):
        if g.kind[i] == NodeKind.FEATURE:
            ref = feature_ref("tset0", int(g.layer[i]), int(g.feature[i]))
            want[ref] = max(want[ref], float(g.activation[i]))
    assert {r["fid"]: r["act"] for r in rows.features} == pytest.approx(dict(want))


def test_agg_rows_sum_feature_pairs_within_the_prompt() -> None:
    g = synthetic_graph(2, n_features=60, n_edges=700, feature_pool=20)
    rows = graph_rows(g)
    want: dict[tuple[str, str], float] = defaultdict(float)
    n: dict[tuple[str, str], int] = defaultdict(int)
    for t, s, w in zip(
        g.edge_target.tolist(), g.edge_source.tolist(), g.edge_weight.tolist(), strict=True
    ):
        if g.kind[s] == NodeKind.FEATURE and g.kind[t] == NodeKind.FEATURE:
            key = (
                feature_ref("tset0", int(g.layer[s]), int(g.feature[s])),
                feature_ref("tset0", int(g.layer[t]), int(g.feature[t])),
            )
            want[key] += w
            n[key] += 1
    got = {(r["s"], r["t"]): r["w"] for r in rows.agg}
    assert got == pytest.approx(dict(want))
    assert {(r["s"], r["t"]): r["n"] for r in rows.agg} == dict(n)


def test_edge_filters() -> None:
    g = synthetic_graph(3, n_features=50, n_edges=500)
    rows = graph_rows(g, min_abs_weight=0.3)
    assert all(abs(w) >= 0.3 for _, _, w in rows.edges)
    assert len(rows.edges) == int((g.edge_weight.abs() >= 0.3).sum())
    rows = graph_rows(g, max_edges=100)
    assert len(rows.edges) == 100
    kth = sorted(g.edge_weight.abs().tolist(), reverse=True)[99]
    assert min(abs(w) for _, _, w in rows.edges) == pytest.approx(kth)
    assert rows.dropped_edges == g.n_edges - 100


def test_token_texts_and_refs() -> None:
    g = synthetic_graph(4, n_features=20, n_edges=100)
    rows = graph_rows(g)
    by_tid = {r["tid"]: r for r in rows.tokens}
    for r in rows.nodes["logit"]:
        tok = by_tid[r["ref"]]
        assert tok["text"] is not None and tok["text_norm"] == tok["text"].strip()
    assert all(r["ref"] is None for r in rows.nodes["error"])


def test_names_and_patterns() -> None:
    assert validate_name("  say Austin ") == "say Austin"
    assert validate_name('x"}) DETACH DELETE n //') == 'x"}) DETACH DELETE n //'
    for bad in ["", " ", "a\nb", "a\x00", "\u200b", "x" * 201]:
        with pytest.raises(InputError):
            validate_name(bad)
    assert validate_pattern("say .*") == "say .*"
    with pytest.raises(InputError):
        validate_pattern("(")


def assert_refused_by_text(*texts: str) -> None:
    """Each of ``texts`` is refused on its text alone (there is no database to ask)."""
    for text in texts:
        with pytest.raises(CypherRefused):
            check_read_only(None, text)  # type: ignore[arg-type]


def test_text_refusals_need_no_database() -> None:
    assert_refused_by_text(
        "LOAD CSV FROM 'file:///x' AS r RETURN r",
        "CALL { CREATE () } IN TRANSACTIONS",
        "  ",
        "EXPLAIN MATCH (n) RETURN n",
    )
    assert parse_params(["k=3", "s=abc", "l=[1,2]"]) == {"k": 3, "s": "abc", "l": [1, 2]}
    with pytest.raises(InputError):
        parse_params(["no-equals"])


def test_path_queries_are_bounded_templates() -> None:
    for h, text in Q.PATHS.items():
        assert f"{{1,{h}}}" in text and "__H__" not in text
        assert "$min_weight" in text and "$cap" in text


def test_logit_lens_matches_dense_product() -> None:
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.randn(37, 16, generator=gen)
    w_u = torch.randn(16, 50, generator=gen)
    lens = logit_lens(w_dec, w_u, k=5, chunk=8)
    scores = w_dec @ w_u
    assert torch.equal(lens.top_ids, torch.topk(scores, 5, dim=1).indices)
    assert torch.allclose(lens.bottom_values, torch.topk(scores, 5, dim=1, largest=False).values)
    clt = torch.randn(37, 3, 16, generator=gen)
    lens = logit_lens(clt, w_u, k=3)
    assert torch.equal(lens.top_ids, torch.topk(clt.sum(1) @ w_u, 3, dim=1).indices)
    with pytest.raises(InputError):
        logit_lens(torch.randn(3, 4), w_u)


def test_short_label() -> None:
    assert short_label(None, None) is None
    label = short_label(
        [" Austin", " Dallas", " Austin", " Houston"], [" Texas", " capital", " Texas"]
    )
    assert label == "on: Texas, capital → says: Austin, Dallas, Houston"
    assert len(short_label(["x" * 200], None) or "") <= 80


def test_short_label_names_the_tags_most_top_activations_share() -> None:
    tags = [["hand", "fingers:5"], ["hand", "fingers:6"], ["hand", "fingers:5"], []]
    assert common_tags(tags) == ["hand"]  # 3 of 4; fingers:5 on 2 of 4 only
    assert common_tags(tags, share=0.5) == ["hand", "fingers:5"]
    assert common_tags(tags, n=1, share=0.5) == ["hand"]
    assert common_tags([["dots"], ["dots"], []]) == ["dots"]  # two thirds
    assert common_tags([["dots"], [], []]) == []
    assert common_tags([]) == []
    label = short_label([" 5"], ["?"], image_regions=["2,3"], image_tags=tags[:3])
    assert label == "images: hand, fingers:5 → sees: image 2,3 → on: ? → says: 5"
    assert short_label(None, ["?"], image_tags=[[], []]) == "on: ?"


def _eval_cypher_arithmetic(expr: str, env: dict[str, int]) -> int:
    """Evaluate an integer Cypher expression of ``+``, ``*``, ``%``, literals and ``x.prop``
    (same meaning as in Python for non-negative integers)."""
    import ast

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return env[f"{node.value.id}.{node.attr}"]
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: a + b, ast.Mult: a * b, ast.Mod: a % b if b else 0}
            return ops[type(node.op)]
        raise AssertionError(f"unexpected Cypher in the pair key: {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


def test_cypher_pair_key_equals_python_pair_key() -> None:
    from atlas.store.ingest import agg_pair_key

    expr = Q.pair_key_expr("fa", "fb")
    assert expr in Q.DELETE_PROMPT_AGG
    for sl, si, dl, di in [
        (0, 0, 0, 0),
        (3, 1024, 5, 7),
        (127, 2**20 - 1, 1, 2),
        (128, 2**20 + 5, 300, 9),
    ]:
        env = {"fa.layer": sl, "fa.index": si, "fb.layer": dl, "fb.index": di}
        assert _eval_cypher_arithmetic(expr, env) == agg_pair_key(sl, si, dl, di)


def test_regex_cost_rules() -> None:
    from atlas.store.cypher import regex_risk

    for safe in [
        "early .*",
        r"\s*Austin",
        r"(?i).*\b(hands?|fingers?)\b.*",
        r"\d{4}-\d{2}-\d{2}",
        r"[a-z]+ [(+*)]",
        r"\Q(a+)+\E.*",
        r"\p{Alpha}+",
        r"(?<year>\d{4}) .*",
        r"(cat|dog) .*",
    ]:
        assert regex_risk(safe) is None, safe
    for costly in [
        "(a+)+b",
        "(a*)*b",
        "(a|aa)+b",
        "(a?){30}a{30}",
        "(.*){7}x",
        ".*.*.*.*x",
        "((ab)+c)+",
        "x" * 201,
    ]:
        assert regex_risk(costly) is not None, costly


def test_server_commands_are_refused_by_text() -> None:
    assert_refused_by_text(
        "TERMINATE TRANSACTIONS 'neo4j-transaction-1'",
        "SHOW TRANSACTIONS",
        "show settings yield name",
        "USE system SHOW USERS",
        "CALL dbms.listConfig()",
        "MATCH (n) WHERE n.label =~ '(a+)+' RETURN n",
        "MATCH (n) WHERE n.label =~ n.other RETURN n",
    )


def test_validation_drop_reads_the_clean_top_token_off_the_full_logits() -> None:
    from scipy.special import softmax

    from atlas.store.proposals import _top_token_drop

    base = [4.0, 1.0, 0.0, 0.0]
    steered = [-6.0, 3.0, 3.0, 3.0]  # the clean top token is last of the steered run
    p_b, p_s = softmax(base), softmax(steered)
    assert _top_token_drop(base, steered) == pytest.approx(p_b[0] - p_s[0])
    assert _top_token_drop(base, steered) > 0.9
    assert _top_token_drop([], []) is None
    assert _top_token_drop([1.0], [1.0, 2.0]) is None
