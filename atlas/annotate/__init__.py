"""Feature labels.

lens      logit_lens(w_dec, w_u, k) -> LensResult       pure torch
labels    short_label(top_tokens, activating_tokens)    pure Python
apply     store_logit_lens(driver, tset_hash, w_dec, w_u, decode), label_features(driver)
          (writes ``top_tokens``/``bottom_tokens``/``label``/``top_act_*`` on ``Feature``)
"""
