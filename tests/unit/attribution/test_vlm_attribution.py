"""Vision-language attribution on tiny Gemma-3 and LLaVA models: the paper's semantics, proved.

* The perturbation self-check at image and text positions: in a check model that *replays* the
  clean run's attention patterns (Gemma-3's bidirectional image block included) and norm scales
  as constants and pins every MLP output, in float64, adding a source's vector (an image token's
  projector row, a feature at an image position, an error vector) moves every target by exactly
  its adjacency entry. The check model shares no code with the engine's freezing.
* Gemma-3's image block yields edges from later to earlier image positions; LLaVA's never does.
* A prompt without an image on the VLM gives its language model's text graph.
* The rollout maps in the result equal a direct rollout of the tower's own attentions.
* Bad inputs are one-line :class:`atlas.errors.InputError`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from PIL import Image

from atlas.attribution import AttributionResult, attribute
from atlas.attribution.context import precompute
from atlas.attribution.rollout import RolloutParams, attention_rollout
from atlas.errors import InputError
from atlas.models import LoadedModel, ModelInputs, image_rollout, load_model
from atlas.models.adapters import VisionLanguageAdapter
from atlas.models.freezing import PatternReplay, replayed
from atlas.models.hooks import embedding_point, layer_hooks
from atlas.testing.tiny import build_tiny_transcoders
from atlas.testing.tiny_vlm import IMAGE_SOFT_ID, LLAVA_IMAGE_ID, save_language_model, save_tiny_vlm
from atlas.transcoders import TranscoderSet, load_transcoders

PROMPT = "how many fingers are there"
KINDS = ("gemma3", "llava", "llava_siglip")
TEXT_FAMILY = {"gemma3": "gemma3", "llava": "llama", "llava_siglip": "qwen2"}


def _picture(path: Path, seed: int = 0, size: tuple[int, int] = (50, 40)) -> Path:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[0] * size[1] * 3,), generator=gen, dtype=torch.uint8)
    Image.frombytes("RGB", size, bytes(data.tolist())).save(path, format="PNG")
    return path


@dataclass
class Case:
    """One tiny VLM on disk: the model, its text twin, transcoders for its language model."""

    kind: str
    vlm_dir: Path
    text_dir: Path
    tc_dir: Path
    image: Path
    prompt: str = PROMPT


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("vlm_attr")
    out = {}
    for kind in KINDS:
        vlm_dir = save_tiny_vlm(root / kind / "vlm", kind)
        text_dir = save_language_model(vlm_dir, root / kind / "text")
        tc_dir = build_tiny_transcoders(text_dir, root / kind / "tc", d_transcoder=128)
        if kind == "gemma3":  # the paper's hooks: MLP output before the post-feed-forward norm
            cfg = yaml.safe_load((tc_dir / "config.yaml").read_text())
            cfg["feature_output_hook"] = "mlp.hook_out"
            (tc_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        image = _picture(root / kind / "hand.png")
        out[kind] = Case(kind, vlm_dir, text_dir, tc_dir, image)
    return out


@pytest.fixture(scope="module")
def results(cases: dict[str, Case]) -> dict[str, AttributionResult]:
    out = {}
    for kind, case in cases.items():
        model = load_model(case.vlm_dir)
        out[kind] = attribute(
            PROMPT, model, load_transcoders(case.tc_dir, model), image=case.image, batch_size=32
        )
    return out


# ---------------------------------------------------------------------- loading and inputs
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_wraps_the_text_family(cases: dict[str, Case], kind: str) -> None:
    model = load_model(cases[kind].vlm_dir)
    adapter = model.adapter
    assert isinstance(adapter, VisionLanguageAdapter) and model.is_vision
    assert adapter.text.family == TEXT_FAMILY[kind]
    assert model.info.family == ("gemma3_vlm" if kind == "gemma3" else f"llava_{TEXT_FAMILY[kind]}")
    assert adapter.mlp_in_norm_attr == adapter.text.mlp_in_norm_attr
    lm = model.hf.model.language_model
    assert adapter.base(model.hf) is lm
    assert adapter.layers(model.hf) == list(lm.layers)
    assert embedding_point(model).module is lm.layers[0]
    assert embedding_point(model).where == "input"
    outside = {id(m) for m in model.hf.model.vision_tower.modules()}
    outside |= {id(m) for m in model.hf.model.multi_modal_projector.modules()}
    norms = adapter.norm_modules(model.hf)
    assert norms and not any(id(m) in outside for m in norms)
    assert model.info.n_layers == 2 and model.info.d_model == 64
    assert model.tokenizer is model.processor.tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_image_inputs(cases: dict[str, Case], kind: str) -> None:
    case = cases[kind]
    model = load_model(case.vlm_dir)
    soft = IMAGE_SOFT_ID if kind == "gemma3" else LLAVA_IMAGE_ID
    inputs = model.inputs(PROMPT, case.image)
    ids = inputs.input_ids
    assert inputs.image_positions is not None and inputs.image_grid is not None
    assert torch.equal(inputs.image_positions, torch.nonzero(ids == soft).flatten())
    assert inputs.n_image_tokens == 16
    assert inputs.image_grid.tolist() == [[k // 4, k % 4] for k in range(16)]
    assert inputs.bidirectional_prefix == int(inputs.image_positions[-1]) + 1
    assert inputs.pixel_values is not None and inputs.pixel_values.shape == (1, 3, 32, 32)
    assert inputs.image is not None and (inputs.image.width, inputs.image.height) == (50, 40)
    if kind == "gemma3":
        assert inputs.token_type_ids is not None
        assert torch.equal(inputs.token_type_ids.bool(), ids == soft)
    else:
        assert inputs.token_type_ids is None
    # the placeholder goes before the text when the prompt has none, where the template puts it
    placeholder = model.adapter.image_prefix  # type: ignore[attr-defined]
    own = model.inputs(placeholder + PROMPT, case.image)
    assert torch.equal(own.input_ids, ids)
    # a placeholder inside the prompt places the image there
    words = PROMPT.split(" ")
    inside = " ".join(words[:2]) + " " + placeholder + " ".join(words[2:])
    later = model.inputs(inside, case.image)
    assert int(later.image_positions[0]) > int(inputs.image_positions[0])  # type: ignore[index]


@pytest.mark.parametrize("kind", KINDS)
def test_replay_reproduces_the_real_model(cases: dict[str, Case], kind: str) -> None:
    """The check model's recorded patterns are the real model's (Gemma-3: the image block is
    bidirectional in them), so the replay used below freezes the right attention."""
    model = load_model(cases[kind].vlm_dir, dtype=torch.float64)
    inputs = model.inputs(PROMPT, cases[kind].image)
    kwargs = inputs.forward_kwargs(model.device)
    with torch.no_grad():
        real = model.hf(**kwargs).logits
        state = PatternReplay()
        with replayed(model, state):
            recorded = model.hf(**kwargs).logits
    # (Gemma's norms compute in float32 even in a float64 model; the replay's do not)
    torch.testing.assert_close(recorded, real, rtol=1e-5, atol=1e-5)
    pos = inputs.image_positions
    assert pos is not None
    first, last = int(pos[0]), int(pos[-1])
    for pattern in state.patterns.values():
        ahead = pattern[0, :, first, first + 1 : last + 1]  # the first image token looks ahead
        if kind == "gemma3":
            assert float(ahead.sum()) > 1e-3
        else:
            assert float(ahead.abs().max()) == 0.0


# ---------------------------------------------------------------------- perturbation oracle
class CheckModel:
    """Frozen replacement model with additive perturbation points, in float64."""

    def __init__(self, case: Case) -> None:
        self.model: LoadedModel = load_model(case.vlm_dir, dtype=torch.float64)
        self.tset: TranscoderSet = load_transcoders(case.tc_dir, self.model, dtype=torch.float64)
        assert not self.tset.has_skip
        self.inputs: ModelInputs = self.model.inputs(case.prompt, case.image)
        self.replay = PatternReplay()

    def run(
        self,
        mlp_clean: list[torch.Tensor] | None,
        add_emb: torch.Tensor | None = None,
        add_mlp: dict[int, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(transcoder inputs, MLP outputs, final hidden), each ``(P, D)`` per layer."""
        model = self.model
        ins: dict[int, torch.Tensor] = {}
        outs: dict[int, torch.Tensor] = {}

        def emb_hook(value: torch.Tensor) -> torch.Tensor:
            return value if add_emb is None else value + add_emb

        handles = [embedding_point(model).replace(emb_hook)]
        for layer, hooks in enumerate(layer_hooks(model, self.tset)):

            def in_hook(value: torch.Tensor, layer: int = layer, to_input: Any = hooks.to_input):
                ins[layer] = to_input(value[0])

            def out_hook(value: torch.Tensor, layer: int = layer) -> torch.Tensor:
                if mlp_clean is None:
                    outs[layer] = value[0]
                    return value
                new = mlp_clean[layer].clone()
                if add_mlp and layer in add_mlp:
                    new = new + add_mlp[layer]
                outs[layer] = new
                return new[None]

            handles.append(hooks.feature_input.capture(in_hook))
            handles.append(hooks.feature_output.replace(out_hook))
        try:
            with torch.no_grad(), replayed(model, self.replay):
                kwargs = self.inputs.forward_kwargs(model.device)
                final = model.adapter.final_hidden(model.hf, kwargs)
        finally:
            for h in handles:
                h.remove()
        n = model.n_layers
        return [ins[i] for i in range(n)], [outs[i] for i in range(n)], final[0]

    def targets(
        self, res: AttributionResult, ins: list[torch.Tensor], final: torch.Tensor
    ) -> torch.Tensor:
        """Every target row's value: selected features' pre-activations, demeaned logits."""
        feats = res.active_features[res.selected_features].tolist()
        vals = [float(self.tset.w_enc[lay][f] @ ins[lay][p]) for lay, p, f in feats]
        unembed = self.model.adapter.unembed_weight(self.model.hf).detach()
        demeaned = unembed[res.logit_tokens] - unembed.mean(0, keepdim=True)
        return torch.cat([torch.tensor(vals, dtype=torch.float64), demeaned @ final[-1]])


