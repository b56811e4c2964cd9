"""Pictures from synthetic graphs: the SVG's structure (node, edge and label counts equal to the
graph's after the cap), PNG sizes, heatmaps at the image's size, feature cards."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

from atlas.errors import InputError
from atlas.graph import Graph, ImageMeta, NodeKind
from atlas.images import sha256_bytes
from atlas.render import (
    draw_card,
    draw_circuit,
    draw_global_circuit,
    draw_heatmap,
    draw_paths,
    draw_supernode_graph,
    select_edges,
    select_nodes,
)
from atlas.store.synthetic import synthetic_graph

SVG = "{http://www.w3.org/2000/svg}"


def small(seed: int = 0) -> Graph:
    return synthetic_graph(seed, n_layers=4, n_pos=6, n_features=60, n_logits=3, n_edges=500)


def ids_with(path: Path, prefix: str) -> list[str]:
    root = ET.parse(path).getroot()
    return [e.get("id", "") for e in root.iter() if e.get("id", "").startswith(prefix)]


def svg_text(path: Path) -> str:
    """The SVG's ``<text>`` elements' strings, one a line."""
    root = ET.parse(path).getroot()
    return "\n".join("".join(e.itertext()) for e in root.iter(f"{SVG}text"))


def picture(size: tuple[int, int] = (64, 48)) -> Image.Image:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 255, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def image_graph(im: Image.Image, rows: int = 2, cols: int = 2) -> Graph:
    """A synthetic graph whose token nodes at positions 1..rows*cols are image soft tokens."""
    g = synthetic_graph(3, n_layers=3, n_pos=rows * cols + 3, n_features=30, n_edges=300)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    sha = sha256_bytes(buf.getvalue())
    t = rows * cols
    positions = torch.arange(1, t + 1)
    kind = g.kind.clone()
    kind[(g.kind == NodeKind.TOKEN) & (g.pos >= 1) & (g.pos <= t)] = int(NodeKind.IMAGE)
    meta = g.metadata.model_copy(
        update={
            "image_sha256": sha,
            "image": ImageMeta(
                sha256=sha,
                width=im.width,
                height=im.height,
                format="PNG",
                n_tokens=t,
                rollout={"method": "attention_rollout"},
            ),
        }
    )
    grid = torch.tensor([[k // cols, k % cols] for k in range(t)])
    rollout = torch.rand(t, 8, 8, generator=torch.Generator().manual_seed(1))
    out = Graph(
        metadata=meta,
        input_ids=g.input_ids,
        kind=kind,
        layer=g.layer,
        pos=g.pos,
        feature=g.feature,
        token_id=g.token_id,
        activation=g.activation,
        influence=g.influence,
        logit_prob=g.logit_prob,
        edge_target=g.edge_target,
        edge_source=g.edge_source,
        edge_weight=g.edge_weight,
        image_positions=positions,
        image_grid=grid,
        rollout=rollout,
    )
    out.validate()
    return out


def kept_edges(g: Graph, kept: set[int]) -> int:
    return sum(
        1
        for t, s in zip(g.edge_target.tolist(), g.edge_source.tolist(), strict=True)
        if t in kept and s in kept
    )


@pytest.mark.parametrize("max_nodes", [10, 25, 1000])
def test_circuit_svg_counts_equal_the_capped_graph(tmp_path: Path, max_nodes: int) -> None:
    g = small()
    kept = select_nodes(g, max_nodes)
    kinds = g.kind.tolist()
    inner = [i for i in kept if kinds[i] in (NodeKind.FEATURE, NodeKind.ERROR)]
    assert len(inner) <= max_nodes
    assert all(i in kept for i, k in enumerate(kinds) if k == NodeKind.LOGIT)
    drawn = draw_circuit(g, tmp_path / "c.svg", max_nodes=max_nodes, max_edges=10_000)
    ids = g.node_ids()
    assert sorted(ids_with(drawn.path, "node-")) == sorted(f"node-{ids[i]}" for i in kept)
    edges = ids_with(drawn.path, "edge-")
    assert len(edges) == kept_edges(g, set(kept)) == len(drawn.edges)
    assert len(set(edges)) == len(edges)
    capped = draw_circuit(g, tmp_path / "capped.svg", max_nodes=max_nodes, max_edges=40)
    want = select_edges(g, kept, 40)
    assert len(want) == min(40, kept_edges(g, set(kept)))
    assert sorted(ids_with(capped.path, "edge-")) == sorted(
        f"edge-{ids[s]}-{ids[t]}" for t, s, _ in want
    )
    assert len(ids_with(capped.path, "node-")) == len(kept)


def test_edge_cap_keeps_the_largest_shares() -> None:
    g = small()
    kept = select_nodes(g, 1000)
    scale = torch.zeros(g.n_nodes)
    scale.index_add_(0, g.edge_target, g.edge_weight.abs())
    share = {
        (t, s): abs(w) / float(scale[t])
        for t, s, w in zip(
            g.edge_target.tolist(), g.edge_source.tolist(), g.edge_weight.tolist(), strict=True
        )
    }
    chosen = select_edges(g, kept, 25)
    lowest = min(share[(t, s)] for t, s, _ in chosen)
    picked = {(t, s) for t, s, _ in chosen}
    assert all(v <= lowest + 1e-9 for k, v in share.items() if k not in picked)
    assert [abs(w) / float(scale[t]) for t, _, w in chosen] == sorted(
        abs(w) / float(scale[t]) for t, _, w in chosen
    )


def test_circuit_cap_keeps_the_heaviest_nodes() -> None:
    g = small()
    mass = torch.zeros(g.n_nodes)
    mass.index_add_(0, g.edge_target, g.edge_weight.abs())
    mass.index_add_(0, g.edge_source, g.edge_weight.abs())
    inner = (g.kind == NodeKind.FEATURE) | (g.kind == NodeKind.ERROR)
    kept = set(select_nodes(g, 10))
    dropped = [i for i in range(g.n_nodes) if bool(inner[i]) and i not in kept]
    lightest_kept = min(float(mass[i]) for i in kept if bool(inner[i]))
    assert all(float(mass[i]) <= lightest_kept for i in dropped)
    with pytest.raises(InputError):
        select_nodes(g, 0)


def test_circuit_labels_tokens_and_supernode_boxes(tmp_path: Path) -> None:
    g = small()
    kept = select_nodes(g, 20)
    ids = g.node_ids()
    feats = [ids[i] for i in kept if g.kind[i] == NodeKind.FEATURE]
    labels = {feats[0]: "capital city"}
    drawn = draw_circuit(
        g,
        tmp_path / "c.svg",
        labels=labels,
        supernodes=[["capitals", feats[0], feats[1], "not-a-node"], ["absent", "nope"]],
        max_nodes=20,
    )
    text = svg_text(drawn.path)
    assert "capital city" in text
    assert "capitals" in text
    assert ids_with(drawn.path, "supernode-") == ["supernode-capitals"]
    for token in {t.strip() for t in g.metadata.tokens if t.strip()}:
        assert token in text


def test_circuit_png_size(tmp_path: Path) -> None:
    drawn = draw_circuit(small(), tmp_path / "c.png", max_nodes=15)
    with Image.open(drawn.path) as im:
        assert im.format == "PNG"
        assert im.size == drawn.size
        assert im.size[0] > 500 and im.size[1] > 300
        low, high = im.convert("L").getextrema()
        assert high - low > 100


def test_bad_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"svg or \.png"):
        draw_circuit(small(), tmp_path / "c.jpg")
    assert not (tmp_path / "c.jpg").exists()


def test_image_tokens_are_thumbnails(tmp_path: Path) -> None:
    im = picture()
    g = image_graph(im)
    kept = set(select_nodes(g, 1000))
    images = [i for i in kept if g.kind[i] == NodeKind.IMAGE]
    assert images
    drawn = draw_circuit(g, tmp_path / "c.svg", image=im, max_nodes=1000, max_edges=10)
    ids = g.node_ids()
    assert sorted(ids_with(drawn.path, "thumb-")) == sorted(f"thumb-{ids[i]}" for i in images)
    no_image = draw_circuit(g, tmp_path / "plain.svg", max_nodes=1000, max_edges=10)
    assert ids_with(no_image.path, "thumb-") == []
    assert len(ids_with(no_image.path, "node-")) == len(kept)


def test_heatmap_has_the_images_size(tmp_path: Path) -> None:
    im = picture((64, 48))
    g = image_graph(im)
    assert g.rollout is not None
    drawn = draw_heatmap(im, g.rollout, [0, 3], tmp_path / "h.png", min_side=0)
    with Image.open(drawn.path) as out:
        assert out.size == (64, 48) == drawn.size
    big = draw_heatmap(im, g.rollout, [0, 3], tmp_path / "big.png")  # small images are enlarged
    with Image.open(big.path) as out:
        assert out.size == (64 * 6, 48 * 6) == big.size
    with pytest.raises(InputError, match="not one of"):
        draw_heatmap(im, g.rollout, [4], tmp_path / "bad.png")
    with pytest.raises(InputError):
        draw_heatmap(im, g.rollout, [0], tmp_path / "h.svg")


def test_heatmap_of_one_token_is_the_rollout_rendering(tmp_path: Path) -> None:
    from atlas.attribution.rollout import render_map

    im = picture()
    g = image_graph(im)
    assert g.rollout is not None
    drawn = draw_heatmap(im, g.rollout, [2], tmp_path / "h.png", min_side=0)
    with Image.open(drawn.path) as out:
        assert out.tobytes() == render_map(g.rollout[2], im).tobytes()


def test_supernode_graph_paths_and_global_circuit(tmp_path: Path) -> None:
    rows = [
        {"source": "E_3_1", "target": "supernode:texas", "weight": 1.5, "n_edges": 3},
        {"source": "supernode:texas", "target": "supernode:capital", "weight": -0.5, "n_edges": 2},
        {"source": "supernode:capital", "target": "5_7_9", "weight": 2.0, "n_edges": 1},
    ]
    drawn = draw_supernode_graph(rows, tmp_path / "s.svg")
    assert len(ids_with(drawn.path, "node-")) == 4
    assert len(ids_with(drawn.path, "edge-")) == 3
    assert "texas" in svg_text(drawn.path)

    result = {
        "aggregate": [
            {"route": ["'Hand'", "feature:1/2 (hand)", "'5'"], "sum_score": 0.7},
            {"route": ["'Hand'", "feature:2/9", "'5'"], "sum_score": -0.2},
            {"route": ["'Hand'", "feature:1/2 (hand)", "feature:2/9", "'5'"], "sum_score": 0.1},
        ]
    }
    drawn = draw_paths(result, tmp_path / "p.svg")
    assert len(ids_with(drawn.path, "node-")) == 4
    assert len(ids_with(drawn.path, "edge-")) == 5
    assert "feature:1/2 (hand)" in svg_text(drawn.path)

    edges = [("a", "b", 1.0, 3), ("b", "c", -2.0, 2), ("a", "c", 0.5, 1)]
    drawn = draw_global_circuit(edges, tmp_path / "g.png")
    with Image.open(drawn.path) as im:
        assert im.size == drawn.size
    svg = draw_global_circuit(edges, tmp_path / "g.svg")
    assert len(ids_with(svg.path, "edge-")) == 3
    assert "n=3" in svg_text(svg.path)


def test_feature_card(tmp_path: Path) -> None:
    card = {
        "name": "feature:3/17",
        "label": "fingers on a hand",
        "top_tokens": [" five", " hand"],
        "top_values": [1.2, 0.8],
        "snippets": [{"text": "how many [fingers]", "activation": 3.5}],
        "crops": [{"image": picture(), "caption": "2.0 @ 0,1"}],
    }
    svg = draw_card(card, tmp_path / "card.svg")
    text = svg_text(svg.path)
    for needle in ("fingers on a hand", "feature:3/17", "·five", "how many [fingers]"):
        assert needle in text
    png = draw_card(card, tmp_path / "card.png")
    with Image.open(png.path) as im:
        assert im.size == png.size
    bare = draw_card({"name": "feature:0/1"}, tmp_path / "bare.png")
    assert bare.path.stat().st_size > 0
