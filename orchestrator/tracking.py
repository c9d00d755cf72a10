"""MLflow tracking for bench, tune and distill: one parent run per invocation, one child
run per cell or trial.

Everything goes through an explicit `MlflowClient` and run ids, never MLflow's global
active-run state, because one driver process drives many cells at once.

    uri = resolve_tracking_uri(args.tracking_uri, out_dir)   # sqlite:///<out>/mlflow.db
    check_tracking_uri(uri)                                   # TrackingError -> exit 2
    tracker = Tracker(uri, "dfkd-bench", out_dir / "mlartifacts")
    parent = tracker.start_parent("bench", params={...}, tags={...})
    child = tracker.start_child(parent, "cifar10/cmi/wrn40_2-wrn16_1/s0",
                                tags=cell.tags(), params=config)
    tracker.log_metrics(child, {"acc": 0.71, "loss/kd": 0.3}, step=epoch)
    tracker.finish(child, "FINISHED")
    print(tracker.ui_command())   # mlflow ui --backend-store-uri sqlite:////abs/mlflow.db ...

Store notes (MLflow 3.x): the default store is SQLite because the plain file store
(./mlruns) refuses writes; experiments get an explicit `artifact_location`, otherwise
artifacts land in the current working directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# mlflow itself is imported lazily (it takes seconds), so the CLIs can resolve and check
# the URI, and catch TrackingError, before paying for it. These limits are MLflow's
# (mlflow.utils.validation); the store rejects anything beyond them.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250

__all__ = [
    "CELL_FIELDS",
    "Tracker",
    "TrackingError",
    "cell_key",
    "check_tracking_uri",
    "flatten_params",
    "resolve_tracking_uri",
    "sanitize_key",
]

# The fixed order of a cell key; `finished_cells` returns tuples of these tag values, then
# those of OPTIONAL_CELL_FIELDS a cell has (a guided cell: its guide set), so the key of a
# cell without them is what it always was.
CELL_FIELDS = ("dataset", "teacher", "student", "method", "seed", "budget", "mode")
OPTIONAL_CELL_FIELDS = ("guide",)
DEFAULT_DB_NAME = "mlflow.db"
_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(ValueError):
    """The tracking store cannot be used (unreachable server, unwritable folder, bad URI)."""


# --------------------------------------------------------------------------- URIs

def _sqlite_uri(path: Path) -> str:
    # sqlite:/// + absolute path -> four slashes on POSIX; the printed `mlflow ui` command
    # then works from any directory.
    return "sqlite:///" + str(Path(path).expanduser().resolve())


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def resolve_tracking_uri(tracking_uri: str | None, out_dir: Path) -> str:
    """The store URI to use: `sqlite:///<abs out_dir>/mlflow.db` by default.

    Accepts `sqlite:///path.db` (made absolute), `http(s)://host:port` and a plain path
    to a `.db` file (or to a folder, which gets `mlflow.db` inside it).
    """
    if tracking_uri is None or not str(tracking_uri).strip():
        return _sqlite_uri(Path(out_dir) / DEFAULT_DB_NAME)
    uri = str(tracking_uri).strip()
    low = uri.lower()
    if low.startswith(("http://", "https://")):
        return uri.rstrip("/")
    if low.startswith("sqlite:"):
        if not low.startswith("sqlite:///"):
            raise TrackingError(f"bad SQLite tracking URI {uri!r}: write sqlite:///relative.db "
                                "or sqlite:////absolute/path.db")
        return _sqlite_uri(_sqlite_path(uri))
    if re.match(r"^(postgresql|mysql|mssql)(\+\w+)?://", low):
        return uri  # other SQL stores MLflow supports; passed through unchanged
    if "://" in uri or low.startswith("file:"):
        raise TrackingError(f"unsupported tracking URI {uri!r}: use a SQLite file "
                            "(path/to/mlflow.db or sqlite:///path.db) or an MLflow server "
                            "(http://host:port); the plain file store refuses writes")
    path = Path(uri).expanduser()
    if path.suffix.lower() in _DB_SUFFIXES:
        return _sqlite_uri(path)
    if path.is_dir():
        return _sqlite_uri(path / DEFAULT_DB_NAME)
    raise TrackingError(f"tracking URI {uri!r} is neither a .db file, a folder, sqlite:///... "
                        "nor http(s)://...; e.g. --tracking-uri runs/mlflow.db")


def _server_hint(uri: str) -> str:
    return ("start one with `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server "
            "--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "
            f"{_port_of(uri)}` or drop --tracking-uri to use a local SQLite store")


def _port_of(uri: str) -> str:
    from urllib.parse import urlsplit
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        port = None
    return str(port or (443 if parts.scheme == "https" else 5000))


def check_tracking_uri(uri: str, timeout: float = 5) -> None:
    """Fail fast with one clear line if the store cannot be used.

    http(s): one plain GET of /health (then the experiments API, for servers behind a
    proxy without /health), each with `timeout`: MLflow's own client retries for minutes
    before giving up, far too long to tell a user their server is not running.
    sqlite: the database's folder must be writable (or creatable).
    """
    low = uri.lower()
    if low.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        last_error = ""
        for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            try:
                with urllib.request.urlopen(base + path, timeout=timeout) as response:
                    if 200 <= response.status < 300:
                        return
                    last_error = f"HTTP {response.status} from {path}"
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code} from {path}"
            except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout
                reason = getattr(e, "reason", e)
                raise TrackingError(f"cannot reach MLflow tracking server at {base}: {reason}; "
                                    f"{_server_hint(base)}") from None
        raise TrackingError(f"cannot reach MLflow tracking server at {base}: {last_error}; "
                            f"{_server_hint(base)}")
    if low.startswith("sqlite:///"):
        folder = _sqlite_path(uri).parent
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise TrackingError(f"cannot write the MLflow store {uri}: folder {existing} is not "
                                "writable; choose another --out or --tracking-uri")
        db = _sqlite_path(uri)
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise TrackingError(f"cannot write the MLflow store {db}: the file is read-only; "
                                "choose another --out or --tracking-uri")


# ------------------------------------------------------------------ names and values

_BAD_CHARS = re.compile(r"[^\w\-. /]")  # MLflow's portable set (':' is refused on Windows)


def sanitize_key(name: Any) -> str:
    """A metric/param/tag name MLflow accepts: alphanumerics, `_ - . / space`, no empty,
    `.` or `..` path segments and no leading slash (names may become file paths)."""
    name = _BAD_CHARS.sub("_", str(name))
    parts = [p if p != ".." else "__" for p in name.split("/") if p not in ("", ".")]
    name = "/".join(parts) or "_"
    return name[:MAX_ENTITY_KEY_LENGTH]


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        try:
            text = json.dumps(list(items), default=str)
        except (TypeError, ValueError):
            text = str(list(items))
    elif isinstance(value, Path):
        text = str(value)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:  # MLflow rejects longer param values
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (and dataclasses) become `a.b.c` keys; values become strings of at
    most MLflow's 6000 characters; keys are sanitized."""
    out: dict[str, str] = {}
    params = _to_plain(params)
    for key, value in (params or {}).items():
        full = f"{prefix}.{key}" if prefix else str(key)
        value = _to_plain(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, full))
        else:
            out[sanitize_key(full)] = _stringify(value)
    return out


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_TAG_VAL_LENGTH]


