"""Model loading, family adapters, tokenization rules and the freezing context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atlas.errors import ConfigError, InputError, ModelLoadError
from atlas.models import SUPPORTED_FAMILIES, HookPoint, PatternReplay, frozen, load_model, replayed
from atlas.models.freezing import FROZEN_ATTN
from atlas.testing.tiny import BOS_ID, FAMILIES, build_tiny_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {fam: build_tiny_model(fam, root / fam, n_kv_heads=2) for fam in FAMILIES}


def test_supported_families_cover_tiny_builders() -> None:
    assert set(FAMILIES) == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_every_family(model_dirs: dict[str, Path], family: str) -> None:
    m = load_model(model_dirs[family])
    assert m.info.family == family
    assert (m.info.n_layers, m.info.d_model, m.info.vocab_size) == (2, 64, 256)
    assert m.info.revision and m.info.revision.startswith("sha256:")
    layers = m.adapter.layers(m.hf)
    assert len(layers) == 2
    assert m.adapter.unembed_weight(m.hf).shape == (256, 64)
    # logits are spread out (tiny models are usable for attribution)
    ids = m.to_input_ids("hello world")
    with torch.no_grad():
        probs = m.hf(input_ids=ids[None]).logits[0, -1].softmax(-1)
    assert 0.01 < float(probs.max()) < 0.9


def test_revision_is_a_content_hash(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    a = load_model(model_dirs["llama"]).info.revision
    assert load_model(model_dirs["llama"]).info.revision == a
    other = build_tiny_model("llama", tmp_path / "other", seed=1)
    assert load_model(other).info.revision != a


def test_bos_rules(model_dirs: dict[str, Path]) -> None:
    gpt2 = load_model(model_dirs["gpt2"])
    ids = gpt2.to_input_ids("abc")
    assert ids[0] == BOS_ID and ids.shape[0] == 4  # prepended (GPT-2's tokenizer adds none)
    llama = load_model(model_dirs["llama"])
    assert llama.to_input_ids("abc").tolist()[0] == BOS_ID
    already = torch.tensor([BOS_ID, 10, 11])
    assert llama.to_input_ids(already).tolist() == [BOS_ID, 10, 11]
    assert llama.to_input_ids([10, 11]).tolist() == [BOS_ID, 10, 11]
    with pytest.raises(InputError):
        llama.to_input_ids("")
    with pytest.raises(InputError):
        llama.to_input_ids([10, 9999])


def test_missing_and_bad_dirs(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_model(tmp_path)  # exists, no config.json
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_model(tmp_path)


def test_unknown_architecture_names_supported_families(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = json.loads((model_dirs["llama"] / "config.json").read_text())
    cfg["model_type"] = "mistral"
    cfg["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gemma2"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_keeps_values_and_restores(model_dirs: dict[str, Path], family: str) -> None:
    m = load_model(model_dirs[family])
    ids = m.to_input_ids("The cat sat")[None]
    base = m.adapter.base(m.hf)
    with torch.no_grad():
        before = base(input_ids=ids).last_hidden_state
    impl = m.hf.config._attn_implementation
    with frozen(m):
        assert m.hf.config._attn_implementation == FROZEN_ATTN
        assert not any(p.requires_grad for p in m.hf.parameters())
        emb = m.adapter.embed(m.hf)(ids).detach().requires_grad_(True)
        out = base(inputs_embeds=emb).last_hidden_state
        torch.testing.assert_close(out, before, atol=1e-5, rtol=1e-5)
        # gradients flow from the output to the embeddings (through values only)
        (g,) = torch.autograd.grad(out[0, -1].sum(), emb)
        assert float(g.abs().sum()) > 0
    assert m.hf.config._attn_implementation == impl
    assert all("forward" not in vars(mod) for mod in m.adapter.norm_modules(m.hf))
    with torch.no_grad():
        after = base(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_replay_records_then_holds_the_clean_patterns(
    model_dirs: dict[str, Path], family: str
) -> None:
    """Replayed patterns and scales are constants: a changed input leaves them as recorded."""
    m = load_model(model_dirs[family], dtype=torch.float64)
    ids = m.to_input_ids("The cat sat")[None]
    base = m.adapter.base(m.hf)
    impl = m.hf.config._attn_implementation
    with torch.no_grad():
        clean = base(input_ids=ids).last_hidden_state
        state = PatternReplay()
        with replayed(m, state):
            recorded = base(input_ids=ids).last_hidden_state
            patterns = {k: v.clone() for k, v in state.patterns.items()}
            state.replay()
            other = ids.clone()
            other[0, -1] = other[0, 1]
            base(input_ids=other)
        assert m.hf.config._attn_implementation == impl
        assert all("forward" not in vars(mod) for mod in m.adapter.norm_modules(m.hf))
    # Gemma's own norms compute in float32, the replay in float64: equal to float32 precision
    torch.testing.assert_close(recorded, clean, atol=1e-5, rtol=1e-5)
    assert patterns and all(torch.equal(state.patterns[k], v) for k, v in patterns.items())


def test_hook_points_capture_and_replace_inputs_and_outputs() -> None:
    layer = torch.nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3, dtype=torch.float64)
    layer = layer.double()
    seen: list[torch.Tensor] = []
    handles = [
        HookPoint(layer, "input").capture(seen.append),
        HookPoint(layer, "input").replace(lambda v: 2 * v),
        HookPoint(layer, "output").capture(seen.append),
        HookPoint(layer, "output").replace(lambda v: v + 1),
    ]
    out = layer(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen[0], x)
    torch.testing.assert_close(seen[1], layer(2 * x))
    torch.testing.assert_close(out, layer(2 * x) + 1)
