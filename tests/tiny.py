from atlas.testing.tiny import *  # noqa: F403  (the tiny builders moved to atlas.testing.tiny)
