"""Does the toy world's attribution graph mean something? Top paths from the hand token to "5".

Usage::

    .venv/bin/python bench/toy_report.py [--prompt "a hand has"] [--answer 5] [--source hand]

1. Labels every transcoder feature with its top-activating tokens on training-split corpus text
   (the words the feature fires on) and, after "=>", the two output tokens its decoder vector
   promotes most through the unembedding (logit lens).
2. Attributes the prompt with ``atlas.attribution.attribute`` on the shipped toy world.
3. Prints the features feeding the answer's logit, the features active on the source token and
   the top paths ``source token -> feature(s) -> logit`` ranked by the product of row-normalised
   absolute edge weights (each factor = the share of the target's total input that edge carries).
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch


def feature_labels(
    model: Any, tokenizer: Any, tensors: dict[int, dict[str, torch.Tensor]], n_docs: int = 400
) -> dict[tuple[int, int], str]:
    """``(layer, feature) -> "tok1 | tok2 | tok3"``: distinct tokens with the highest activations."""
    from atlas.toy.corpus import ToyCorpus
    from atlas.transcoders.training import apply_transcoder, collect_activations

    corpus = ToyCorpus(0)
    docs = list(corpus.documents(seed=4242, n=n_docs, min_words=48))
    acts = collect_activations(model, tokenizer, docs, sorted(tensors))
    words: list[str] = []
    for doc in docs:
        ids = tokenizer(doc, truncation=True, max_length=64).input_ids
        toks = tokenizer.convert_ids_to_tokens(ids)
        words.extend(f"{toks[i - 1]} [{toks[i]}]" for i in range(1, len(toks)))
    labels: dict[tuple[int, int], str] = {}
    for layer, t in tensors.items():
        x, _ = acts[layer]
        _, a = apply_transcoder(t, x)
        assert a.shape[0] == len(words)
        top_vals, top_idx = a.topk(min(200, a.shape[0]), dim=0)
        for f in range(a.shape[1]):
            seen: list[str] = []
            counts: collections.Counter[str] = collections.Counter()
            for v, i in zip(top_vals[:, f].tolist(), top_idx[:, f].tolist(), strict=True):
                if v <= 0:
                    break
                word = words[i].split("[")[1].rstrip("]")
                counts[word] += 1
                if word not in seen:
                    seen.append(word)
            labels[(layer, f)] = " | ".join(seen[:3]) if seen else "(dead)"
    # logit lens: which output tokens each feature's decoder vector promotes most directly
    unembed = model.get_output_embeddings().weight.detach()
    norm_w = model.model.norm.weight.detach()
    for layer, t in tensors.items():
        lens = (t["W_dec"] * norm_w) @ unembed.T
        top = lens.topk(2, dim=1).indices
        for f in range(top.shape[0]):
            outs = "|".join(tokenizer.convert_ids_to_tokens(top[f].tolist()))
            labels[(layer, f)] += f" => {outs}"
    return labels


def top_paths(
    adj: torch.Tensor, source: int, target: int, max_len: int = 4, beam: int = 8, k: int = 10
) -> list[tuple[float, list[int]]]:
    """Top ``k`` paths ``source -> ... -> target`` by the product of row-normalised |A|."""
    norm = adj.abs()
    norm = norm / norm.sum(1, keepdim=True).clamp_min(1e-12)
    done: list[tuple[float, list[int]]] = []
    frontier: list[tuple[float, list[int]]] = [(1.0, [target])]
    for _ in range(max_len):
        nxt: list[tuple[float, list[int]]] = []
        for score, path in frontier:
            row = norm[path[0]]
            vals, idx = row.topk(min(beam, row.shape[0]))
            for v, s in zip(vals.tolist(), idx.tolist(), strict=True):
                if v <= 0 or s in path:
                    continue
                if s == source:
                    done.append((score * v, [s, *path]))
                else:
                    nxt.append((score * v, [s, *path]))
        frontier = sorted(nxt, key=lambda t: -t[0])[: beam * 4]
    best: dict[tuple[int, ...], float] = {}
    for s, p in done:
        best[tuple(p)] = max(best.get(tuple(p), 0.0), s)
    return sorted(((s, list(p)) for p, s in best.items()), key=lambda t: -t[0])[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a hand has")
    parser.add_argument("--answer", default="5")
    parser.add_argument("--source", default="hand", help="source token (word) of the paths")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from atlas.attribution import attribute
    from atlas.models import load_model
    from atlas.toy.build import toy_paths
    from atlas.transcoders.loading import load_transcoders

    torch.set_num_threads(1)
    paths = toy_paths()
    model = load_model(paths.model_dir)
    tset = load_transcoders(paths.transcoder_dir, model)
    tensors = {
        int(f.stem.split("_")[1]): load_file(str(f))
        for f in sorted(paths.transcoder_dir.glob("layer_*.safetensors"))
    }
    labels = feature_labels(model.hf, model.tokenizer, tensors)

    res = attribute(args.prompt, model, tset)
    tok = model.tokenizer
    tokens = tok.convert_ids_to_tokens(res.input_ids.tolist())
    n_feat, n_layers, n_pos = res.n_features, res.n_layers, res.n_pos
    feats = res.active_features[res.selected_features]
    logit_toks = tok.convert_ids_to_tokens(res.logit_tokens.tolist())
    tok_base = n_feat + n_layers * n_pos
    logit_base = tok_base + n_pos

    def name(i: int) -> str:
        if i < n_feat:
            layer, pos, f = (int(v) for v in feats[i])
            return f"L{layer}/F{f}@{tokens[pos]}[{labels[(layer, f)]}]"
        if i < tok_base:
            return f"error L{(i - n_feat) // n_pos}@{tokens[(i - n_feat) % n_pos]}"
        if i < logit_base:
            return f"token '{tokens[i - tok_base]}'"
        return f"logit '{logit_toks[i - logit_base]}'"

    print(f"prompt: {args.prompt!r}  tokens: {tokens}")
    probs = ", ".join(
        f"{t}={p:.3f}" for t, p in zip(logit_toks, res.logit_probabilities.tolist(), strict=True)
    )
    print(f"logit targets: {probs}")
    rep, comp = res.scores()
    print(f"features: {n_feat} active, replacement score {rep:.3f}, completeness {comp:.3f}\n")
    if args.answer not in logit_toks:
        print(f"answer {args.answer!r} is not among the logit targets")
        return
    target = logit_base + logit_toks.index(args.answer)
    adj = res.adjacency.float()

    print(f"top direct inputs of logit '{args.answer}' (raw edge weight):")
    row = adj[target]
    for i in row.abs().topk(8).indices.tolist():
        print(f"  {float(row[i]):+8.3f}  {name(i)}")

    src_pos = max(i for i, t in enumerate(tokens) if t == args.source)
    source = tok_base + src_pos
    print(f"\nfeatures active on '{args.source}' (position {src_pos}):")
    for i in range(n_feat):
        layer, pos, f = (int(v) for v in feats[i])
        if pos == src_pos:
            act = float(res.activation_values[res.selected_features[i]])
            print(f"  L{layer}/F{f:<4} act {act:6.2f}  top tokens: {labels[(layer, f)]}")

    print(f"\ntop paths token '{args.source}' -> logit '{args.answer}' (score = prod of shares):")
    for score, path in top_paths(adj, source, target):
        print(f"  {score:.4f}  " + "  ->  ".join(name(i) for i in path))


if __name__ == "__main__":
    main()
