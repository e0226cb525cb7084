"""Tools that drive the pipeline through DVC and read MLflow: plans of experiments (plans/*.yaml,
plan.py) and the one command that runs and reports them (engine.py, reports/), the comparison
report (compare), named params sets (preset, presets/*.yaml). No stage imports them."""
