"""``placer.optimize`` as small typed stages over one frozen config.

- :mod:`placer.optimizing.config`: :class:`OptimizeConfig`, the options and their defaults;
- :mod:`placer.optimizing.devices`: which devices a run places on;
- :mod:`placer.optimizing.stages`: prepare, compile, baselines, search, confirm, check, write;
- :mod:`placer.optimizing.stage_outputs`: the typed data each stage hands on;
- :mod:`placer.optimizing.earlier_results`: an earlier run's files in ``out_dir``, moved aside and back;
- :mod:`placer.optimizing.resume`: ``--resume``, the placements an earlier run left to continue from;
- :mod:`placer.optimizing.winner`: which fitting placement wins the comparison;
- :mod:`placer.optimizing.run`: :func:`optimize` (``placer.optimize``) chains them.

The package is not called ``placer.optimize``: that name is the public function, and a
subpackage of the same name would replace it on ``placer`` as soon as it was imported.
"""
