"""The end-to-end experiment (``pairtrace run CONFIG.yaml``): run context, stage cache, plan, rankers, retrainers,
results and tables. See ``docs/architecture.md``."""
