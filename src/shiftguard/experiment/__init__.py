"""The augmentation experiment: arms, their paired comparison, and the design's power.

- :mod:`~shiftguard.experiment.runner`: one cell (arm x training seed x split seed), run by Hydra's
  multirun sweeper over ``conf/design/<name>.yaml``.
- :mod:`~shiftguard.experiment.report`: the cells compared, each arm against the reference arm,
  into ``reports/experiment/`` and MLflow.
- :mod:`~shiftguard.experiment.stats`: paired bootstrap over seeds and cases, DeLong per run,
  power.
- :mod:`~shiftguard.experiment.design`: how many cases a design needs.
"""
