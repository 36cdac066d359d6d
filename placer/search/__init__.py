"""Finding a placement: the search loop (:mod:`placer.search.search`), best-keeping and budget
(:mod:`placer.search.tracker`), local search, the learning agents and the baselines."""
