"""Optuna storage shared by many workers: open it safely, keep trials alive, retry dead ones.

Several workers (processes, machines) may share one storage. Opening a fresh database is racy
(concurrent table creation fails for all but one opener), so a SQLite study is opened under a
file lock beside the database and any RDB with retries. A trial left RUNNING by a killed worker
is failed (at once on the same host, after the heartbeat grace period elsewhere) and retried by
Optuna's retry callback with the same parameters; trials count toward the budget only when
COMPLETE or PRUNED.

Storages (`--storage`): any SQLAlchemy URL (SQLite: one machine; PostgreSQL: many machines and a
server), or an Optuna journal file on a shared file system (`journal:///abs/path/study.journal`
or a path ending in `.journal`: many machines, no server). docs/cluster.md says which to choose.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
# Optuna renamed RetryFailedTrialCallback (deprecated since 4.9, removed in 6.0); same behaviour.
from optuna.storages import RetryHeartbeatStaleTrialCallback as RetryStaleTrial
from optuna.trial import TrialState

from harness.errors import ConfigError

# Heartbeats and the retry callback are marked experimental; they are what makes runs resumable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_SECONDS = 30  # a worker's trial is declared stale after GRACE without a heartbeat
GRACE_SECONDS = 120  # both can be changed with $HARNESS_HEARTBEAT_S and $HARNESS_GRACE_S
STORAGE_TRIES = 6  # opening a fresh RDB from many workers at once: retry the losers
MAX_RETRIES = 3  # a trial killed this often is given up (it probably crashes the process)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
JOURNAL_SCHEME = "journal://"
HEARTBEAT_ATTR = "harness:heartbeat"  # journal storage: the beat counter of a RUNNING trial
_JITTER = random.Random()  # retry delays; leaves the global RNG (seeded training) alone


def default_storage(output: Path) -> str:
    return f"sqlite:///{(output / 'study.db').resolve()}"


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return max(1, int(value)) if value else default
    except ValueError:
        raise ConfigError(f"${name}={value!r}: expected a whole number of seconds") from None


def heartbeat_seconds() -> int:
    return _env_seconds("HARNESS_HEARTBEAT_S", HEARTBEAT_SECONDS)


def grace_seconds() -> int:
    return _env_seconds("HARNESS_GRACE_S", GRACE_SECONDS)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases and in-memory SQLite)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 (reported by open_storage with the URL)
        return None
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True):
    """Hold an exclusive flock on `path` (created if missing). Used beside a SQLite database and
    on a run folder's `.lock` and `.final.lock`: one machine, one lock file. flock is per open
    file: never nest two holds of the same path in one process. With wait=False a lock held
    elsewhere raises BlockingIOError at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def creation_lock(url: str):
    """Hold an exclusive file lock beside a SQLite database (no-op for other databases).

    Optuna's RDBStorage creates its tables and stamps the schema version when it opens a fresh
    database; several workers doing that at the same moment fail ("table studies already
    exists", "UNIQUE constraint failed: alembic_version").
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".lock")):
        yield


def journal_path(url: str) -> Path | None:
    """The file of a journal storage (`journal:///abs/path` or a path ending in `.journal`),
    made absolute; None for database URLs."""
    if url.startswith(JOURNAL_SCHEME):
        rest = url[len(JOURNAL_SCHEME):]
        if not rest:
            raise ConfigError(f"--storage {url!r}: give the journal file, e.g. "
                              f"journal:///shared/runs/study.journal")
        return Path(rest).expanduser().resolve()
    if "://" not in url and url.endswith(".journal"):
        return Path(url).expanduser().resolve()
    return None


def normalize_storage(url: str) -> str:
    """The URL every worker can open from any folder: a journal file as journal:///abs/path."""
    path = journal_path(url)
    return f"{JOURNAL_SCHEME}{path}" if path is not None else url


def retrying(what, url: str):
    """Run what() and retry it on database errors: on a fresh PostgreSQL/MySQL database the
    workers race to create the tables and all but one fail; the next try finds them made."""
    for attempt in range(STORAGE_TRIES):
        try:
            return what()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.DuplicatedStudyError) as e:
            if attempt == STORAGE_TRIES - 1:
                raise storage_error(url, e) from None
            time.sleep(0.2 * 2 ** attempt * (1 + _JITTER.random()))
        except ConfigError:
            raise
        except Exception as e:  # missing driver, malformed URL: retrying would not help
            raise storage_error(url, e) from None


def storage_error(url: str, e: BaseException) -> ConfigError:
    """The error for a storage that cannot be opened, without the URL's password (SQLAlchemy
    quotes a URL it cannot parse in full)."""
    message = str(e)
    password = _password(url)
    if password:
        message = message.replace(password, "***")
    return ConfigError(f"--storage {redact_url(url)!r}: cannot open the Optuna storage: "
                       f"{redact_url(message)}")


