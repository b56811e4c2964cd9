"""Train per-layer JumpReLU transcoders on streamed activations.

For every layer, a transcoder maps the MLP input (after the pre-MLP norm) to the MLP output (the
MLP's residual contribution; Gemma: after the post-feed-forward norm)::

    pre  = x @ W_enc.T + b_enc                    (d_transcoder,)
    a    = pre * (pre > threshold)                JumpReLU
    y^   = a @ W_dec + b_dec [+ x @ W_skip.T]

Training streams activations: a ``text_source(chunk)`` callable yields documents, the model runs
under ``no_grad`` with forward hooks at the locations the family adapter
(:mod:`atlas.models.adapters`) names for the hooks, and the (input, output) pairs of one chunk
(a buffer, never the whole dataset) are shuffled and consumed in mini-batches before the next
chunk is made. All layers train at once from the same forward passes.

Sparsity: the loss is ``FVU + lambda * L0`` where L0 counts active features per token. The
threshold gets the JumpReLU pseudo-gradient (a rectangle kernel of width ``bandwidth`` around the
threshold, as in Rajamanoharan et al. 2024, "Jumping Ahead"), and ``lambda`` is adjusted per layer
by a multiplicative controller so L0 settles at ``target_l0``. Inputs and outputs are scaled to
unit mean square per dimension while training; the scales are folded into the weights on export.

Output: circuit-tracer's layout, loadable by circuit-tracer 0.5.0 (local absolute path) and
``atlas.transcoders``: ``config.yaml`` (``model_kind: transcoder_set``, ``feature_input_hook``,
``feature_output_hook``, ``model_name``) and ``layer_{i}.safetensors`` with ``W_enc (d_tc,
d_model)``, ``W_dec (d_tc, d_model)``, ``b_enc``, ``b_dec``, ``activation_function.threshold`` and
optionally ``W_skip (d_model, d_model)``. Checkpoints (safetensors + JSON) are written at chunk
boundaries and picked up again by a later call with the same ``checkpoint_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from atlas.errors import ConfigError, InputError, TranscoderError
from atlas.models.adapters import Where

logger = logging.getLogger(__name__)

TextSource = Callable[[int], Sequence[str]]
"""``chunk index -> documents``; must be deterministic for resumable, reproducible training."""


@dataclass
class TranscoderTrainConfig:
    """Settings of one transcoder-set training run."""

    d_transcoder: int = 1024
    """Features per layer."""
    layers: list[int] | None = None
    """Layers to train; ``None`` means every layer."""
    skip: bool = False
    """Train a linear skip path ``x @ W_skip.T`` next to the features."""
    target_l0: float = 16.0
    """Active features per token the sparsity controller steers towards."""
    chunks: int = 40
    """Activation buffers to stream; each is filled from ``text_source(chunk)``."""
    batch_tokens: int = 1024
    """Tokens per optimiser step."""
    passes: int = 1
    """Passes over each buffer (reshuffled each pass) before the next one is made."""
    max_length: int = 64
    """Tokenizer truncation length."""
    docs_per_forward: int = 64
    """Documents per model forward pass while filling a buffer."""
    lr: float = 2e-3
    lr_final_fraction: float = 0.1
    """Cosine decay of the learning rate to this fraction of ``lr`` over the run."""
    bandwidth: float = 0.1
    """Width of the rectangle kernel of the threshold's pseudo-gradient (normalised units)."""
    init_threshold: float = 0.1
    l0_coeff_init: float = 1e-3
    l0_controller_rate: float = 0.05
    """Per-step multiplicative rate of the sparsity-coefficient controller."""
    l0_warmup_fraction: float = 0.1
    """Fraction of the run over which the L0 target ramps down from 4x to 1x ``target_l0``."""
    resample_dead_until: float = 0.5
    """Re-initialise features dead over a whole chunk until this fraction of the run."""
    seed: int = 0
    threads: int | None = 2
    """torch threads while training (``None``: leave as is)."""
    input_hook: str | None = None
    """circuit-tracer hook name of the transcoder input; ``None``: the family's default."""
    output_hook: str | None = None
    """circuit-tracer hook name of the transcoder output; ``None``: the family's default."""
    exclude_first_position: bool = True
    """Skip position 0 (BOS), as the attribution engine zeroes features there."""
    checkpoint_every: int = 10
    """Chunks between checkpoints (when a checkpoint directory is given)."""

    def __post_init__(self) -> None:
        if self.d_transcoder <= 0 or self.chunks <= 0 or self.batch_tokens <= 0:
            raise ConfigError("d_transcoder, chunks and batch_tokens must be positive")
        if self.target_l0 <= 0:
            raise ConfigError("target_l0 must be positive")


