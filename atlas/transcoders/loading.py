"""Reading transcoders from disk into a :class:`TranscoderSet`.

Formats (all described by a circuit-tracer style ``config.yaml``):

* ``model_kind: transcoder_set`` -- one file per layer, listed under ``transcoders`` (absolute,
  relative to the config, or ``hf://repo/path[@revision]``) or found as ``layer_{i}.safetensors``
  next to the config. A listed file that does not exist is replaced by a file of the same name
  next to the config only with a warning naming both (a directory moved after its config was
  written); without one, loading stops. A layer file is one of

  - circuit-tracer safetensors: ``W_enc (d_tc, d_model)``, ``W_dec (d_tc, d_model)``,
    ``b_enc (d_tc)``, ``b_dec (d_model)``, optional ``activation_function.threshold`` (JumpReLU;
    absent = ReLU), optional ``W_skip (d_model, d_model)`` applied as ``x @ W_skip.T``, optional
    ``k`` (TopK);
  - Gemma Scope 2 safetensors: ``w_enc (d_model, d_tc)``, ``w_dec``, ``b_enc``, ``b_dec``,
    ``threshold``, optional ``affine_skip_connection``;
  - GemmaScope ``params.npz``: ``W_enc (d_model, d_tc)``, ``W_dec``, ``b_enc``, ``b_dec``,
    ``threshold``.

  ``activation: topk`` with ``k: N`` in the config selects TopK (x kept at its top-k entries).
  ``top_k: N`` (the VLM circuit-tracing paper's format: ``feature_input_hook: mlp.hook_in``,
  ``feature_output_hook: mlp.hook_out``, ``layers``, ``num_model_layers``) selects ReLU then the
  top N per position, no threshold (``relu_topk``).
* ``model_kind: cross_layer_transcoder`` -- per layer ``i``: ``W_enc_{i}.safetensors`` with
  ``W_enc_{i} (d_tc, d_model)``, ``b_enc_{i}``, ``b_dec_{i}``, optional ``threshold_{i}``, and
  ``W_dec_{i}.safetensors`` with ``W_dec_{i} (d_tc, n_layers - i, d_model)``.

* SAELens transcoders -- a directory holding one subdirectory per layer, each with ``cfg.json``
  (``d_in``, ``d_sae``, optional ``d_out``, ``hook_name`` / ``hook_name_out``, ``hook_layer``,
  ``architecture`` or ``activation_fn`` with ``activation_fn_kwargs.k``,
  ``apply_b_dec_to_input``) and ``sae_weights.safetensors`` (``W_enc (d_in, d_sae)``,
  ``W_dec (d_sae, d_out)``, ``b_enc``, ``b_dec``, optional ``threshold`` and
  ``W_skip (d_out, d_in)``); no ``config.yaml``.

Everything is validated (shapes, layers present, finite values, hooks the model supports) and
problems raise :class:`atlas.errors.TranscoderError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml

from atlas.errors import TranscoderError
from atlas.graph import TranscoderInfo

if TYPE_CHECKING:
    from atlas.models.loading import LoadedModel

log = logging.getLogger(__name__)

Activation = Literal["relu", "jumprelu", "topk", "relu_topk"]


@dataclass
class TranscoderSet:
    """Per-layer transcoders (PLT) or one cross-layer transcoder (CLT), as tensors.

    Per layer ``l`` (lists of length ``n_layers``):
        w_enc[l]     (d_tc, d_model)     encoder rows = feature target vectors
        b_enc[l]     (d_tc,)
        threshold[l] (d_tc,)             JumpReLU only
        w_dec[l]     PLT (d_tc, d_model); CLT (d_tc, n_layers - l, d_model) (decoder of a layer-l
                     feature into layers l, l+1, ...)
        b_dec[l]     (d_model,)          bias of the reconstruction of layer l's MLP output
        w_skip[l]    (d_model, d_model)  optional, skip(x) = x @ w_skip[l].T
    """

    kind: Literal["transcoder_set", "cross_layer_transcoder"]
    activation: Activation
    w_enc: list[torch.Tensor]
    b_enc: list[torch.Tensor]
    w_dec: list[torch.Tensor]
    b_dec: list[torch.Tensor]
    feature_input_hook: str
    feature_output_hook: str
    info: TranscoderInfo
    threshold: list[torch.Tensor] | None = None
    w_skip: list[torch.Tensor] | None = None
    k: int | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.w_enc)

    @property
    def d_model(self) -> int:
        return int(self.w_enc[0].shape[1])

    @property
    def d_transcoder(self) -> int:
        return int(self.w_enc[0].shape[0])

    @property
    def is_clt(self) -> bool:
        return self.kind == "cross_layer_transcoder"

    @property
    def has_skip(self) -> bool:
        return self.w_skip is not None

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc.T + b_enc`` for inputs ``(..., d_model)``."""
        w = self.w_enc[layer]
        return torch.nn.functional.linear(x.to(w.dtype), w, self.b_enc[layer])

    def activate(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        """Apply the activation function to pre-activations."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold[layer])
        assert self.k is not None
        if self.activation == "relu_topk":  # the paper's TopK: ReLU, then the top k per position
            pre = torch.relu(pre)
        _, idx = torch.topk(pre, k=min(self.k, pre.shape[-1]), dim=-1)
        gate = torch.zeros_like(pre).scatter_(-1, idx, 1.0)
        return pre * gate

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., d_tc)``."""
        return self.activate(layer, self.pre_activations(layer, x))

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The skip term ``x @ W_skip.T`` (requires :attr:`has_skip`)."""
        assert self.w_skip is not None
        return x.to(self.w_skip[layer].dtype) @ self.w_skip[layer].T

    def reconstruct(
        self, acts: list[torch.Tensor], inputs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Reconstruction of every layer's MLP output from activations ``(n_pos, d_tc)``."""
        out = []
        for layer in range(self.n_layers):
            rec = self.b_dec[layer].expand(acts[layer].shape[0], -1).clone()
            if self.is_clt:
                for src in range(layer + 1):
                    rec = rec + acts[src] @ self.w_dec[src][:, layer - src]
            else:
                rec = rec + acts[layer] @ self.w_dec[layer]
            if self.w_skip is not None:
                rec = rec + self.skip(layer, inputs[layer])
            out.append(rec)
        return out


# ---------------------------------------------------------------------- file reading
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TranscoderError(f"missing transcoder file {path}")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise TranscoderError(f"corrupted or unreadable transcoder file {path}: {exc}") from exc


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    if not path.is_file():
        raise TranscoderError(f"missing transcoder file {path}")
    try:
        with np.load(str(path)) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except Exception as exc:
        raise TranscoderError(f"corrupted or unreadable transcoder file {path}: {exc}") from exc


def _resolve(entry: str, cfg_path: Path) -> Path:
    """The file a ``transcoders:`` entry names (absolute, relative to the config, or hf://).

    A directory copied or moved after its config was written still lists the old paths; when
    such a file is gone but one of the same name lies next to the config, that one is used and
    a warning names both, so a substitution is never silent.
    """
    base = cfg_path.parent
    if entry.startswith("hf://"):
        rest = entry[len("hf://") :]
        rest, _, rev = rest.partition("@")
        parts = rest.split("/")
        if len(parts) < 3:
            raise TranscoderError(f"bad hf:// transcoder path {entry!r}")
        try:
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(
                repo_id="/".join(parts[:2]), filename="/".join(parts[2:]), revision=rev or None
            )
        except Exception as exc:
            raise TranscoderError(f"cannot download transcoder {entry}: {exc}") from exc
        return Path(local)
    path = Path(entry).expanduser()
    if not path.is_absolute():
        path = base / path
    beside = base / path.name
    if not path.exists() and beside != path and beside.exists():
        log.warning(
            "%s lists %s, which does not exist; using %s next to the config instead",
            cfg_path,
            path,
            beside,
        )
        path = beside
    return path


def _file_hash(h: Any, path: Path) -> None:
    h.update(path.name.encode())
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)