def cell_key(cell: Mapping[str, Any]) -> tuple[str | None, ...]:
    """The cell key in `finished_cells`' form: values as strings in CELL_FIELDS order,
    None for a missing field, then the optional fields the cell has (non-empty). Accepts a
    plain mapping (dataset=..., seed=0, ...)."""
    return (tuple(None if cell.get(f) is None else str(cell[f]) for f in CELL_FIELDS)
            + tuple(str(cell[f]) for f in OPTIONAL_CELL_FIELDS if cell.get(f)))


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --------------------------------------------------------------------------- tracker

class Tracker:
    """Runs of one experiment in one store, addressed by run id (thread-safe)."""

    page_size = 1000  # runs per search page in finished_cells

    def __init__(self, uri: str, experiment_name: str, artifact_root: Path | str | None = None):
        self.uri = uri
        self.experiment_name = experiment_name
        self.is_remote = uri.lower().startswith(("http://", "https://"))
        self.is_sqlite = uri.lower().startswith("sqlite:///")
        # SQLite allows one writer at a time; serialize this process's calls instead of
        # letting concurrent cells trip over "database is locked". A server does its own.
        self._lock: contextlib.AbstractContextManager = (
            contextlib.nullcontext() if self.is_remote else threading.RLock())
        if self.is_sqlite:
            _sqlite_path(uri).parent.mkdir(parents=True, exist_ok=True)
        if artifact_root is None and not self.is_remote:
            base = _sqlite_path(uri).parent if self.is_sqlite else Path.cwd()
            artifact_root = base / "mlartifacts"
        self.artifact_location = self._artifact_location(artifact_root, experiment_name)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._get_or_create_experiment()
        except MlflowException as e:
            raise TrackingError(f"cannot open MLflow store {uri}: {e.message}") from None

    @staticmethod
    def _artifact_location(root: Path | str | None, name: str) -> str | None:
        if root is None:
            return None  # an http server picks its --default-artifact-root
        folder = re.sub(r"[^\w\-.]+", "_", name).strip("._") or "experiment"
        if isinstance(root, str) and "://" in root:
            return root.rstrip("/") + "/" + folder
        path = Path(root).expanduser().resolve() / folder
        return path.as_uri()

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException
        with self._lock:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    return self.client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location)
                except MlflowException as e:  # another process created it just now
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise e
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {self.experiment_name!r} is deleted in {self.uri}; "
                    f"restore it (`mlflow experiments restore --experiment-id {exp.experiment_id}`"
                    " with MLFLOW_TRACKING_URI set) or choose another experiment name")
            # An existing experiment keeps its own artifact location.
            self.artifact_location = exp.artifact_location
            return exp.experiment_id

    # -- runs

    def start_parent(self, run_name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None) -> str:
        """A top-level run (one per bench/tune invocation); returns its run id."""
        return self._start(run_name, tags or {}, params or {})

    def start_child(self, parent_id: str, run_name: str, tags: Mapping[str, Any] | None = None,
                    params: Mapping[str, Any] | None = None) -> str:
        """A run nested under `parent_id` (the UI groups it there); `params` is the full
        effective config, flattened. Returns the run id."""
        tags = dict(tags or {})
        tags["mlflow.parentRunId"] = parent_id
        return self._start(run_name, tags, params or {})

    def _start(self, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any]) -> str:
        tag_dict = {str(k): _tag_value(v) for k, v in tags.items() if v is not None}
        with self._lock:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tag_dict)
            run_id = run.info.run_id
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Flattened, stringified params in batches of MLflow's 100 per call. A param is
        immutable once logged: logging the same key again with another value fails."""
        from mlflow.entities import Param
        flat = flatten_params(params)
        entries = [Param(k, v) for k, v in flat.items()]
        with self._lock:
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, params=chunk, synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        entries = [RunTag(str(k), _tag_value(v)) for k, v in tags.items() if v is not None]
        with self._lock:
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, tags=chunk, synchronous=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log numeric metrics at `step` (the epoch). Names are sanitized (`loss:kd` ->
        `loss_kd`); None and non-numeric values are skipped. NaN and Inf are logged on
        purpose: MLflow accepts them (SQL stores NaN as a flag and clamps Inf to the
        largest float), and a diverged cell should show its NaN rather than a gap."""
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            if value is None or isinstance(value, (str, bytes)):
                continue
            try:
                value = float(value)  # also 0-d tensors and numpy scalars
            except (TypeError, ValueError):
                continue
            entries.append(Metric(sanitize_key(key), value, ts, int(step)))
        with self._lock:
            for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk, synchronous=True)

    def log_artifact(self, run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
        """Copy a file (or a folder's contents) into the run's artifacts."""
        path = Path(path)
        with self._lock:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, dataframe: Any, artifact_file: str) -> None:
        """An MLflow table artifact (JSON, shown as a table in the UI); `artifact_file`
        ends in .json. Logging to the same file again appends rows."""
        with self._lock:
            self.client.log_table(run_id, dataframe, artifact_file)

    def finish(self, run_id: str, status: str = "FINISHED",
               tags: Mapping[str, Any] | None = None) -> None:
        """End a run as FINISHED, FAILED or KILLED, after setting `tags` (e.g. the reason)."""
        status = status.upper()
        if status not in _STATUSES:
            raise ValueError(f"run status must be one of {', '.join(_STATUSES)}, not {status!r}")
        with self._lock:
            if tags:
                self.set_tags(run_id, tags)
            self.client.set_terminated(run_id, status=status)

    # -- resume

    def close_abandoned(self, tag: str, value: str) -> int:
        """Marks KILLED the runs still RUNNING whose `tag` is `value`: runs a dead driver left
        open (the caller holds the lock that proves no live driver owns them). Returns how many."""
        from mlflow.entities import ViewType
        with self._lock:
            runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           run_view_type=ViewType.ACTIVE_ONLY, max_results=self.page_size)
        stale = [r for r in runs if r.data.tags.get(tag) == value]
        for run in stale:
            self.finish(run.info.run_id, "KILLED", tags={"status": "abandoned: its driver died"})
        return len(stale)

    def finished_cells(self, tag_prefix: str = "cell.") -> dict[tuple, dict]:
        """FINISHED runs of this experiment that carry cell tags, keyed by the cell tuple
        (tag values in CELL_FIELDS order, None when a tag is missing; see `cell_key`).
        Value: {"run_id", "metrics" (latest value per key), "tags", "params"}. When a cell finished
        more than once, the most recent run wins."""
        from mlflow.entities import ViewType
        out: dict[tuple, dict] = {}
        token = None
        while True:
            with self._lock:
                page = self.client.search_runs(
                    [self.experiment_id], filter_string="attributes.status = 'FINISHED'",
                    run_view_type=ViewType.ACTIVE_ONLY, max_results=self.page_size,
                    order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                tags = run.data.tags
                if not any(k.startswith(tag_prefix) for k in tags):
                    continue
                key = cell_key({f: tags.get(f"{tag_prefix}{f}") for f in (*CELL_FIELDS, *OPTIONAL_CELL_FIELDS)})
                if key not in out:  # newest first
                    out[key] = {"run_id": run.info.run_id, "metrics": dict(run.data.metrics),
                                "tags": dict(tags), "params": dict(run.data.params)}
            token = page.token
            if not token:
                return out

    # -- browsing

    def ui_command(self) -> str:
        """The command that shows this store in MLflow's UI."""
        if self.is_remote:
            return f"open {self.uri.rstrip('/')}/{self.ui_path()}"
        return f"mlflow ui --backend-store-uri {shlex.quote(self.uri)} --host 127.0.0.1"

    def ui_path(self) -> str:
        """The UI route of this experiment's runs table. MLflow 3's UI opens experiments on
        its GenAI trace overview unless told `workflowType=machine_learning`."""
        return f"#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
