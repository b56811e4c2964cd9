"""``atlas demo``: the whole pipeline on the embedded toy world, from nothing to cross-prompt
answers, through real services (:mod:`atlas.demo.services`).

:func:`atlas.demo.run.run_demo` runs the steps in order, each printing its wall time; the text
part is :mod:`atlas.demo.text`. Printing helpers are :mod:`atlas.demo.output`.
"""
