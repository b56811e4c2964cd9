"""Attribution engine: pruning against a straightforward dense implementation, logit
selection, layout and invariances (batch size, dtype), and the Graph conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atlas.attribution import (
    AttributionResult,
    attribute,
    compute_influence,
    find_threshold,
    graph_scores,
    prune,
    select_logits,
)
from atlas.attribution.pruning import _edge_threshold
from atlas.errors import AttributionError, InputError
from atlas.graph import AttributionSettings, Graph, NodeKind
from atlas.models import ModelInputs, load_model
from atlas.testing.tiny import BOS_ID, build_tiny_model, build_tiny_transcoders
from atlas.transcoders import load_transcoders

PROMPT = "The cat sat on the mat"


# ---------------------------------------------------------------------- dense reference
def _norm(a: torch.Tensor) -> torch.Tensor:
    a = a.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def _influence_ref(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    cur = w @ a
    out = cur.clone()
    while cur.any():
        cur = cur @ a
        out += cur
    return out


def _threshold_ref(scores: torch.Tensor, thr: float) -> torch.Tensor:
    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, 0) / s.sum()
    return s[min(int(torch.searchsorted(cum, thr)), len(cum) - 1)]


def _prune_ref(adj, w, n_tokens, n_logits, n_features, node_thr, edge_thr):
    """circuit-tracer's algorithm, written plainly on the dense matrix."""
    infl = _influence_ref(_norm(adj), w)
    node_mask = infl >= _threshold_ref(infl, node_thr)
    node_mask[-n_logits - n_tokens :] = True
    pruned = adj.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    np_ = _norm(pruned)
    pinf = _influence_ref(np_, w) + w
    scores = np_ * pinf[:, None]
    edge_mask = scores >= _threshold_ref(scores.flatten(), edge_thr)
    edge_mask &= adj != 0
    old = node_mask.clone()
    fe = n_features + 0
    end = adj.shape[0] - n_logits - n_tokens
    node_mask[:end] &= edge_mask[:, :end].any(0)
    node_mask[:fe] &= edge_mask[:fe].any(1)
    while not torch.equal(node_mask, old):
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:end] &= edge_mask[:, :end].any(0)
        node_mask[:fe] &= edge_mask[:fe].any(1)
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
    return node_mask, edge_mask, infl


def _random_graph(seed: int, n_feat: int = 40, n_layers: int = 3, n_pos: int = 5, k: int = 3):
    """A DAG in the reference layout: features at layers, errors, tokens, logits."""
    gen = torch.Generator().manual_seed(seed)
    n_err = n_layers * n_pos
    n = n_feat + n_err + n_pos + k
    layer = torch.cat(
        [
            torch.randint(0, n_layers, (n_feat,), generator=gen).sort().values,
            torch.arange(n_layers).repeat_interleave(n_pos),
            torch.full((n_pos,), -1),
            torch.full((k,), n_layers),
        ]
    )
    adj = torch.randn(n, n, generator=gen) * torch.rand(n, n, generator=gen).pow(4)
    # target rows: features and logits only; sources: strictly lower layer
    allowed = layer[:, None] > layer[None, :]
    allowed[n_feat : n_feat + n_err + n_pos] = False  # error/token rows are empty
    allowed[:, n - k :] = False  # logits are never sources
    adj = adj * allowed
    adj[torch.rand(n, n, generator=gen) < 0.3] = 0
    w = torch.zeros(n)
    w[n - k :] = torch.softmax(torch.randn(k, generator=gen), 0)
    return adj, w, n_feat, n_err, n_pos, k


