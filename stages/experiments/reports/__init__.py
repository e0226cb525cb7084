"""Reports of experiments: views of the finished runs, and how they are written.

One lookup of finished runs (`finished_runs`) serves every report and the comparison, from an
MLflow store or, on a machine without MLflow, from a journal (tracking URI `journal:<folder>`,
stages/tracking/journal.py: its Reader gives the runs in MLflow's shape). Every report's files
go to one MLflow parent run per prefix (`log_to_parent`), under which the MLflow UI nests the
pass's runs; a journal has no parent run (`engine report` after the replay makes it). A report
never destroys (`write_files`): built from no runs it writes nothing and says so in one line,
and it never replaces a file that git has committed with one that holds less (fewer table rows,
or fewer runs) unless asked (`force`). A pass under a prefix of its own writes files of its
own, which no commit holds.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from stages.errors import ParamsError
from stages.tracking import journal

RUNS_LINE = "Built from {n} finished runs."
_RUNS = re.compile(r"Built from (\d+) finished runs\.")


def finished_runs(
    client, experiment_id: str, prefix: str | None = None, name: str | None = None
) -> dict:
    """{DVC experiment name: its latest FINISHED, evaluated run}, of the names `<prefix>-…`, or
    of `name` alone (every run without either). A run without `dvc.exp_name` is keyed by its
    run name. `client` is an MlflowClient or a journal's Reader (open_experiment gives either)."""
    if isinstance(client, journal.Reader):
        runs = client.runs(experiment_id, prefix, name)
    else:
        if name:
            query = f"tags.`dvc.exp_name` = '{name}'"
        else:
            query = f"tags.`dvc.exp_name` LIKE '{prefix}-%'" if prefix else ""
        runs = client.search_runs([experiment_id], query, max_results=50000)
    by_name = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):  # the latest run of a name wins
        if run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics:
            by_name[run.data.tags.get("dvc.exp_name", run.info.run_name)] = run
    return by_name


def open_experiment(tracking_uri: str | None = None, experiment: str | None = None):
    """(client, experiment id or None, experiment name, tracking URI); params.yaml's mlflow
    section by default. For a journal (`journal:<folder>`) the client is the journal's Reader
    and the experiment's id its name, as the journal keeps it; mlflow is not imported."""
    from stages import params as P
    from stages.tracking import store

    if tracking_uri is None or experiment is None:
        params = P.load()
        tracking_uri = tracking_uri or store.tracking_uri(params.mlflow)
        experiment = experiment or params.mlflow.experiment
    if journal.is_journal(tracking_uri):
        reader = journal.Reader(tracking_uri)
        found_id = experiment if experiment in reader.experiments() else None
        return reader, found_id, experiment, tracking_uri
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client, found.experiment_id if found else None, experiment, tracking_uri


def table_rows(text: str) -> int:
    """The data rows of a Markdown text's tables (header and separator lines left out)."""
    return len(row_keys(text))


def row_keys(text: str) -> list[str]:
    """Each data row of a Markdown text's tables as `section: first cell` (the section its
    nearest heading; bold and the ✓ of a choice left out), in order."""
    lines = [line.strip() for line in text.splitlines()]
    keys, section = [], ""
    for i, line in enumerate(lines):
        if line.startswith("#"):
            section = line.lstrip("# ").split(" (")[0]
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            continue  # a header
        first = line.strip("|").split("|")[0].replace("**", "").replace("✓", "").strip()
        keys.append(f"{section}: {first}" if section else first)
    return keys


def runs_in(text: str) -> int | None:
    """The number of runs a report says it was built from (None when it doesn't say)."""
    found = _RUNS.search(text)
    return int(found.group(1)) if found else None


def committed(path: Path) -> str | None:
    """The file's text in git's HEAD, or None (no git, not in a git repository, or not
    committed)."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    try:
        result = subprocess.run(
            ["git", "show", f"HEAD:./{path.name}"], capture_output=True, text=True, cwd=path.parent
        )
    except OSError:  # no git here (a GPU machine running the engine without DVC)
        return None
    return result.stdout if result.returncode == 0 else None


def less_than_committed(path: Path, text: str, keyed: bool = False) -> str | None:
    """Why `text` holds less than the committed `path` (None when it holds as much or more).
    `keyed`: every row is a point or a study's row, which must stay (more rows of other points
    don't make up for one lost)."""
    old = committed(path)
    if old is None:
        return None
    old_rows, new_rows = table_rows(old), table_rows(text)
    if new_rows < old_rows:
        return f"{new_rows} table rows where the committed file has {old_rows}"
    kept = set(row_keys(text))
    lost = [key for key in row_keys(old) if key not in kept] if keyed else []
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        return f"no row {lost[0]!r}{more} of the committed file"
    old_runs, new_runs = runs_in(old), runs_in(text)
    if old_runs is not None and new_runs is not None and new_runs < old_runs:
        return f"{new_runs} runs where the committed file has {old_runs}"
    return None


class Refused(ParamsError):
    """A report not written, in one line saying why."""


def check_not_less(report: Path, text: str, force: bool = False, keyed: bool = False) -> None:
    """Refuse (one line) to replace a committed report with one that holds less (`keyed`: see
    less_than_committed)."""
    why = None if force else less_than_committed(report, text, keyed)
    if why:
        raise Refused(
            f"not overwriting {report}: the new report has {why} (--force replaces it; "
            "--out DIR writes it elsewhere, --prefix a pass's report under names of its own)"
        )


def parent_run(client, experiment_id: str, prefix: str, plan: str) -> str:
    """The pass's parent run (tag sweep.prefix = prefix): the one made before, else a new one.
    Two machines that report together may each make one; every report keeps the oldest (start
    time, then run id: the same answer everywhere) and deletes the others."""
    query = f"tags.`sweep.prefix` = '{prefix}'"

    def oldest_and_deleted() -> str | None:
        runs = client.search_runs([experiment_id], query, max_results=1000)
        runs.sort(key=lambda r: (r.info.start_time, r.info.run_id))
        for extra in runs[1:]:
            client.delete_run(extra.info.run_id)
        return runs[0].info.run_id if runs else None

    found = oldest_and_deleted()
    if found:
        return found
    run = client.create_run(
        experiment_id, run_name=prefix, tags={"sweep.prefix": prefix, "sweep.grid": plan}
    )
    client.set_terminated(run.info.run_id)  # FINISHED: it holds reports, not a training
    return oldest_and_deleted()


def log_to_parent(
    client, experiment_id: str, prefix: str, plan: str, files, children
) -> str | None:
    """The report's files as artifacts of the pass's parent run, and every run it was built
    from nested under it (tag mlflow.parentRunId); the parent's id. None from a journal: its
    runs are nested when `engine report` runs again on the store they were replayed into."""
    if isinstance(client, journal.Reader):
        return None
    from mlflow.exceptions import MlflowException

    parent = parent_run(client, experiment_id, prefix, plan)
    for path in files:
        client.log_artifact(parent, str(path))
    for run in children:
        if run.data.tags.get("mlflow.parentRunId") != parent:
            try:
                client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
            except MlflowException:  # another machine's report tagged it at the same moment
                tagged = client.get_run(run.info.run_id).data.tags.get("mlflow.parentRunId")
                if tagged != parent:
                    client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
    return parent