@dataclass
class LayerReport:
    """Held-out quality of one layer's transcoder."""

    layer: int
    fvu: float
    """Fraction of variance unexplained: sum |y - y^|^2 / sum |y - mean y|^2."""
    l0: float
    """Mean active features per token."""
    dead: int
    """Features that never fire on the held-out tokens."""
    n_tokens: int


# ----------------------------------------------------------------------------- model access
def locate_mlp_hooks(
    model: nn.Module, input_hook: str | None = None, output_hook: str | None = None
) -> tuple[list[tuple[nn.Module, Where]], list[nn.Module], str, str]:
    """Where to read each layer's transcoder input and output, via the family adapter.

    Returns ``(inputs, outputs, input_hook, output_hook)``: ``inputs[l]`` is ``(module,
    "input"|"output")``, ``outputs[l]`` the module whose output is reconstructed.
    """
    from atlas.models.adapters import adapter_for_config

    adapter = adapter_for_config(model.config)
    in_hook = input_hook or adapter.default_input_hook
    out_hook = output_hook or adapter.default_output_hook
    layers = adapter.layers(model)
    inputs = [adapter.feature_input_module(layer, in_hook) for layer in layers]
    outputs = [adapter.feature_output_module(layer, out_hook) for layer in layers]
    return inputs, outputs, in_hook, out_hook