def _one_layer(path: Path) -> dict[str, torch.Tensor | None]:
    """Read one per-layer file into canonical names (W_enc (d_tc, d_model) etc.)."""
    raw = _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path)
    if "W_enc" in raw and path.suffix == ".npz":  # GemmaScope params.npz
        return {
            "W_enc": raw["W_enc"].T,
            "W_dec": raw["W_dec"],
            "b_enc": raw["b_enc"],
            "b_dec": raw["b_dec"],
            "threshold": raw.get("threshold"),
            "W_skip": None,
            "k": None,
        }
    if "w_enc" in raw:  # Gemma Scope 2
        skip = raw.get("affine_skip_connection")
        return {
            "W_enc": raw["w_enc"].T,
            "W_dec": raw["w_dec"],
            "b_enc": raw["b_enc"],
            "b_dec": raw["b_dec"],
            "threshold": raw.get("threshold"),
            "W_skip": skip.T if skip is not None else None,
            "k": None,
        }
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in raw]
    if missing:
        raise TranscoderError(f"transcoder file {path} lacks {', '.join(missing)}")
    return {
        "W_enc": raw["W_enc"],
        "W_dec": raw["W_dec"],
        "b_enc": raw["b_enc"],
        "b_dec": raw["b_dec"],
        "threshold": raw.get("activation_function.threshold", raw.get("threshold")),
        "W_skip": raw.get("W_skip"),
        "k": raw.get("k"),
    }


