"""Analyses of transcoder features and circuits that need no database (pure torch / Python).

    lens      logit_lens(w_dec, w_u, k) -> LensResult; logit_lens_for(model, transcoders)
    labels    short_label(top_tokens, activating_tokens)

Results are stored on ``Feature`` nodes by :mod:`atlas.store.labels`.
"""
