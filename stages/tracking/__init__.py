"""MLflow: the client side every run uses (store, runs, tags, the missed-log journal and its
replay, the logged model) and the team server (`make mlflow-server`: server.py).

Set here, before any submodule imports mlflow:
"""

import os

# No network access but the data download: MLflow 3 would otherwise send usage telemetry.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A dead server should cost seconds, not MLflow's default of minutes of retries per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
