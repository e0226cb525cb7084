"""MLflow: the client side every run uses (store, runs, tags, the missed-log journal and its
replay, the logged model) and the team server (`make mlflow-server`: server.py).

Set here, before any submodule imports mlflow:
"""

import logging
import os

# No network access but the data download: MLflow 3 would otherwise send usage telemetry.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A dead server should cost seconds, not MLflow's default of minutes of retries per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# Quiet by default: what a stage prints is its own progress and its result. No progress bars
# for the artifacts MLflow copies (logging the model downloads it again to check it) ...
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# ... and no notes of the SQLite store's table set-up ("Creating initial MLflow database tables",
# "Updating database tables", alembic's migrations). Warnings and errors still show.
for _name in ("mlflow.store.db.utils", "alembic"):
    if logging.getLogger(_name).level == logging.NOTSET:  # unless the user set a level
        logging.getLogger(_name).setLevel(logging.WARNING)