def open_storage(url: str) -> BaseStorage:
    with creation_lock(url):
        return open_storage_unlocked(url)


def open_storage_unlocked(url: str) -> BaseStorage:
    """The single place that builds the storage object: a journal file or an RDB."""
    path = journal_path(url)
    if path is not None:
        return open_journal(path)

    def make() -> RDBStorage:
        return RDBStorage(url, heartbeat_interval=heartbeat_seconds(),
                          grace_period=grace_seconds(),
                          heartbeat_stale_trial_callback=retry_callback(),
                          engine_kwargs=_engine_kwargs(url))

    return retrying(make, url)


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # Several workers on one SQLite file: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with the heartbeat interface that Optuna gives RDBStorage only.

    Without it a trial of a worker killed on another host would stay RUNNING for ever on a
    journal file (`fail_stale_trials` skips storages without heartbeats). The owner of a RUNNING
    trial bumps a counter in the trial's system attribute HEARTBEAT_ATTR every heartbeat
    interval; a reader declares the trial stale when it has seen the counter unchanged for the
    grace period by its own monotonic clock, so the hosts' clocks need not agree. A fresh reader
    therefore waits one grace period before it can declare anything stale.
    """

    def __init__(self, backend: JournalFileBackend, heartbeat_interval: int, grace_period: int,
                 stale_trial_callback) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_trial_callback = stale_trial_callback
        self._beats: dict[int, int] = {}  # trial id -> beats sent by this process
        self._seen: dict[int, tuple[Any, float]] = {}  # trial id -> (beat, first seen at)
        self._seen_lock = threading.Lock()
        self._clock = time.monotonic  # tests replace it

    def record_heartbeat(self, trial_id: int) -> None:
        beat = self._beats.get(trial_id, 0) + 1
        self._beats[trial_id] = beat
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, beat)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # declared stale and failed by another worker meanwhile: nothing to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = self._clock()
        stale = []
        with self._seen_lock:
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                beat = t.system_attrs.get(HEARTBEAT_ATTR)
                seen = self._seen.get(t._trial_id)
                if seen is None or seen[0] != beat:
                    self._seen[t._trial_id] = (beat, now)
                elif now - seen[1] > self._grace_period:
                    stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_trial_callback


def retry_callback() -> RetryStaleTrial:
    """What happens to a dead worker's trial, whoever finds it (heartbeat, this host, Ctrl-C):
    it is queued again with the same parameters and its intermediate values, at most
    MAX_RETRIES times."""
    return RetryStaleTrial(max_retry=MAX_RETRIES, inherit_intermediate_values=True)


def open_journal(path: Path) -> HeartbeatJournalStorage:
    """A journal file on a (shared) file system. Its default lock (a symlink beside the file)
    works on NFS, where SQLite's fcntl locks do not."""
    if not path.parent.is_dir():
        raise ConfigError(f"--storage journal:///{str(path).lstrip('/')}: the folder "
                          f"{path.parent} does not exist (create it on the shared file system)")
    try:
        backend = JournalFileBackend(str(path))
    except OSError as e:
        raise ConfigError(f"--storage {path}: cannot open the journal file: {e}") from None
    return HeartbeatJournalStorage(backend, heartbeat_seconds(), grace_seconds(),
                                   retry_callback())



def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker ran on this host and is no longer alive.

    The heartbeat finds stale trials from any machine, but only after the grace period; a user
    who kills a run and restarts it at once should not wait for that. Returns the trial numbers
    failed (each is then retried by the storage's retry callback).
    """
    failed = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _pid_alive(t.user_attrs.get("pid", -1)):
            continue
        try:  # another worker on this host may fail it first: only one of them retries it
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        retry_callback()(study, study._storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# scheme://user:password@ anywhere in a text (an error message quoting a malformed URL).
_USERINFO = re.compile(r"(\w[\w+.-]*://[^:/@\s]*):([^@\s]*)@")


def _password(url: str) -> str | None:
    try:
        return sqlalchemy.engine.make_url(url).password
    except Exception:  # noqa: BLE001 (not a SQLAlchemy URL)
        match = _USERINFO.search(url)
        return match.group(2) if match else None


def redact_url(url: str) -> str:
    """The storage URL with any password replaced by ***, for logs, errors and provenance files
    (run folders may sit on shared disks). Also redacts `scheme://user:pw@` inside any text
    (SQLAlchemy cannot parse a malformed URL, and error messages quote it)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 (not a SQLAlchemy URL: a path, a journal file, a message)
        return _USERINFO.sub(r"\1:***@", url)
    if parsed.password is None:
        return _USERINFO.sub(r"\1:***@", url)
    return parsed.render_as_string(hide_password=True)