@pytest.mark.parametrize("seed", range(6))
def test_influence_matches_dense_series(seed: int) -> None:
    adj, w, *_ = _random_graph(seed)
    ours, _ = compute_influence(adj, w, block=7)
    torch.testing.assert_close(ours, _influence_ref(_norm(adj), w), rtol=1e-5, atol=1e-7)
    # and the closed form w Â (I - Â)^-1
    a = _norm(adj).double()
    closed = w.double() @ a @ torch.linalg.inv(torch.eye(a.shape[0], dtype=a.dtype) - a)
    torch.testing.assert_close(ours.double(), closed, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_one_pass_influence_matches_series(seed: int) -> None:
    """The one-pass sweep (reference layout) = the series, with and without a node mask."""
    adj, w, n_feat, *_ = _random_graph(seed)
    mask = torch.rand(adj.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.7
    mask[n_feat:] = True
    for cm in (None, mask):
        series, inv_a = compute_influence(adj, w, col_mask=cm, block=7)
        sweep, inv_b = compute_influence(adj, w, col_mask=cm, block=7, n_features=n_feat)
        torch.testing.assert_close(sweep, series, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(inv_b, inv_a)


def test_one_pass_influence_falls_back_outside_the_layout() -> None:
    """A feature fed by a later feature breaks the sweep's order: the series is used."""
    adj, w, n_feat, *_ = _random_graph(0)
    adj[2, n_feat - 1] = 0.5
    series, _ = compute_influence(adj, w, block=7)
    sweep, _ = compute_influence(adj, w, block=7, n_features=n_feat)
    torch.testing.assert_close(sweep, series)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.5, 0.9, 0.98, 0.999])
def test_streamed_edge_threshold_matches_sort(seed: int, thr: float) -> None:
    adj, _, *_ = _random_graph(seed)
    row_w = torch.rand(adj.shape[0], generator=torch.Generator().manual_seed(seed))
    col = torch.ones(adj.shape[0])
    scores = adj.abs() * row_w[:, None]
    expected = find_threshold(scores.flatten(), thr)
    assert _edge_threshold(adj, row_w, col, thr, block=5) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("node_thr", "edge_thr"), [(0.8, 0.98), (0.5, 0.9), (0.95, 0.995)])
