"""Transcoders: loading every format users have, and the encode/decode the engine needs.

Public API::

    load_transcoders(path, model=None, *, device="cpu", dtype=torch.float32) -> TranscoderSet
    TranscoderSet.encode(layer, x) / pre_activations(layer, x) / decoder(layer) / skip(layer, x)

(``atlas.transcoders.training`` belongs to the toy world and is not imported here.)
"""

from atlas.transcoders.loading import TranscoderSet, load_transcoders

__all__ = ["TranscoderSet", "load_transcoders"]