@contextmanager
def capture_mlp_io(
    model: nn.Module,
    layers: Sequence[int],
    input_hook: str | None = None,
    output_hook: str | None = None,
) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Forward hooks that keep, per forward pass, each layer's transcoder input ``(layer,
    "x")`` (as the feature input hook sees it) and MLP output ``(layer, "y")``; removed on
    exit. The caller clears the dict between passes."""
    from atlas.models.adapters import adapter_for_config

    inputs, outputs, in_hook, _ = locate_mlp_hooks(model, input_hook, output_hook)
    adapter = adapter_for_config(model.config)
    layer_modules = adapter.layers(model)
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def grab(key: tuple[int, str], kind: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], out: Any = None) -> None:
            value = args[0] if kind == "input" else out
            if isinstance(value, tuple):
                value = value[0]
            value = value.detach()
            if key[1] == "x":  # e.g. ln2.hook_normalized: the value before the norm's scale
                value = adapter.feature_input_value(layer_modules[key[0]], in_hook, value)
            captured[key] = value

        return hook

    handles = []
    try:
        for layer in layers:
            mod, kind = inputs[layer]
            if kind == "input":
                handles.append(mod.register_forward_pre_hook(grab((layer, "x"), "input")))
            else:
                handles.append(mod.register_forward_hook(grab((layer, "x"), "output")))
            handles.append(outputs[layer].register_forward_hook(grab((layer, "y"), "output")))
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    input_hook: str | None = None,
    output_hook: str | None = None,
    max_length: int = 64,
    docs_per_forward: int = 64,
    exclude_first_position: bool = True,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``texts`` through ``model`` and return ``{layer: (x (N, d), y (N, d))}`` for every
    real (non-padding) token, float32 on CPU."""
    n_layers = len(locate_mlp_hooks(model, input_hook, output_hook)[0])
    if not layers or max(layers) >= n_layers:
        raise InputError(f"layers {list(layers)} out of range for a {n_layers}-layer model")
    xs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    ys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    with capture_mlp_io(model, layers, input_hook, output_hook) as captured:
        for start in range(0, len(texts), docs_per_forward):
            batch = list(texts[start : start + docs_per_forward])
            enc = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in batch]
            width = max(len(ids) for ids in enc)
            ids_t = torch.full((len(enc), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.bool)
            for i, ids in enumerate(enc):
                ids_t[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[i, : len(ids)] = True
            keep = mask.clone()
            if exclude_first_position:
                keep[:, 0] = False
            captured.clear()
            model(input_ids=ids_t.to(device), attention_mask=mask.long().to(device))
            keep_d = keep.to(device)
            for layer in layers:
                xs[layer].append(captured[(layer, "x")][keep_d].float().cpu())
                ys[layer].append(captured[(layer, "y")][keep_d].float().cpu())
    return {layer: (torch.cat(xs[layer]), torch.cat(ys[layer])) for layer in layers}


# ----------------------------------------------------------------------------- the transcoder
class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > theta)``; pseudo-gradient for ``theta`` through a rectangle kernel."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta).abs() < eps / 2).to(pre.dtype)
        grad_pre = grad * (pre > theta)
        grad_theta = (-(theta / eps) * in_window * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """``(pre > theta)``; pseudo-gradient for ``theta`` only (the L0 penalty)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta).abs() < eps / 2).to(pre.dtype)
        return None, (-(1.0 / eps) * in_window * grad).sum(0), None


class TrainableTranscoder(nn.Module):
    """One layer's JumpReLU transcoder in normalised units (see the module docstring)."""

    def __init__(self, d_model: int, d_transcoder: int, skip: bool, init_threshold: float) -> None:
        super().__init__()
        w = torch.randn(d_transcoder, d_model)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder))
        self.W_dec = nn.Parameter(w.clone() * 0.1)
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.log_threshold = nn.Parameter(torch.full((d_transcoder,), math.log(init_threshold)))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if skip else None

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def forward(
        self, x: torch.Tensor, bandwidth: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, activations, l0 per token)``."""
        pre = x @ self.W_enc.T + self.b_enc
        theta = self.threshold
        acts = _JumpReLU.apply(pre, theta, bandwidth)
        l0 = _Step.apply(pre, theta, bandwidth).sum(-1)
        recon = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            recon = recon + x @ self.W_skip.T
        return recon, acts, l0


# ----------------------------------------------------------------------------- the trainer
def _scale(v: torch.Tensor) -> float:
    """Factor that gives ``v`` unit mean square per dimension."""
    ms = float(v.pow(2).mean())
    return 1.0 / math.sqrt(ms) if ms > 0 else 1.0


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (``None``: leave the count as is),
    then restore the previous count."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; these are data files anyone may read
    os.replace(tmp, path)


class TranscoderTrainer:
    """Trains a transcoder set for ``model`` from streamed text.

    Args:
        model: a Hugging Face causal LM of a supported family, in eval mode.
        tokenizer: its tokenizer.
        cfg: the run's settings.
        checkpoint_dir: where to keep resumable checkpoints (``None``: no checkpoints).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cfg: TranscoderTrainConfig,
        checkpoint_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.checkpoint_dir = checkpoint_dir
        inputs, _, self.input_hook, self.output_hook = locate_mlp_hooks(
            model, cfg.input_hook, cfg.output_hook
        )
        n_layers = len(inputs)
        self.layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
        if not self.layers or min(self.layers) < 0 or max(self.layers) >= n_layers:
            raise ConfigError(f"layers {self.layers} out of range for a {n_layers}-layer model")
        model_config: Any = getattr(model, "config")  # noqa: B009
        self.d_model = int(model_config.get_text_config().hidden_size)  # VLMs: the LM width
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self.transcoders = nn.ModuleDict(
                {
                    str(layer): TrainableTranscoder(
                        self.d_model, cfg.d_transcoder, cfg.skip, cfg.init_threshold
                    )
                    for layer in self.layers
                }
            )
        self.opt = torch.optim.Adam(self.transcoders.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.scale_in: dict[int, float] = {}
        self.scale_out: dict[int, float] = {}
        self.l0_coeff = {layer: cfg.l0_coeff_init for layer in self.layers}
        self.l0_ema = {layer: 0.0 for layer in self.layers}
        self.chunk = 0
        self.step = 0
        self.total_steps: int | None = None
        self.history: list[dict[str, float]] = []

    def _tc(self, layer: int) -> TrainableTranscoder:
        return cast(TrainableTranscoder, self.transcoders[str(layer)])

    # -- state ----------------------------------------------------------------------------
    def _state_path(self) -> Path:
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir / "trainer_state.safetensors"

    def save_checkpoint(self) -> None:
        """Write parameters, optimiser state and controller state (atomic replace)."""
        if self.checkpoint_dir is None:
            return
        tensors: dict[str, torch.Tensor] = {
            f"param.{k}": v for k, v in self.transcoders.state_dict().items()
        }
        opt_state = self.opt.state_dict()
        for idx, st in opt_state["state"].items():
            for key, val in st.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val)
        meta = {
            "chunk": self.chunk,
            "step": self.step,
            "total_steps": self.total_steps,
            "scale_in": self.scale_in,
            "scale_out": self.scale_out,
            "l0_coeff": self.l0_coeff,
            "l0_ema": self.l0_ema,
            "param_groups": opt_state["param_groups"],
            "config": asdict(self.cfg),
            "history": self.history,
        }
        _atomic_save(tensors, self._state_path(), {"atlas.trainer": json.dumps(meta)})
        logger.info("checkpoint at chunk %d (step %d)", self.chunk, self.step)

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoint_dir`` if a checkpoint is there; returns whether one was."""
        if self.checkpoint_dir is None or not self._state_path().exists():
            return False
        from safetensors import safe_open

        path = self._state_path()
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["atlas.trainer"])
            tensors = load_file(str(path))
        except (OSError, KeyError, ValueError) as exc:
            raise TranscoderError(f"unreadable trainer checkpoint {path}: {exc}") from exc
        if meta["config"] != asdict(self.cfg):
            raise ConfigError(f"checkpoint {path} was written with different training settings")
        self.transcoders.load_state_dict(
            {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
        )
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.chunk, self.step = int(meta["chunk"]), int(meta["step"])
        self.total_steps = meta["total_steps"]
        self.scale_in = {int(k): float(v) for k, v in meta["scale_in"].items()}
        self.scale_out = {int(k): float(v) for k, v in meta["scale_out"].items()}
        self.l0_coeff = {int(k): float(v) for k, v in meta["l0_coeff"].items()}
        self.l0_ema = {int(k): float(v) for k, v in meta["l0_ema"].items()}
        self.history = list(meta["history"])
        logger.info("resumed from chunk %d (step %d)", self.chunk, self.step)
        return True

    # -- training -------------------------------------------------------------------------
    def _collect(self, texts: Sequence[str]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return collect_activations(
            self.model,
            self.tokenizer,
            texts,
            self.layers,
            input_hook=self.input_hook,
            output_hook=self.output_hook,
            max_length=self.cfg.max_length,
            docs_per_forward=self.cfg.docs_per_forward,
            exclude_first_position=self.cfg.exclude_first_position,
        )

    def _init_from(self, acts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer in self.layers:
            x, y = acts[layer]
            self.scale_in[layer] = _scale(x)
            self.scale_out[layer] = _scale(y)
            tc = self._tc(layer)
            with torch.no_grad():
                tc.b_dec.copy_((y * self.scale_out[layer]).mean(0))
                # thresholds at the quantile that lets ~2x target_l0 features fire per token
                xs = (x * self.scale_in[layer])[:4096]
                pre = xs @ tc.W_enc.T + tc.b_enc
                q = max(0.0, 1.0 - 2.0 * self.cfg.target_l0 / self.cfg.d_transcoder)
                theta = torch.quantile(pre, q, dim=0).clamp_min(1e-3)
                tc.log_threshold.copy_(theta.log())

    def _lr(self) -> float:
        total = max(1, self.total_steps or 1)
        progress = min(1.0, self.step / total)
        warm = min(1.0, (self.step + 1) / 50)
        lo = self.cfg.lr_final_fraction
        return self.cfg.lr * warm * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _l0_target(self) -> float:
        total = max(1, self.total_steps or 1)
        ramp = min(1.0, self.step / max(1.0, self.cfg.l0_warmup_fraction * total))
        return self.cfg.target_l0 * (4.0 - 3.0 * ramp)

    def _resample_dead(
        self,
        fired: dict[int, torch.Tensor],
        x_by_layer: dict[int, torch.Tensor],
        gen: torch.Generator,
    ) -> int:
        n_total = 0
        for layer in self.layers:
            dead = (~fired[layer]).nonzero().flatten()
            if dead.numel() == 0:
                continue
            n_total += int(dead.numel())
            tc = self._tc(layer)
            x = x_by_layer[layer]
            pick = torch.randint(0, x.shape[0], (dead.numel(),), generator=gen)
            d = x[pick] - x.mean(0)
            d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-6)
            with torch.no_grad():
                alive_norm = (
                    tc.W_enc.norm(dim=1)[fired[layer]].mean() if fired[layer].any() else 1.0
                )
                tc.W_enc[dead] = d * alive_norm
                tc.b_enc[dead] = 0.0
                tc.W_dec[dead] = d * 0.1
                proj = (x[pick] * d).sum(-1) * alive_norm
                tc.log_threshold[dead] = (proj.clamp_min(1e-3) * 0.5).log()
            for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.log_threshold):
                st = self.opt.state.get(p)
                if st:
                    st["exp_avg"][dead] = 0.0
                    st["exp_avg_sq"][dead] = 0.0
        return n_total

    def train(
        self, text_source: TextSource, progress: bool = True, stop_after: int | None = None
    ) -> None:
        """Stream ``cfg.chunks`` buffers from ``text_source`` and train, resuming from the
        checkpoint if there is one; ``stop_after`` ends this call after that many chunks (a
        checkpoint is written then, so a later call continues)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        with torch_threads(cfg.threads or None):
            self.load_checkpoint()
            bar = tqdm(
                total=cfg.chunks,
                initial=self.chunk,
                desc="transcoders",
                disable=not progress,
                mininterval=2.0,
            )
            done_here = 0
            while self.chunk < cfg.chunks:
                if stop_after is not None and done_here >= stop_after:
                    self.save_checkpoint()
                    break
                done_here += 1
                acts = self._collect(text_source(self.chunk))
                if not self.scale_in:
                    self._init_from(acts)
                n_tok = next(iter(acts.values()))[0].shape[0]
                steps_per_pass = max(1, n_tok // cfg.batch_tokens)
                if self.total_steps is None:
                    self.total_steps = steps_per_pass * cfg.passes * cfg.chunks
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.chunk)
                xs = {layer: acts[layer][0] * self.scale_in[layer] for layer in self.layers}
                ys = {layer: acts[layer][1] * self.scale_out[layer] for layer in self.layers}
                fired = {
                    layer: torch.zeros(cfg.d_transcoder, dtype=torch.bool) for layer in self.layers
                }
                stats: dict[str, float] = {}
                for _ in range(cfg.passes):
                    perm = torch.randperm(n_tok, generator=gen)
                    for s in range(steps_per_pass):
                        idx = perm[s * cfg.batch_tokens : (s + 1) * cfg.batch_tokens]
                        batch = {layer: (xs[layer][idx], ys[layer][idx]) for layer in self.layers}
                        stats = self._step(batch, fired)
                self.chunk += 1
                resampled = 0
                if self.chunk < cfg.chunks and self.chunk / cfg.chunks <= cfg.resample_dead_until:
                    resampled = self._resample_dead(fired, xs, gen)
                stats["resampled"] = float(resampled)
                self.history.append({"chunk": float(self.chunk), **stats})
                bar.update(1)
                bar.set_postfix(fvu=f"{stats.get('fvu', 0):.3f}", l0=f"{stats.get('l0', 0):.1f}")
                logger.info("chunk %d/%d %s", self.chunk, cfg.chunks, stats)
                if self.checkpoint_dir is not None and (
                    self.chunk % cfg.checkpoint_every == 0 or self.chunk == cfg.chunks
                ):
                    self.save_checkpoint()
            bar.close()

    def _step(
        self, batch: dict[int, tuple[torch.Tensor, torch.Tensor]], fired: dict[int, torch.Tensor]
    ) -> dict[str, float]:
        lr = self._lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        target = self._l0_target()
        loss = torch.zeros(())
        fvus, l0s = [], []
        for layer in self.layers:
            x, y = batch[layer]
            tc = self._tc(layer)
            recon, acts, l0 = tc(x, self.cfg.bandwidth)
            var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-8)
            fvu = (recon - y).pow(2).sum() / var
            l0_mean = l0.mean()
            loss = loss + fvu + self.l0_coeff[layer] * l0_mean
            l0_val = float(l0_mean.detach())
            self.l0_ema[layer] = (
                l0_val if self.step == 0 else 0.9 * self.l0_ema[layer] + 0.1 * l0_val
            )
            rate = self.cfg.l0_controller_rate
            err = max(-1.0, min(1.0, (self.l0_ema[layer] - target) / target))
            self.l0_coeff[layer] = min(1.0, max(1e-7, self.l0_coeff[layer] * math.exp(rate * err)))
            fired[layer] |= (acts > 0).any(0)
            fvus.append(float(fvu.detach()))
            l0s.append(l0_val)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return {"fvu": sum(fvus) / len(fvus), "l0": sum(l0s) / len(l0s), "lr": lr}

    # -- evaluation and export --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, texts: Sequence[str]) -> list[LayerReport]:
        """FVU, L0 and dead features per layer on ``texts`` (held-out text)."""
        return evaluate_transcoders(self.export_tensors(), self._collect(texts))

    def export_tensors(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per-layer tensors in circuit-tracer's naming, scales folded in (original units)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for layer in self.layers:
            tc = self._tc(layer)
            s_in, s_out = self.scale_in.get(layer, 1.0), self.scale_out.get(layer, 1.0)
            t = {
                "W_enc": (tc.W_enc.detach() * s_in).contiguous(),
                "W_dec": (tc.W_dec.detach() / s_out).contiguous(),
                "b_enc": tc.b_enc.detach().clone(),
                "b_dec": (tc.b_dec.detach() / s_out).contiguous(),
                "activation_function.threshold": tc.threshold.detach().clone(),
            }
            if tc.W_skip is not None:
                t["W_skip"] = (tc.W_skip.detach() * (s_in / s_out)).contiguous()
            out[layer] = t
        return out

    def save(self, out_dir: Path, model_name: str = "") -> Path:
        """Write ``config.yaml`` and ``layer_{i}.safetensors`` (circuit-tracer's layout)."""
        return save_transcoder_set(
            self.export_tensors(), out_dir, self.input_hook, self.output_hook, model_name
        )


def apply_transcoder(
    t: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reconstruction, activations)`` of an exported transcoder on inputs ``x`` (N, d)."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    theta = t.get("activation_function.threshold")
    acts = pre * (pre > theta) if theta is not None else torch.relu(pre)
    recon = acts @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        recon = recon + x @ t["W_skip"].T
    return recon, acts


def evaluate_transcoders(
    tensors: dict[int, dict[str, torch.Tensor]],
    acts: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> list[LayerReport]:
    """FVU, L0 and dead-feature count per layer of exported transcoders on collected activations."""
    reports = []
    for layer, t in sorted(tensors.items()):
        x, y = acts[layer]
        recon, a = apply_transcoder(t, x)
        var = float((y - y.mean(0)).pow(2).sum())
        fvu = float((recon - y).pow(2).sum()) / max(var, 1e-12)
        active = a > 0
        reports.append(
            LayerReport(
                layer=layer,
                fvu=fvu,
                l0=float(active.sum(-1).float().mean()),
                dead=int((~active.any(0)).sum()),
                n_tokens=int(x.shape[0]),
            )
        )
    return reports


def save_transcoder_set(
    tensors: dict[int, dict[str, torch.Tensor]],
    out_dir: Path,
    input_hook: str,
    output_hook: str,
    model_name: str = "",
) -> Path:
    """Write a per-layer transcoder set in circuit-tracer's layout; returns ``out_dir``.

    ``config.yaml`` names no per-layer paths (circuit-tracer 0.5.0 then globs
    ``layer_*.safetensors`` next to it when given the directory's absolute path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for layer, t in sorted(tensors.items()):
        _atomic_save(t, out_dir / f"layer_{layer}.safetensors", {"format": "pt"})
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "model_name": model_name,
    }
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    return out_dir


def train_transcoders(
    model: nn.Module,
    tokenizer: Any,
    text_source: TextSource,
    eval_texts: Sequence[str],
    out_dir: Path,
    cfg: TranscoderTrainConfig,
    *,
    model_name: str = "",
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> list[LayerReport]:
    """Train, save to ``out_dir`` and report held-out quality per layer (the one-call API)."""
    trainer = TranscoderTrainer(model, tokenizer, cfg, checkpoint_dir=checkpoint_dir)
    trainer.train(text_source, progress=progress)
    trainer.save(out_dir, model_name=model_name)
    reports = trainer.evaluate(eval_texts)
    for r in reports:
        logger.info(
            "layer %d: FVU %.4f  L0 %.1f  dead %d/%d",
            r.layer,
            r.fvu,
            r.l0,
            r.dead,
            cfg.d_transcoder,
        )
    return reports