def _sources(res: AttributionResult, image_pos: set[int]) -> list[tuple[str, int]]:
    """Feature, error and embedding sources at image and at text positions (column order)."""
    feats = res.active_features[res.selected_features]
    out: list[tuple[str, int]] = []
    for want_image in (True, False):
        at = [
            i
            for i, (lay, p, _f) in enumerate(feats.tolist())
            if lay == 0 and (p in image_pos) == want_image
        ]
        out += [("feature", i) for i in at[:: max(1, len(at) // 3)][:3]]
    text_pos = [p for p in range(1, res.n_pos) if p not in image_pos]
    image_list = sorted(image_pos)
    for p in (image_list[0], image_list[7], image_list[-1], text_pos[-1]):
        out.append(("error", 0 * res.n_pos + p))
    for p in (image_list[0], image_list[5], image_list[-1], text_pos[0], text_pos[-1]):
        out.append(("token", p))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_perturbation_at_image_and_text_positions(
    cases: dict[str, Case], results: dict[str, AttributionResult], kind: str
) -> None:
    _check_perturbation(cases[kind], results[kind])


def test_perturbation_with_max_feature_nodes(cases: dict[str, Case]) -> None:
    """The ranked path (one context over the whole prompt) on an image prompt."""
    case = cases["gemma3"]
    model = load_model(case.vlm_dir)
    tset = load_transcoders(case.tc_dir, model)
    res = attribute(PROMPT, model, tset, image=case.image, max_feature_nodes=60, rollout=False)
    assert res.n_features == 60
    _check_perturbation(case, res)


def _check_perturbation(case: Case, res: AttributionResult) -> None:
    check = CheckModel(case)
    assert torch.equal(check.inputs.input_ids, res.input_ids)
    assert res.image is not None
    image_pos = set(res.image.positions.tolist())
    check.replay.record()
    _, mlp_clean, _ = check.run(None)
    check.replay.replay()
    ins0, _, final0 = check.run(mlp_clean)
    base = check.targets(res, ins0, final0)
    pre = precompute(check.model, check.tset, check.inputs)
    n_feat, n_pos, n_layers, d = res.n_features, res.n_pos, res.n_layers, check.model.d_model
    adj = res.adjacency.double()
    rows = torch.cat([torch.arange(n_feat), torch.arange(res.n_nodes - res.n_logits, res.n_nodes)])
    sources = _sources(res, image_pos)
    assert sum(1 for k, i in sources if k == "feature") >= 5
    for kind_, i in sources:
        add_emb, add_mlp = None, {}
        v = torch.zeros(n_pos, d, dtype=torch.float64)
        if kind_ == "feature":
            col = i
            lay, p, f = res.active_features[res.selected_features[i]].tolist()
            v[p] = float(res.activation_values[res.selected_features[i]]) * check.tset.w_dec[lay][f]
            add_mlp[lay] = v
        elif kind_ == "error":
            col = n_feat + i
            lay, p = divmod(i, n_pos)
            v[p] = pre.errors[lay, p]
            add_mlp[lay] = v
        else:
            col = n_feat + n_layers * n_pos + i
            v[i] = pre.token_vectors[i]
            add_emb = v
        ins1, _, final1 = check.run(mlp_clean, add_emb, add_mlp or None)
        delta = check.targets(res, ins1, final1) - base
        expected = adj[rows, col]
        scale = 1.0 + float(expected.abs().max())
        torch.testing.assert_close(
            delta,
            expected,
            atol=1e-4 * scale,
            rtol=1e-4,
            msg=lambda m, k=kind_, c=col: f"{k} source col {c}: {m}",
        )
        assert float(delta.abs().max()) > 0 or float(expected.abs().max()) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_image_token_vectors_are_projector_rows(
    cases: dict[str, Case], results: dict[str, AttributionResult], kind: str
) -> None:
    """An image position's embedding-node vector is the projector's output row (unscaled); a text
    position's is the scaled token embedding."""
    case = cases[kind]
    model = load_model(case.vlm_dir)
    tset = load_transcoders(case.tc_dir, model)
    inputs = model.inputs(PROMPT, case.image)
    pre = precompute(model, tset, inputs)
    with torch.no_grad():
        rows = model.hf.model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        rows = torch.cat(list(rows)) if isinstance(rows, list | tuple) else rows.reshape(-1, 64)
        embedded = model.hf.model.language_model.embed_tokens(inputs.input_ids)
    pos = inputs.image_positions
    assert pos is not None
    torch.testing.assert_close(pre.token_vectors[pos], rows, rtol=0, atol=0)
    text = torch.ones(inputs.n_pos, dtype=torch.bool)
    text[pos] = False
    torch.testing.assert_close(pre.token_vectors[text], embedded[text], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_edges_from_later_image_positions(results: dict[str, AttributionResult], kind: str) -> None:
    """Frozen bidirectional attention: Gemma-3 has edges from later to earlier image positions
    (image -> image only); LLaVA, causal throughout, has none from any later position."""
    res = results[kind]
    assert res.image is not None
    image_pos = set(res.image.positions.tolist())
    n_feat, n_pos, n_layers = res.n_features, res.n_pos, res.n_layers
    target_pos = res.active_features[res.selected_features][:, 1]
    err_pos = torch.arange(n_pos).repeat(n_layers)
    source_pos = torch.cat(
        [target_pos, err_pos, torch.arange(n_pos), torch.full((res.n_logits,), n_pos - 1)]
    )
    later = source_pos[None, : res.n_nodes] > target_pos[:, None]
    block = res.adjacency[:n_feat].abs() * later
    t, s = torch.nonzero(block > 0, as_tuple=True)
    if kind == "gemma3":
        assert t.numel() > 0
        assert all(int(target_pos[i]) in image_pos for i in t)
        assert all(int(source_pos[j]) in image_pos for j in s)
    else:
        assert t.numel() == 0


# ---------------------------------------------------------------------- the text graph
@pytest.mark.parametrize("kind", KINDS)
def test_no_image_gives_the_text_graph(cases: dict[str, Case], kind: str) -> None:
    case = cases[kind]
    vlm = load_model(case.vlm_dir)
    text = load_model(case.text_dir)
    assert not text.is_vision
    a = attribute(PROMPT, vlm, load_transcoders(case.tc_dir, vlm), batch_size=32)
    # the twin gets the VLM's ids: transformers reloads a Qwen2 directory's word-level tokenizer
    # as its own BPE class, which splits the same text differently
    ids = vlm.inputs(PROMPT).input_ids
    b = attribute(ids, text, load_transcoders(case.tc_dir, text), batch_size=32)
    assert a.image is None
    assert torch.equal(a.input_ids, b.input_ids)
    cols_a, cols_b = a.node_columns(), b.node_columns()
    for name in cols_a:
        torch.testing.assert_close(cols_a[name], cols_b[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.adjacency, b.adjacency, rtol=1e-5, atol=1e-6)
    ga, gb = a.to_graph(), b.to_graph()
    assert ga.n_nodes == gb.n_nodes and ga.n_edges == gb.n_edges


# ---------------------------------------------------------------------- rollout
@pytest.mark.parametrize("kind", KINDS)
def test_rollout_equals_the_towers_attentions(
    cases: dict[str, Case], results: dict[str, AttributionResult], kind: str
) -> None:
    res = results[kind]
    assert res.image is not None and res.image.rollout is not None
    model = load_model(cases[kind].vlm_dir)
    inputs = model.inputs(PROMPT, cases[kind].image)
    tower = model.hf.model.vision_tower
    with torch.no_grad():
        attentions = tower(pixel_values=inputs.pixel_values, output_attentions=True).attentions
    if kind == "llava":  # vision_feature_layer -2: rows from the first L - 1 layers; CLIP's CLS
        direct = attention_rollout(
            attentions[:-1], tokens_per_image=16, params=RolloutParams(cls_tokens=1)
        )
    else:  # Gemma-3's last hidden state, SigLIP's last layer (-1): every layer, no CLS
        direct = attention_rollout(attentions, tokens_per_image=16)
    got = res.image.rollout
    assert got.layers == direct.layers and got.grid == direct.grid
    assert got.maps.shape == (16, direct.grid, direct.grid) and got.maps.dtype == torch.float32
    torch.testing.assert_close(got.maps, direct.maps, rtol=1e-6, atol=1e-7)


def test_rollout_settings_and_block_four(tmp_path: Path, cases: dict[str, Case]) -> None:
    """Real Gemma-3's pooling (4 x 4 patches per soft token) and non-default parameters."""
    model = load_model(save_tiny_vlm(tmp_path / "g4", "gemma3", mm_tokens_per_image=4))
    inputs = model.inputs(PROMPT, cases["gemma3"].image)
    assert inputs.n_image_tokens == 4 and inputs.image_grid is not None
    assert inputs.image_grid.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    params = RolloutParams(last_k=2, head_fraction=0.5)
    got = image_rollout(model, inputs, params)
    with torch.no_grad():
        tower = model.hf.model.vision_tower
        attentions = tower(pixel_values=inputs.pixel_values, output_attentions=True).attentions
    direct = attention_rollout(attentions, tokens_per_image=4, params=params)
    assert got.block == 4 and got.layers == (3, 4) and got.heads_kept == 2
    torch.testing.assert_close(got.maps, direct.maps, rtol=1e-6, atol=1e-7)


def test_rollout_switches_the_tower_to_eager(cases: dict[str, Case]) -> None:
    model = load_model(cases["gemma3"].vlm_dir)
    inputs = model.inputs(PROMPT, cases["gemma3"].image)
    eager = image_rollout(model, inputs)
    model.hf.set_attn_implementation("sdpa")
    torch.testing.assert_close(image_rollout(model, inputs).maps, eager.maps, rtol=0, atol=0)
    assert model.hf.model.vision_tower.config._attn_implementation == "sdpa"


def test_rollout_optional(cases: dict[str, Case]) -> None:
    case = cases["llava"]
    model = load_model(case.vlm_dir)
    res = attribute(
        PROMPT,
        model,
        load_transcoders(case.tc_dir, model),
        image=case.image,
        rollout=False,
        max_feature_nodes=8,
    )
    assert res.image is not None and res.image.rollout is None
    assert res.image.settings["tokens_per_image"] == 16
    assert res.image.info is not None and len(res.image.info.sha256) == 64


# ---------------------------------------------------------------------- bad inputs
def _one_line(exc: pytest.ExceptionInfo[InputError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_image_for_a_text_only_model(cases: dict[str, Case]) -> None:
    case = cases["gemma3"]
    model = load_model(case.text_dir)
    with pytest.raises(InputError) as exc:
        attribute(PROMPT, model, load_transcoders(case.tc_dir, model), image=case.image)
    message = _one_line(exc)
    assert str(case.image) in message and "text-only" in message


@pytest.mark.parametrize("kind", KINDS)
def test_more_placeholders_than_images(cases: dict[str, Case], kind: str) -> None:
    case = cases[kind]
    model = load_model(case.vlm_dir)
    tset = load_transcoders(case.tc_dir, model)
    placeholder = model.adapter.image_placeholder  # type: ignore[attr-defined]
    with pytest.raises(InputError) as exc:
        attribute(f"{placeholder} one {placeholder} two", model, tset, image=case.image)
    assert "2 image placeholders" in _one_line(exc) and str(case.image) in str(exc.value)
    with pytest.raises(InputError) as exc:
        attribute(f"{placeholder} how many", model, tset)
    assert "no image" in _one_line(exc)
    soft = model.tokenizer.convert_ids_to_tokens(int(model.hf.config.image_token_id))
    with pytest.raises(InputError) as exc:  # the image soft token typed into the text
        attribute(f"how many {soft}", model, tset)
    assert "no image" in _one_line(exc)


def test_prompt_too_long_with_its_image_tokens(cases: dict[str, Case]) -> None:
    case = cases["gemma3"]
    model = load_model(case.vlm_dir)
    tset = load_transcoders(case.tc_dir, model)
    limit = model.max_positions
    assert limit == 512
    text = " ".join(["one"] * 500)
    assert model.inputs(text).n_pos <= limit  # the text alone fits
    with pytest.raises(InputError) as exc:
        attribute(text, model, tset, image=case.image)
    message = _one_line(exc)
    assert "16 of them image tokens" in message and "512" in message


def test_not_an_image(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["llava"]
    model = load_model(case.vlm_dir)
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(InputError) as exc:
        attribute(PROMPT, model, load_transcoders(case.tc_dir, model), image=bad)
    assert str(bad) in _one_line(exc)


def test_compute_core_imports_no_infrastructure() -> None:
    code = (
        "import sys, atlas.models, atlas.attribution, atlas.models.vision\n"
        "bad = ('neo4j', 'celery', 'click', 'atlas.store', 'atlas.pipeline', 'atlas.cli')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad or m.startswith(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
