"""Public hook points: where the engine (and any later computation on the model) reads and writes.

A :class:`HookPoint` names one value inside the model: a module's first positional input or its
output (the first element when the module returns a tuple). Attribution, the perturbation
oracle and interventions all reach into the model through these, so a family adapter is the only
place that knows module names.

Per layer, :func:`layer_hooks` gives the transcoder's read point (with the map from the captured
value to the transcoder input, see :meth:`FamilyAdapter.feature_input_value`) and the MLP output
it reconstructs; :func:`embedding_point` gives where the embedding nodes' vectors enter the
residual stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from atlas.models.adapters import Where

if TYPE_CHECKING:
    from atlas.models.loading import LoadedModel
    from atlas.transcoders.loading import TranscoderSet


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class HookPoint:
    """One value inside the model: ``module``'s first input or its (first) output."""

    module: nn.Module
    where: Where

    def capture(self, fn: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``fn(value)`` on every forward pass (the value is not changed)."""
        if self.where == "output":

            def after(_m: nn.Module, _args: Any, out: Any) -> None:
                fn(_first(out))

            return self.module.register_forward_hook(after)

        def before(_m: nn.Module, args: Any) -> None:
            fn(_first(args))

        return self.module.register_forward_pre_hook(before)

    def replace(self, fn: Callable[[Tensor], Tensor]) -> RemovableHandle:
        """Replace the value by ``fn(value)`` on every forward pass."""
        if self.where == "output":

            def after(_m: nn.Module, _args: Any, out: Any) -> Any:
                new = fn(_first(out))
                return (new, *out[1:]) if isinstance(out, tuple) else new

            return self.module.register_forward_hook(after)

        def before(_m: nn.Module, args: Any) -> Any:
            return (fn(args[0]), *args[1:])

        return self.module.register_forward_pre_hook(before)


@dataclass(frozen=True)
class LayerHooks:
    """Where one layer's transcoder reads its input and which output it reconstructs."""

    feature_input: HookPoint
    """The value the transcoder input is derived from."""
    to_input: Callable[[Tensor], Tensor]
    """Captured value -> transcoder input (an affine map; exact under frozen norms)."""
    feature_output: HookPoint
    """The MLP output the transcoder reconstructs (its residual contribution)."""


def layer_hooks(model: LoadedModel, tset: TranscoderSet) -> list[LayerHooks]:
    """Per decoder layer, the transcoder's hook points for ``tset``'s hook names."""
    adapter = model.adapter
    hook = tset.feature_input_hook
    out = []
    for layer in adapter.layers(model.hf):
        in_mod, where = adapter.feature_input_module(layer, hook)
        out_mod = adapter.feature_output_module(layer, tset.feature_output_hook)
        out.append(
            LayerHooks(
                feature_input=HookPoint(in_mod, where),
                to_input=functools.partial(adapter.feature_input_value, layer, hook),
                feature_output=HookPoint(out_mod, "output"),
            )
        )
    return out


def embedding_point(model: LoadedModel) -> HookPoint:
    """Where the embedding nodes' vectors enter the residual stream (see the adapter)."""
    module, where = model.adapter.residual_input_point(model.hf)
    return HookPoint(module, where)