def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...], where: Path) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise TranscoderError(f"{where.name}: {name} has shape {tuple(t.shape)}, expected {shape}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise TranscoderError(f"{where.name}: {name} contains NaN or inf")


def _load_config(path: Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path).expanduser()
    cfg_path = path if path.is_file() else path / "config.yaml"
    if not path.exists():
        raise TranscoderError(f"no transcoders at {path}")
    if not cfg_path.is_file():
        raise TranscoderError(f"{path} has no config.yaml (circuit-tracer transcoder layout)")
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as exc:
        raise TranscoderError(f"{cfg_path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise TranscoderError(f"{cfg_path} must hold a mapping")
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise TranscoderError(f"{cfg_path} lacks {key!r}")
    return cfg_path, config


@dataclass(frozen=True)
class _Expected:
    """What the model says the transcoders must look like (``None``: not known)."""

    n_layers: int | None
    d_model: int | None


def load_transcoders(
    path: str | Path,
    model: LoadedModel | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_layers: int | None = None,
) -> TranscoderSet:
    """Load a transcoder set or CLT (see the module docstring) and validate it against ``model``.

    ``n_layers`` (default: the model's, else inferred from the files) says how many layers to
    expect. Raises :class:`TranscoderError` on missing layers, shape mismatches, corrupted files
    or hooks the model family does not support.
    """
    expected = _Expected(
        n_layers if n_layers is not None else (model.n_layers if model else None),
        model.d_model if model else None,
    )
    if _is_saelens(Path(path).expanduser()):
        from atlas.transcoders.saelens import load_saelens

        kind = "transcoder_set"
        tset = load_saelens(Path(path).expanduser(), expected.n_layers, device, dtype)
        _check_d_model(tset.d_model, expected)
        cfg_path = tset.files[0]
    else:
        cfg_path, config = _load_config(Path(path))
        kind = config["model_kind"]
        loader = _LOADERS.get(kind)
        if loader is None:
            raise TranscoderError(f"{cfg_path}: unknown model_kind {kind!r}")
        tset = loader(cfg_path, config, expected, device, dtype)
    if expected.n_layers is not None and tset.n_layers != expected.n_layers:
        raise TranscoderError(
            f"transcoders cover {tset.n_layers} layers, the model has {expected.n_layers}"
        )
    if model is not None:
        layer0 = model.adapter.layers(model.hf)[0]
        model.adapter.feature_input_module(layer0, tset.feature_input_hook)
        model.adapter.feature_output_module(layer0, tset.feature_output_hook)
    h = hashlib.sha256()
    for f in [cfg_path, *tset.files]:
        _file_hash(h, f)
    tset.info = TranscoderInfo(
        name=str(path),
        kind=kind,
        content_hash="sha256:" + h.hexdigest()[:32],
        d_transcoder=tset.d_transcoder,
        feature_input_hook=tset.feature_input_hook,
        feature_output_hook=tset.feature_output_hook,
    )
    log.info(
        "loaded %s: %d layers x %d features (%s)", path, tset.n_layers, tset.d_transcoder, kind
    )
    return tset


def _is_saelens(path: Path) -> bool:
    """A directory of SAELens layer directories (``*/cfg.json``) and no ``config.yaml``."""
    return path.is_dir() and not (path / "config.yaml").exists() and any(path.glob("*/cfg.json"))


def _check_d_model(d_model: int, expected: _Expected) -> None:
    if expected.d_model is not None and d_model != expected.d_model:
        raise TranscoderError(
            f"transcoders have d_model {d_model}, the model has {expected.d_model}"
        )


def _per_layer_files(cfg_path: Path, config: dict[str, Any], expected: _Expected) -> list[Path]:
    """The layer files of a ``transcoder_set``: listed in the config, else ``layer_{i}``."""
    base = cfg_path.parent
    if "transcoders" in config:
        entries = config["transcoders"]
        if not isinstance(entries, list) or not entries:
            raise TranscoderError(f"{cfg_path}: 'transcoders' must be a non-empty list")
        files = [_resolve(str(e), cfg_path) for e in entries]
    else:
        count = expected.n_layers
        if count is None:
            count = len(list(base.glob("layer_*.safetensors")))
        files = [base / f"layer_{i}.safetensors" for i in range(count)]
    if expected.n_layers is not None and len(files) != expected.n_layers:
        raise TranscoderError(
            f"{cfg_path}: {len(files)} transcoder layers for a {expected.n_layers}-layer model"
        )
    if not files:
        raise TranscoderError(f"{cfg_path}: no transcoder layers found")
    _check_layer_list(cfg_path, config, len(files), expected)
    return files


def _check_layer_list(
    cfg_path: Path, config: dict[str, Any], n_files: int, expected: _Expected
) -> None:
    """The paper's ``layers`` / ``num_model_layers`` must describe one transcoder per layer of
    this model, in order (the replacement model replaces every MLP)."""
    layers = config.get("layers")
    if layers is not None and layers != list(range(n_files)):
        raise TranscoderError(
            f"{cfg_path}: 'layers' must list every layer 0..{n_files - 1} in order, got {layers}"
        )
    n_model = config.get("num_model_layers")
    if n_model is not None and expected.n_layers is not None and n_model != expected.n_layers:
        raise TranscoderError(
            f"{cfg_path}: num_model_layers {n_model}, the model has {expected.n_layers} layers"
        )


def _load_per_layer(
    cfg_path: Path,
    config: dict[str, Any],
    expected: _Expected,
    device: str | torch.device,
    dtype: torch.dtype,
) -> TranscoderSet:
    """``model_kind: transcoder_set``: one transcoder per layer, in any per-layer format."""
    files = _per_layer_files(cfg_path, config, expected)
    layers = []
    for i, f in enumerate(files):
        if not f.exists():
            raise TranscoderError(f"missing transcoder file for layer {i}: {f}")
        layers.append(_one_layer(f))
    d_tc, d_model = layers[0]["W_enc"].shape  # type: ignore[union-attr]
    _check_d_model(d_model, expected)
    has_thr = layers[0]["threshold"] is not None
    has_skip = layers[0]["W_skip"] is not None
    for f, lay in zip(files, layers, strict=True):
        _check("W_enc", lay["W_enc"], (d_tc, d_model), f)
        _check("W_dec", lay["W_dec"], (d_tc, d_model), f)
        _check("b_enc", lay["b_enc"], (d_tc,), f)
        _check("b_dec", lay["b_dec"], (d_model,), f)
        _check("threshold", lay["threshold"], (d_tc,), f)
        _check("W_skip", lay["W_skip"], (d_model, d_model), f)
        if (lay["threshold"] is not None) != has_thr or (lay["W_skip"] is not None) != has_skip:
            raise TranscoderError(f"{f.name}: layers disagree on threshold/W_skip presence")
    activation, k = _per_layer_activation(cfg_path, config, layers[0], has_thr)

    def cast(t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return t.to(device=device, dtype=dtype).contiguous()

    return TranscoderSet(
        kind="transcoder_set",
        activation=activation,
        w_enc=[cast(lay["W_enc"]) for lay in layers],
        b_enc=[cast(lay["b_enc"]) for lay in layers],
        w_dec=[cast(lay["W_dec"]) for lay in layers],
        b_dec=[cast(lay["b_dec"]) for lay in layers],
        threshold=[cast(lay["threshold"]) for lay in layers] if has_thr else None,
        w_skip=[cast(lay["W_skip"]) for lay in layers] if has_skip else None,
        k=k,
        feature_input_hook=str(config["feature_input_hook"]),
        feature_output_hook=str(config["feature_output_hook"]),
        info=_PENDING_INFO,
        files=files,
    )


def _per_layer_activation(
    cfg_path: Path, config: dict[str, Any], first: dict[str, torch.Tensor | None], has_thr: bool
) -> tuple[Activation, int | None]:
    """``(activation, k)``: JumpReLU with thresholds, TopK with a ``k``, ReLU-then-TopK with the
    paper's ``top_k``, else ReLU."""
    if config.get("top_k") is not None:
        top_k = config["top_k"]
        if has_thr or not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
            raise TranscoderError(f"{cfg_path}: 'top_k' must be a positive integer, no threshold")
        return "relu_topk", top_k
    activation: Activation = "jumprelu" if has_thr else "relu"
    k = config.get("k")
    if k is None and first["k"] is not None:
        k = int(first["k"])
    if config.get("activation") == "topk" or (k is not None and not has_thr):
        if k is None or int(k) <= 0:
            raise TranscoderError(f"{cfg_path}: TopK transcoders need a positive 'k'")
        return "topk", int(k)
    return activation, None


def _load_clt(
    cfg_path: Path,
    config: dict[str, Any],
    expected: _Expected,
    device: str | torch.device,
    dtype: torch.dtype,
) -> TranscoderSet:
    """``model_kind: cross_layer_transcoder``: ``W_enc_{i}`` / ``W_dec_{i}`` files per layer."""
    base = cfg_path.parent
    count = expected.n_layers
    if count is None:
        count = len(list(base.glob("W_enc_*.safetensors")))
    if count == 0:
        raise TranscoderError(f"{cfg_path}: no W_enc_*.safetensors files found")
    files: list[Path] = []
    w_enc, b_enc, b_dec, thr, w_dec = [], [], [], [], []
    for i in range(count):
        enc_f, dec_f = base / f"W_enc_{i}.safetensors", base / f"W_dec_{i}.safetensors"
        for f in (enc_f, dec_f):
            if not f.is_file():
                raise TranscoderError(f"missing cross-layer transcoder file for layer {i}: {f}")
        enc, dec = _read_safetensors(enc_f), _read_safetensors(dec_f)
        for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if key not in enc:
                raise TranscoderError(f"{enc_f.name} lacks {key}")
        if f"W_dec_{i}" not in dec:
            raise TranscoderError(f"{dec_f.name} lacks W_dec_{i}")
        files += [enc_f, dec_f]
        w_enc.append(enc[f"W_enc_{i}"])
        b_enc.append(enc[f"b_enc_{i}"])
        b_dec.append(enc[f"b_dec_{i}"])
        thr.append(enc.get(f"threshold_{i}"))
        w_dec.append(dec[f"W_dec_{i}"])
    d_tc, d_model = w_enc[0].shape
    _check_d_model(d_model, expected)
    has_thr = thr[0] is not None
    for i in range(count):
        f = base / f"W_enc_{i}.safetensors"
        _check(f"W_enc_{i}", w_enc[i], (d_tc, d_model), f)
        _check(f"b_enc_{i}", b_enc[i], (d_tc,), f)
        _check(f"b_dec_{i}", b_dec[i], (d_model,), f)
        t_i = thr[i]
        _check(f"threshold_{i}", t_i.reshape(-1) if t_i is not None else None, (d_tc,), f)
        if (thr[i] is not None) != has_thr:
            raise TranscoderError(f"{f.name}: layers disagree on threshold presence")
        _check(
            f"W_dec_{i}",
            w_dec[i],
            (d_tc, count - i, d_model),
            base / f"W_dec_{i}.safetensors",
        )
    return TranscoderSet(
        kind="cross_layer_transcoder",
        activation="jumprelu" if has_thr else "relu",
        w_enc=[t.to(device=device, dtype=dtype).contiguous() for t in w_enc],
        b_enc=[t.to(device=device, dtype=dtype) for t in b_enc],
        w_dec=[t.to(device=device, dtype=dtype).contiguous() for t in w_dec],
        b_dec=[t.to(device=device, dtype=dtype) for t in b_dec],
        threshold=[t.reshape(-1).to(device=device, dtype=dtype) for t in thr if t is not None]
        if has_thr
        else None,
        feature_input_hook=str(config["feature_input_hook"]),
        feature_output_hook=str(config["feature_output_hook"]),
        info=_PENDING_INFO,
        files=files,
    )


#: Placeholder provenance until :func:`load_transcoders` has hashed the files.
_PENDING_INFO = TranscoderInfo(name="", kind="", content_hash="", d_transcoder=0)

_Loader = Callable[
    [Path, dict[str, Any], _Expected, "str | torch.device", torch.dtype], TranscoderSet
]
_LOADERS: dict[str, _Loader] = {
    "transcoder_set": _load_per_layer,
    "cross_layer_transcoder": _load_clt,
}
