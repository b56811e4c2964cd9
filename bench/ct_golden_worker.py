"""Runs circuit-tracer 0.5.0 (the reference) on a local model + transcoders. ct venv ONLY.

This script is executed with ``bench/.venv-ct/bin/python`` (see ``bench/ct_env.sh``); it never runs in
the project's own venv and the project never imports it. It is the oracle side of
``bench/make_golden.py`` and ``bench/attribution.py``.

Input: a JSON job file::

    {"model_dir": "...", "transcoder_dir": "...", "scan": "tiny-gemma2-jumprelu",
     "out_dir": "...", "device": "cpu",
     "prompts": [{"slug": "p0", "prompt": "hello", "batch_size": 64,
                  "max_feature_nodes": null, "update_interval": 4}],
     "write_json": true, "measure_only": false, "backend": "nnsight"}

With ``"process": "pruned"`` the worker does what a user's script does and nothing else: load,
``attribute()``, then ``create_graph_files`` (pruning + the graph JSON); with ``"unpruned"``:
load, ``attribute()``, ``Graph.to_pt`` (the full graph). Only ``<slug>.timing.json`` is written
besides. The benchmark times such a process whole.

``backend`` is ``"nnsight"`` (default: the golden files) or ``"transformerlens"`` (circuit-tracer's
default and fastest backend; the benchmark peer). TransformerLens refuses local model paths, so
:func:`_load_transformerlens` builds its config from the local HF config by hand and converts the
HF weights with TransformerLens' own Gemma conversion (Gemma-2 only).

Output per prompt, under ``out_dir``:

* ``<slug>.safetensors``: ``input_ids``, ``active_features`` (n, 3) [layer, pos, feature],
  ``activation_values`` (n,), ``selected_features`` (m,), ``logit_tokens`` (k,),
  ``logit_probabilities`` (k,), ``adjacency`` (N, N) float32 (rows = targets), the pruning results
  of ``prune_graph`` at (0.8, 0.98): ``node_mask`` (N,) uint8, ``edge_index`` (2, E) int64 [target,
  source] of the edge mask, ``cumulative_scores`` (N,); header metadata ``golden`` (JSON with the
  prompt, settings, replacement/completeness scores, versions).
* ``<slug>.json``: circuit-tracer's own ``create_graph_files`` export (its node ids, unchanged).

With ``measure_only`` it skips the masks and the JSON (pruning is still run and timed) and writes
``<slug>.timing.json`` (seconds, sizes, scores) plus the tensors needed to compare against our
engine; ``"save_adjacency": "rows"`` keeps only sampled rows of the adjacency (see
:func:`sample_rows`) so long prompts do not write gigabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml

#: the job's dtype (``"dtype"``, default float32), set in main()
DTYPE = torch.float32


def _load_transcoders(tc_dir: Path, scan: str, device: torch.device):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    cfg = yaml.safe_load((tc_dir / "config.yaml").read_text())
    kind = cfg["model_kind"]
    if kind == "transcoder_set":
        n = len(list(tc_dir.glob("layer_*.safetensors")))
        paths = {i: str((tc_dir / f"layer_{i}.safetensors").resolve()) for i in range(n)}
        return load_transcoder_set(
            paths,
            scan=scan,
            feature_input_hook=cfg["feature_input_hook"],
            feature_output_hook=cfg["feature_output_hook"],
            device=device,
            dtype=DTYPE,
            lazy_encoder=False,
            lazy_decoder=False,
        )
    if kind == "cross_layer_transcoder":
        return load_clt(
            str(tc_dir.resolve()),
            feature_input_hook=cfg["feature_input_hook"],
            feature_output_hook=cfg["feature_output_hook"],
            scan=scan,
            device=device,
            dtype=DTYPE,
            lazy_decoder=False,
            lazy_encoder=False,
        )
    raise SystemExit(f"unknown model_kind {kind!r} in {tc_dir / 'config.yaml'}")


def _tl_config(hf_cfg, model_dir: Path, device: torch.device):
    """TransformerLens config of a local Gemma-2 checkpoint (the keys TL sets for gemma-2-2b)."""
    from transformer_lens import HookedTransformerConfig

    if hf_cfg.model_type != "gemma2":
        raise SystemExit(f"transformerlens backend: only gemma2 here, not {hf_cfg.model_type}")
    return HookedTransformerConfig(
        d_model=hf_cfg.hidden_size,
        d_head=hf_cfg.head_dim,
        n_heads=hf_cfg.num_attention_heads,
        n_key_value_heads=hf_cfg.num_key_value_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_ctx=hf_cfg.max_position_embeddings,
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_activation,
        normalization_type="RMS",
        rotary_base=hf_cfg.rope_parameters["rope_theta"]
        if getattr(hf_cfg, "rope_parameters", None)
        else hf_cfg.rope_theta,
        rotary_dim=hf_cfg.head_dim,
        positional_embedding_type="rotary",
        use_attn_scale=True,
        attn_scale=hf_cfg.query_pre_attn_scalar**0.5,
        window_size=hf_cfg.sliding_window,
        use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in hf_cfg.layer_types],
        attn_scores_soft_cap=hf_cfg.attn_logit_softcapping,
        output_logits_soft_cap=hf_cfg.final_logit_softcapping,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        original_architecture="Gemma2ForCausalLM",
        tokenizer_name=str(model_dir),
        model_name=model_dir.name,
        init_weights=False,
        device=device,
        dtype=DTYPE,
    )


def _load_transformerlens(model_dir: Path, transcoders, device: torch.device):
    """circuit-tracer's TransformerLens replacement model on a local Gemma-2 directory."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=DTYPE)
    cfg = _tl_config(hf.config, model_dir, device)
    state = convert_gemma_weights(hf, cfg)
    del hf
    model = TransformerLensReplacementModel(cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model._configure_replacement_model(transcoders)
    return model


def sample_rows(
    features: torch.Tensor, n_nodes: int, n_logits: int, stride: int = 64
) -> torch.Tensor:
    """Rows kept for comparison in benchmark runs: every logit row, and the feature rows whose
    identity hashes to 0 mod ``stride`` (``bench/attribution.py`` applies the same rule)."""
    lay, pos, feat = features[:, 0], features[:, 1], features[:, 2]
    keep = ((lay * 7919 + pos * 104729 + feat) % stride) == 0
    rows = torch.nonzero(keep).flatten()
    logits = torch.arange(n_nodes - n_logits, n_nodes)
    return torch.cat([rows, logits]).to(torch.int64)


def _process(job: dict, model, out_dir: Path, scan: str, load_s: float, cpu: dict) -> int:
    """A user's whole run: attribute, then the pruned JSON or the full graph file (see above).
    ``cpu``: CPU seconds of the imports and the loading, this process's profile so far."""
    from circuit_tracer import attribute
    from circuit_tracer.utils.create_graph_files import create_graph_files

    for spec in job["prompts"]:
        slug = spec["slug"]
        t1, c1 = time.perf_counter(), time.process_time()
        graph = attribute(
            spec["prompt"],
            model,
            batch_size=spec.get("batch_size", 64),
            max_feature_nodes=spec.get("max_feature_nodes"),
        )
        attr_s = time.perf_counter() - t1
        attr_cpu_s = time.process_time() - c1
        t2, c2 = time.perf_counter(), time.process_time()
        if job["process"] == "pruned":
            create_graph_files(graph, slug=slug, output_path=str(out_dir), scan=scan)
        else:
            graph.to_pt(str(out_dir / f"{slug}.pt"))
        meta = {
            "backend": job.get("backend", "nnsight"),
            "load_s": load_s,
            "attribute_s": attr_s,
            "write_s": time.perf_counter() - t2,
            "cpu_s": time.process_time() - c1,
            "attribute_cpu_s": attr_cpu_s,
            "n_nodes": int(graph.adjacency_matrix.shape[0]),
            "phases": [
                {
                    "phase": "start, imports (torch, transformers, TransformerLens)",
                    "cpu_s": cpu["import"],
                },
                {"phase": "load model + transcoders", "cpu_s": cpu["load"]},
                {"phase": "attribute()", "cpu_s": attr_cpu_s},
                {
                    "phase": "create_graph_files (prune + JSON)"
                    if job["process"] == "pruned"
                    else "Graph.to_pt",
                    "cpu_s": time.process_time() - c2,
                },
            ],
        }
        (out_dir / f"{slug}.timing.json").write_text(json.dumps(meta, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", type=Path, help="job JSON file")
    args = ap.parse_args()
    job = json.loads(args.job.read_text())

    import circuit_tracer
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    device = torch.device(job.get("device", "cpu"))
    global DTYPE
    DTYPE = getattr(torch, job.get("dtype", "float32"))
    model_dir = Path(job["model_dir"]).resolve()
    tc_dir = Path(job["transcoder_dir"]).resolve()
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = job.get("scan") or tc_dir.name

    t0, c0 = time.perf_counter(), time.process_time()
    transcoders = _load_transcoders(tc_dir, scan, device)
    backend = job.get("backend", "nnsight")
    if backend == "transformerlens":
        model = _load_transformerlens(model_dir, transcoders, device)
    else:
        model = ReplacementModel.from_pretrained_and_transcoders(
            str(model_dir), transcoders, backend="nnsight", device=device, dtype=DTYPE
        )
    load_s = time.perf_counter() - t0
    print(f"[ct] {backend}: loaded model + transcoders in {load_s:.2f}s", file=sys.stderr)

    if job.get("process"):
        cpu = {"import": c0, "load": time.process_time() - c0}
        return _process(job, model, out_dir, scan, load_s, cpu)

    for spec in job["prompts"]:
        slug = spec["slug"]
        t1, c1 = time.perf_counter(), time.process_time()
        graph = attribute(
            spec["prompt"],
            model,
            max_n_logits=spec.get("max_n_logits", 10),
            desired_logit_prob=spec.get("desired_logit_prob", 0.95),
            batch_size=spec.get("batch_size", 64),
            max_feature_nodes=spec.get("max_feature_nodes"),
            update_interval=spec.get("update_interval", 4),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        attr_s = time.perf_counter() - t1
        attr_cpu_s = time.process_time() - c1
        graph.to("cpu")
        n_nodes = graph.adjacency_matrix.shape[0]
        print(
            f"[ct] {slug}: {len(graph.input_tokens)} tokens, {len(graph.active_features)} active, "
            f"{len(graph.selected_features)} selected, N={n_nodes}, {attr_s:.2f}s",
            file=sys.stderr,
        )
        tensors = {
            "input_ids": graph.input_tokens.detach().cpu().to(torch.int64),
            "active_features": graph.active_features.detach().cpu().to(torch.int64),
            "activation_values": graph.activation_values.detach().cpu().float(),
            "selected_features": graph.selected_features.detach().cpu().to(torch.int64),
            "logit_tokens": graph.logit_token_ids.detach().cpu().to(torch.int64),
            "logit_probabilities": graph.logit_probabilities.detach().cpu().float(),
        }
        adjacency = graph.adjacency_matrix.detach().cpu().float()
        if job.get("save_adjacency", "full") == "rows":
            feats = graph.active_features[graph.selected_features].cpu()
            row_index = sample_rows(feats, adjacency.shape[0], len(graph.logit_targets))
            tensors["row_index"] = row_index
            tensors["adjacency_rows"] = adjacency[row_index]
        else:
            tensors["adjacency"] = adjacency
        meta: dict = {
            "prompt": spec["prompt"],
            "slug": slug,
            "scan": scan,
            "settings": {
                "batch_size": spec.get("batch_size", 64),
                "max_feature_nodes": spec.get("max_feature_nodes"),
                "update_interval": spec.get("update_interval", 4),
                "max_n_logits": spec.get("max_n_logits", 10),
                "desired_logit_prob": spec.get("desired_logit_prob", 0.95),
                "node_threshold": 0.8,
                "edge_threshold": 0.98,
            },
            "versions": {
                "circuit_tracer": circuit_tracer.__version__,
                "torch": torch.__version__,
            },
            "backend": backend,
            "attribute_s": attr_s,
            "attribute_cpu_s": attr_cpu_s,
            "load_s": load_s,
            "n_nodes": n_nodes,
            "n_active": len(graph.active_features),
            "n_tokens": len(graph.input_tokens),
        }
        if device.type == "cuda":
            meta["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        graph.to(device)  # prune where circuit-tracer's create_graph_files would (GPU if any)
        t2 = time.perf_counter()
        node_mask, edge_mask, cumulative = prune_graph(graph, 0.8, 0.98)
        if device.type == "cuda":
            torch.cuda.synchronize()
        meta["prune_s"] = time.perf_counter() - t2
        meta["n_pruned_nodes"] = int(node_mask.sum())
        meta["n_pruned_edges"] = int(edge_mask.sum())
        rep, comp = compute_graph_scores(graph)
        meta["replacement_score"] = rep
        meta["completeness_score"] = comp
        if not job.get("measure_only"):
            tensors["node_mask"] = node_mask.cpu().to(torch.uint8)
            tensors["edge_index"] = edge_mask.cpu().nonzero().T.contiguous().to(torch.int64)
            tensors["cumulative_scores"] = cumulative.cpu().float()
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(
            tensors, str(out_dir / f"{slug}.safetensors"), metadata={"golden": json.dumps(meta)}
        )
        if job.get("write_json") and not job.get("measure_only"):
            from circuit_tracer.utils.create_graph_files import create_graph_files

            tmp = out_dir / f".ctjson-{slug}"
            create_graph_files(graph, slug=slug, output_path=str(tmp), scan=scan)
            (tmp / f"{slug}.json").replace(out_dir / f"{slug}.json")
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
        (out_dir / f"{slug}.timing.json").write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