@pytest.mark.parametrize("block", [2, 64])
def test_prune_matches_dense_reference(
    seed: int, node_thr: float, edge_thr: float, block: int
) -> None:
    """Both edge-cut paths: blocks of 2 rows stream the whole adjacency under the node mask
    (the kept block is larger than the passes' working memory), 64 gather the kept block."""
    adj, w, n_feat, _, n_pos, k = _random_graph(seed)
    res = prune(
        adj, w, n_pos, k, n_feat, node_threshold=node_thr, edge_threshold=edge_thr, block=block
    )
    node_ref, edge_ref, infl_ref = _prune_ref(adj, w, n_pos, k, n_feat, node_thr, edge_thr)
    torch.testing.assert_close(res.node_influence, infl_ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(res.node_mask, node_ref)
    ours = torch.zeros_like(edge_ref)
    ours[res.edge_index[0], res.edge_index[1]] = True
    assert torch.equal(ours, edge_ref)
    # tokens and logits always kept; cumulative scores are a rank share in (0, 1]
    assert res.node_mask[-k - n_pos :].all()
    assert float(res.cumulative_scores.max()) == pytest.approx(1.0)


def test_prune_does_not_modify_adjacency() -> None:
    adj, w, n_feat, _, n_pos, k = _random_graph(0)
    before = adj.clone()
    prune(adj, w, n_pos, k, n_feat)
    assert torch.equal(adj, before)


@pytest.mark.parametrize("seed", range(4))
def test_graph_scores_match_dense(seed: int) -> None:
    adj, w, n_feat, n_err, n_pos, _ = _random_graph(seed)
    rep, comp = graph_scores(adj, w, n_feat, n_err, n_pos, block=4)
    a = _norm(adj)
    infl = _influence_ref(a, w)
    tok = infl[n_feat + n_err : n_feat + n_err + n_pos].sum()
    err = infl[n_feat : n_feat + n_err].sum()
    assert rep == pytest.approx(float(tok / (tok + err)), rel=1e-5)
    nef = 1 - a[:, n_feat : n_feat + n_err].sum(1)
    out = infl + w
    assert comp == pytest.approx(float((nef * out).sum() / out.sum()), rel=1e-5)


def test_select_logits_prefix_and_cap() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    unembed = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    ids, probs, vecs = select_logits(logits, unembed, max_n_logits=10, desired_logit_prob=0.8)
    assert ids.tolist() == [0, 1]
    ids, _, _ = select_logits(logits, unembed, max_n_logits=10, desired_logit_prob=0.85)
    assert ids.tolist() == [0, 1, 2]
    ids, _, _ = select_logits(logits, unembed, max_n_logits=2, desired_logit_prob=0.99)
    assert ids.tolist() == [0, 1]
    ids, probs, vecs = select_logits(
        logits, unembed, max_n_logits=10, desired_logit_prob=0.9, explicit=[3]
    )
    assert ids.tolist() == [3] and probs[0] == pytest.approx(0.06, rel=1e-5)
    torch.testing.assert_close(vecs[0], unembed[3] - unembed.mean(0))
    with pytest.raises(InputError):
        select_logits(logits, unembed, max_n_logits=3, desired_logit_prob=0.9, explicit=[7])


# ---------------------------------------------------------------------- engine on tiny models
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("attr")
    model_dir = build_tiny_model("gemma2", root / "m", n_layers=3)
    tc_dir = build_tiny_transcoders(model_dir, root / "t", d_transcoder=128)
    model = load_model(model_dir)
    return model_dir, tc_dir, model, load_transcoders(tc_dir, model)


@pytest.fixture(scope="module")
def result(tiny) -> AttributionResult:
    _, _, model, tset = tiny
    return attribute(PROMPT, model, tset, batch_size=16)


def test_layout(result: AttributionResult, tiny) -> None:
    _, _, model, _ = tiny
    r = result
    assert r.input_ids[0] == BOS_ID and r.n_pos == len(PROMPT) + 1
    af = r.active_features
    keys = (af[:, 0] * 10_000 + af[:, 1]) * 10_000 + af[:, 2]
    assert torch.equal(keys, keys.sort().values)  # sorted by (layer, pos, feature)
    assert (af[:, 1] > 0).all()  # position 0 is zeroed
    assert r.n_nodes == r.n_features + model.n_layers * r.n_pos + r.n_pos + r.n_logits
    assert r.adjacency.shape == (r.n_nodes, r.n_nodes) and r.adjacency.dtype == torch.float32
    e0 = r.n_features
    t1 = e0 + r.n_errors + r.n_pos
    assert not r.adjacency[e0:t1].any()  # error and token rows are empty
    assert not r.adjacency[:, r.n_nodes - r.n_logits :].any()  # logits are never sources
    # a feature row only has sources in lower layers
    lay = af[r.selected_features, 0]
    for i in torch.randperm(r.n_features, generator=torch.Generator().manual_seed(0))[:20]:
        cols = torch.nonzero(r.adjacency[i, : r.n_features]).flatten()
        assert (lay[cols] < lay[i]).all()
        err_cols = torch.nonzero(r.adjacency[i, e0 : e0 + r.n_errors]).flatten()
        assert (err_cols // r.n_pos < lay[i]).all()
        # and only positions <= its own
        assert (err_cols % r.n_pos <= af[i, 1]).all()
    assert r.logit_probabilities.sum() <= 1.0 + 1e-6
    assert torch.all(r.logit_probabilities[:-1] >= r.logit_probabilities[1:])


def test_batch_size_does_not_change_graph(result: AttributionResult, tiny) -> None:
    _, _, model, tset = tiny
    other = attribute(PROMPT, model, tset, batch_size=5)
    torch.testing.assert_close(other.adjacency, result.adjacency, atol=1e-5, rtol=1e-5)


def test_token_ids_prompt_equals_text_prompt(result: AttributionResult, tiny) -> None:
    _, _, model, tset = tiny
    ids = result.input_ids[1:]  # without BOS: the engine prepends it
    other = attribute(ids, model, tset, batch_size=16)
    assert torch.equal(other.input_ids, result.input_ids)
    torch.testing.assert_close(other.adjacency, result.adjacency, atol=1e-5, rtol=1e-5)


def _attribute_at(tiny, dtype: torch.dtype) -> AttributionResult:
    """The tiny model and transcoders loaded at ``dtype``, attributed on PROMPT."""
    model_dir, tc_dir, _, _ = tiny
    model = load_model(model_dir, dtype=dtype)
    tcs = load_transcoders(tc_dir, model, dtype=dtype)
    return attribute(PROMPT, model, tcs, batch_size=16)


def test_float64_model_agrees(result: AttributionResult, tiny) -> None:
    r64 = _attribute_at(tiny, torch.float64)
    assert torch.equal(r64.active_features, result.active_features)
    torch.testing.assert_close(r64.adjacency, result.adjacency, atol=1e-4, rtol=1e-4)


def test_bfloat16_runs_and_roughly_agrees(result: AttributionResult, tiny) -> None:
    rbf = _attribute_at(tiny, torch.bfloat16)
    assert rbf.adjacency.dtype == torch.float32
    assert torch.isfinite(rbf.adjacency).all()
    assert rbf.settings.dtype == "bfloat16"
    # logit rows over token/error columns are comparable regardless of feature sets
    a = rbf.adjacency[-rbf.n_logits :, rbf.n_features :][:, : result.n_errors + result.n_pos]
    b = result.adjacency[-result.n_logits :, result.n_features :][
        :, : result.n_errors + result.n_pos
    ]
    if torch.equal(rbf.logit_tokens, result.logit_tokens):
        assert float((a - b).abs().max()) < 0.1 * float(b.abs().max()) + 0.05


def test_to_graph_unpruned_keeps_every_edge(result: AttributionResult) -> None:
    g = result.to_graph(prune=False)
    assert g.n_nodes == result.n_nodes
    assert g.n_edges == int((result.adjacency != 0).sum())
    torch.testing.assert_close(g.dense_adjacency(), result.adjacency)
    kinds = g.kind.tolist()
    assert kinds.count(NodeKind.LOGIT) == result.n_logits
    assert kinds.count(NodeKind.TOKEN) == result.n_pos
    assert torch.isfinite(g.influence).all()
    rep, comp = result.scores()
    assert 0.0 <= rep <= 1.0 and 0.0 <= comp <= 1.0
    assert g.metadata.replacement_score == pytest.approx(rep)


def test_to_graph_pruned(result: AttributionResult, tmp_path: Path) -> None:
    g = result.to_graph(prune=True)
    assert 0 < g.n_nodes < result.n_nodes
    assert (g.kind == NodeKind.TOKEN).sum() == result.n_pos
    assert (g.kind == NodeKind.LOGIT).sum() == result.n_logits
    # edges are a subset of the adjacency with identical weights
    full = result.to_graph(prune=False)
    ids_full = {nid: i for i, nid in enumerate(full.node_ids())}
    ids = g.node_ids()
    for t, s, wgt in list(
        zip(g.edge_target.tolist(), g.edge_source.tolist(), g.edge_weight.tolist(), strict=True)
    )[:200]:
        assert result.adjacency[ids_full[ids[t]], ids_full[ids[s]]] == pytest.approx(wgt)
    # every kept feature has an outgoing and an incoming edge
    feats = torch.nonzero(g.kind == NodeKind.FEATURE).flatten()
    assert torch.isin(feats, g.edge_source).all() and torch.isin(feats, g.edge_target).all()
    path = g.save(tmp_path / f"{g.prompt_id}.safetensors")
    back = Graph.load(path)
    assert back.n_edges == g.n_edges and back.metadata.settings.pruned


def test_max_feature_nodes_selects_subset(tiny) -> None:
    _, _, model, tset = tiny
    r = attribute(PROMPT, model, tset, batch_size=8, max_feature_nodes=10)
    assert r.n_features == 10 and r.active_features.shape[0] > 10
    assert r.n_nodes == 10 + model.n_layers * r.n_pos + r.n_pos + r.n_logits
    r.to_graph()


def test_ranked_rows_equal_the_full_graph_on_the_selected_nodes(tiny) -> None:
    """The ranked path keeps only layer-trimmed rows per batch; each kept entry equals the
    all-features graph's entry between the same two nodes (and dropped columns are zeros)."""
    _, _, model, tset = tiny
    full = attribute(PROMPT, model, tset, batch_size=8)
    part = attribute(PROMPT, model, tset, batch_size=8, max_feature_nodes=24, update_interval=1)
    assert part.n_features == 24
    assert torch.equal(part.active_features, full.active_features)
    n_sel, n_rest = 24, part.n_nodes - 24
    index = torch.cat(
        [part.selected_features, full.n_features + torch.arange(n_rest)]
    )  # part's nodes in full's node order
    torch.testing.assert_close(
        part.adjacency, full.adjacency[index][:, index], rtol=1e-5, atol=1e-7
    )
    # error and token rows are empty, as in the reference layout
    assert not part.adjacency[n_sel : part.n_nodes - part.n_logits].any()


def test_explicit_logit_tokens(tiny) -> None:
    _, _, model, tset = tiny
    r = attribute(PROMPT, model, tset, explicit_logit_tokens=[5, 9])
    assert r.logit_tokens.tolist() == [5, 9]


def test_input_errors(tiny) -> None:
    _, _, model, tset = tiny
    with pytest.raises(InputError):
        attribute("x" * 300, model, tset)  # over the model's 256 positions
    with pytest.raises(InputError):
        attribute(PROMPT, model, tset, max_seq_len=5)
    with pytest.raises(InputError):
        attribute("", model, tset)
    with pytest.raises(InputError):
        attribute(torch.tensor([[1, 2], [3, 4]]), model, tset)
    with pytest.raises(AttributionError):
        attribute(PROMPT, model, tset, memory_limit_bytes=1000)


def test_memory_limit_caps_batch(tiny) -> None:
    _, _, model, tset = tiny
    r = attribute(PROMPT, model, tset, batch_size=64, memory_limit_bytes=16 * 2**20)
    assert 1 <= r.stats["batch"] < 64


def test_progress_reports_every_row(tiny) -> None:
    _, _, model, tset = tiny
    seen: list[tuple[int, int]] = []
    r = attribute(PROMPT, model, tset, batch_size=32, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (r.n_features + r.n_logits, r.n_features + r.n_logits)


def test_settings_object_equals_keywords(result: AttributionResult, tiny) -> None:
    """``settings=`` and the keyword shorthands are one definition: same graph, same record."""
    _, _, model, tset = tiny
    knobs = AttributionSettings(max_n_logits=3, node_threshold=0.7)
    by_object = attribute(PROMPT, model, tset, settings=knobs, batch_size=16)
    by_keyword = attribute(PROMPT, model, tset, max_n_logits=3, batch_size=16)
    assert by_object.n_logits == by_keyword.n_logits <= 3
    torch.testing.assert_close(by_object.adjacency, by_keyword.adjacency)
    assert by_object.settings.node_threshold == 0.7
    assert by_object.to_graph().metadata.settings.node_threshold == 0.7
    assert by_object.to_graph(node_threshold=0.5).metadata.settings.node_threshold == 0.5
    assert result.settings == AttributionSettings()  # the defaults live in one place
    with pytest.raises(InputError, match="max_n_logits"):
        attribute(PROMPT, model, tset, max_n_logits="many")  # type: ignore[arg-type]


def test_prefix_shortcut_switched_off_gives_the_same_graph(result: AttributionResult, tiny) -> None:
    """With the whole prompt declared bidirectional no causal shortcut is taken; on a causal
    model the graph must not change (the shortcuts are exact, and the switch is honoured)."""
    _, _, model, tset = tiny
    ids = result.input_ids
    inputs = ModelInputs(ids, bidirectional_prefix=int(ids.shape[0]))
    assert inputs.prefix_for(0) == inputs.n_pos
    whole = attribute(inputs, model, tset, batch_size=16)
    torch.testing.assert_close(whole.adjacency, result.adjacency, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- CLI
def test_cli_attribute_writes_artifact(tiny, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from atlas.cli import cli

    model_dir, tc_dir, _, _ = tiny
    out = tmp_path / "out"
    args = ["attribute", "--model", str(model_dir), "--transcoders", str(tc_dir)]
    args += ["--prompt", PROMPT, "--batch-size", "16", "--device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "nodes=" in res.output and "replacement=" in res.output
    artifacts = list(out.glob("*.safetensors"))
    assert len(artifacts) == 1
    g = Graph.load(artifacts[0])
    assert g.metadata.settings.pruned and g.metadata.model.family == "gemma2"
    assert artifacts[0].stem == g.prompt_id
    res = CliRunner().invoke(cli, [*args, "--no-prune", "--no-progress"])
    assert res.exit_code == 0, res.output


def test_console_script_attribute_ends_with_its_outputs_whole(tiny, tmp_path: Path) -> None:
    """The console script ends ``atlas attribute`` without the interpreter's teardown: the
    summary line, the artifact, the JSON and the per-phase timings are all there and whole."""
    import json
    import os
    import subprocess
    import sys

    model_dir, tc_dir, _, _ = tiny
    out = tmp_path / "out"
    timings = tmp_path / "timings.json"
    args = ["attribute", "--model", str(model_dir), "--transcoders", str(tc_dir)]
    args += ["--prompt", PROMPT, "--batch-size", "16", "--device", "cpu", "--out", str(out)]
    args += ["--no-progress", "--timings", str(timings)]
    script = Path(sys.executable).with_name("atlas")
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith(".json") and "nodes=" in res.stdout
    (artifact,) = out.glob("*.safetensors")
    graph = Graph.load(artifact)
    doc = json.loads(artifact.with_suffix(".json").read_text())
    assert len(doc["nodes"]) == graph.n_nodes
    phases = json.loads(timings.read_text())
    names = [p["phase"] for p in phases["phases"]]
    assert names[0].startswith("start") and "attribute()" in names and names[-1].startswith("JSON")
    assert all(p["cpu_s"] >= 0 for p in phases["phases"]) and phases["peak_rss_bytes"] > 0


def test_cli_overlong_prompt_is_one_line_error(tiny, tmp_path: Path, capsys) -> None:
    from atlas.cli import main

    model_dir, tc_dir, _, _ = tiny
    argv = ["attribute", "--model", str(model_dir), "--transcoders", str(tc_dir)]
    argv += ["--prompt", "y" * 400, "--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "tokens" in err and "Traceback" not in err
