"""What one prompt feeds the model: :class:`ModelInputs`, made by the model's loading code.

Both passes of attribution (the real forward and the frozen one) take the same object, so an
input kind beyond token ids (images) is a change to whoever makes it, not to the engine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from atlas.images import ImageInfo


class ModelInputs(NamedTuple):
    """One prompt, as the model takes it (``P`` positions, batch of one).

    input_ids             (P,) int64      token ids, a special token first (an image prompt: the
                                          processor's ids, image soft tokens included)
    pixel_values          (I, C, H, W)    the processor's images, or ``None``
    token_type_ids        (P,) int64      1 at image soft tokens, or ``None`` (a vision-language
                                          model needs them: they make attention inside an image
                                          bidirectional)
    bidirectional_prefix  int             positions before this may attend to each other in both
                                          directions; from it on attention is causal (0: text)
    image_positions       (T,) int64      positions of the image soft tokens, or ``None``
    image_grid            (T, 2) int64    their ``(row, col)`` on the pooled grid (row-major, the
                                          projector's pooling order), or ``None``
    image                 ImageInfo       the image's sha256, size and format, or ``None``

    ``bidirectional_prefix`` is the switch behind the engine's causal-prefix shortcuts: a target
    at position ``p`` depends on the first :meth:`prefix_for` ``(p)`` positions only. With an
    image it is the end of the image block: on Gemma-3 the block attends to itself in both
    directions, so a target inside it depends on later image positions; on LLaVA (causal) it only
    keeps every forward from cutting the image (the model checks the count of image tokens), which
    costs compute, never exactness.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    bidirectional_prefix: int = 0
    image_positions: torch.Tensor | None = None
    image_grid: torch.Tensor | None = None
    image: ImageInfo | None = None

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_image_tokens(self) -> int:
        return 0 if self.image_positions is None else int(self.image_positions.shape[0])

    def prefix_for(self, pos: int) -> int:
        """How many leading positions a target at ``pos`` depends on.

        Under causal attention a position sees itself and what precedes it; inside a
        bidirectional block it sees the whole block.
        """
        return min(self.n_pos, max(pos + 1, self.bidirectional_prefix))

    def forward_kwargs(
        self, device: torch.device | str, prefix: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward on the first ``prefix`` positions (batch 1).

        ``prefix`` must not cut a bidirectional block (every image stays whole).
        """
        p = self.n_pos if prefix is None else prefix
        if p < min(self.bidirectional_prefix, self.n_pos):
            raise ValueError(
                f"prefix {p} cuts the bidirectional block ({self.bidirectional_prefix})"
            )
        kwargs = {"input_ids": self.input_ids[:p].to(device)[None]}
        if self.token_type_ids is not None:
            kwargs["token_type_ids"] = self.token_type_ids[:p].to(device)[None]
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values.to(device)
        return kwargs

    def cpu(self) -> ModelInputs:
        """The same inputs with every tensor on the CPU (for results and artifacts)."""

        def cpu(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.cpu()

        return self._replace(
            input_ids=self.input_ids.cpu(),
            pixel_values=cpu(self.pixel_values),
            token_type_ids=cpu(self.token_type_ids),
            image_positions=cpu(self.image_positions),
            image_grid=cpu(self.image_grid),
        )
