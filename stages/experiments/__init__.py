"""Tools that drive the pipeline through DVC and read MLflow: the study (grids/*.yaml), the
comparison report (compare), named params sets (preset, presets/*.yaml). No stage imports them."""
