"""Bookkeeping of a run folder, shared by `harness.run`, `harness.workers` and the stages.

A run folder is reused: re-running a command resumes it, and several processes may share it.
Everything reused must still belong to what the user asked for, so:
  * `check_same_study` refuses a folder that holds another configuration;
  * every fold folder (search trial or final reproduction) records the fingerprint of the
    configuration and seed it trains (`owner.json`); a checkpoint left by another
    configuration is never resumed (`claim_fold_dir`) nor tested (`fold_dir_owned_by`);
  * the study database must be there and valid when the folder already holds a run
    (`check_study_database`): an emptied database would silently start the search again;
  * the data and the trunk weights must be the ones the folder ran on (`check_same_data`,
    `check_same_trunk`): config.json names data.root and model.weights, not what they hold;
  * files are written atomically, under a name unique to the writing process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from harness.config import StudyConfig
from harness.errors import ConfigError

# Keys that may change between invocations of one output folder: they change neither the
# search nor what a fold trains (growing the budget resumes; the data may move; the device and
# loader settings only change speed).
# final.recheck_* are like search.trials: they may change which trial the final step tests
# (which then moves the old final results aside), never what a trial or a fold trains.
RESUMABLE_KEYS = {"search.trials", "final.reproductions", "final.recheck_top",
                  "final.recheck_runs", "train.device", "data.root", "data.num_workers",
                  "data.cache", "data.cache_dir", "train.eval_batch_size"}
SQLITE_HEADER = b"SQLite format 3\x00"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file unique to this process, then rename: a reader never sees a
    torn file, and two processes never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON through write_bytes_atomic."""
    write_bytes_atomic(path, json.dumps(obj, indent=2, default=str).encode())


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing, unreadable or not valid JSON (files in a
    run folder are untrusted: the caller treats None as "not done")."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None


def check_output_dir(output: Path) -> None:
    """Fail now, with a clear message, when the run folder cannot be used."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: exists and is not a folder; give a folder path")
    probe = output
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: {probe} is not writable; choose a folder you "
                          f"can write to")


MISSING = object()  # a key one of two configs does not have


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.001, 'loss.params.margin': 0.1, ...}: a nested config (config.json) as
    dotted keys, so that a difference is named down to the setting. An empty dict adds no key:
    `loss.params = {}` and a `loss.params` with one entry differ in that entry only."""
    items = {}
    for key, value in config.items():
        if isinstance(value, dict):
            items.update(flat_config(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def config_differences(a: dict, b: dict, skip: set[str] = frozenset()
                       ) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every dotted key of two flat configs whose values
    differ, MISSING where one lacks the key: a setting added or removed since one was written
    is a difference (None must not pass for a value that was never chosen). Resuming a folder
    (check_same_study) and comparing studies (benchmarks/embedded_comparison.py) both use it."""
    return [(k, a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(set(a) | set(b))
            if k not in skip and ((k in a) != (k in b) or a.get(k) != b.get(k))]


def is_setting(key: str) -> bool:
    """A field of the config's schema ('seed', 'train.tf32'), not an entry of a dict-valued
    field ('loss.params.margin'): only a field can be missing because a harness version lacked
    it."""
    return key.count(".") <= 1


def describe(key: str, value: Any, absent: str) -> str:
    """A value of config_differences as shown to a user: MISSING is `absent` for a schema field
    (a harness version lacked it) and "not set" inside a dict-valued field (a loss parameter)."""
    if value is not MISSING:
        return repr(value)
    return absent if is_setting(key) else "not set"


def check_same_study(output: Path, cfg: StudyConfig) -> None:
    """Refuse to mix two different configurations in one folder (results would be wrong)."""
    path = output / "config.json"
    if not path.exists():
        return
    old = read_json(path)
    if not isinstance(old, dict):
        raise ConfigError(f"{path} is not valid JSON: this run folder is damaged; move it "
                          f"away or choose another --output")
    found = config_differences(flat_config(old), flat_config(cfg.to_dict()), RESUMABLE_KEYS)
    diffs = [f"{key}: {describe(key, was, 'absent (written by an older harness)')} -> "
             f"{describe(key, now, 'absent (not a setting of this harness)')}"
             for key, was, now in found]
    if diffs:
        older = any(MISSING in (was, now) and is_setting(key) for key, was, now in found)
        how = ("Finish it with the harness version that wrote it (its provenance.json names "
               "the commit)" if older else "Resume it with the same settings")
        raise ConfigError(f"{output} holds a run of a different configuration "
                          f"({'; '.join(diffs)}). {how}, or choose another --output.")


def check_study_database(storage_path: Path | None, output: Path) -> None:
    """A SQLite study file that is empty or not SQLite, or missing while the folder already
    holds search trials, would silently start a new search over the old trial folders."""
    if storage_path is None:
        return
    if storage_path.exists():
        with open(storage_path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            what = "empty (0 bytes)" if not header else "not a SQLite database"
            raise ConfigError(f"{storage_path} is {what}: the study's trials are lost or the "
                              f"file is damaged. Restore it, or move the run folder away to "
                              f"start a new search")
    elif any((output / "trials").glob("trial_*")):
        raise ConfigError(f"{output} holds search trials (trials/) but no study database "
                          f"{storage_path.name}: restore it, or move the run folder away to "
                          f"start a new search")


def read_invocations(output: Path) -> list:
    """provenance.json's records of the folder's invocations ([] for a new folder), or a
    ConfigError for a file that is damaged or foreign."""
    path = output / "provenance.json"
    if not path.exists():
        return []
    runs = read_json(path)
    if not isinstance(runs, list):
        raise ConfigError(f"{path}: not the harness's record of this folder's invocations (a "
                          f"JSON list); it is damaged or foreign. Move it aside to go on if the "
                          f"trunk weights are unchanged (nothing else depends on it), or choose "
                          f"another --output.")
    return runs


def check_same_trunk(output: Path, trunk_weights: dict | None) -> None:
    """Refuse to resume a folder whose earlier invocations started from other trunk weights
    (provenance.json's trunk_weights): config.json names the weight file, not what is in it,
    and a replaced file (or a glyph trunk rebuilt under another key) would mix two starting
    points in one search. Compared by tensors where both records have them, else by file
    hash (`harness.provenance.same_trunk`)."""
    from harness.provenance import same_trunk

    runs = read_invocations(output)  # read with or without a trunk: nothing is written yet
    if trunk_weights is None:
        return  # no pretrained trunk, or none found (preflight says so)
    earlier = [run["trunk_weights"] for run in runs
               if isinstance(run, dict) and isinstance(run.get("trunk_weights"), dict)]
    other = next((e for e in earlier
                  if not same_trunk(_with_tensors(e, trunk_weights), trunk_weights)), None)
    if other is not None:
        raise ConfigError(
            f"{output} was run from other trunk weights: {_weights(other)} then, "
            f"{_weights(trunk_weights)} now. Resuming would mix two starting points in one "
            f"study. Restore the weights it ran with (model.weights; for the glyph trunk, the "
            f"cache under $HARNESS_CACHE), or choose another --output.")


def _with_tensors(record: dict, now: dict) -> dict:
    """A record from before tensor hashes were kept, completed with the tensors' hash of the
    file it names when that file is still there with the recorded bytes (so a rebuilt file
    holding the same weights resumes); else the record as it is. Read with weights_only, like
    every weight file: no code in it runs."""
    from harness.errors import HarnessError
    from harness.provenance import file_sha256, tensors_sha256

    if record.get("tensors_sha256") or not now.get("tensors_sha256") or \
            record.get("sha256") == now.get("sha256") or not isinstance(record.get("file"), str):
        return record
    try:
        path = Path(record["file"])
        if path.is_file() and file_sha256(path) == record.get("sha256"):
            return {**record, "tensors_sha256": tensors_sha256(path)}
    except (HarnessError, OSError):
        pass
    return record


def _weights(record: dict) -> str:
    tensors = str(record.get("tensors_sha256") or "")[:12]
    return (f"{record.get('file')} (file sha256 {str(record.get('sha256'))[:12]}..."
            + (f", tensors {tensors}..." if tensors else "") + ")")


def check_same_data(output: Path, manifest: dict, records) -> None:
    """Refuse to resume a folder whose split_manifest.json records other data or another split
    (images added or removed, another version of the data set, other pixels) than `manifest`,
    the split of `records` now: data.root may change between invocations (the data moved),
    what it holds may not."""
    from harness.splits import manifest_differences

    where = f"{records.name} at {records.root}"
    path = output / "split_manifest.json"
    if not path.exists():
        return
    recorded = read_json(path)
    if recorded is None:
        raise ConfigError(f"{path} is unreadable, so this run cannot check that it resumes on "
                          f"the data its earlier trials used. If {where} holds that data, "
                          f"delete the file to go on; else choose another --output.")
    found = manifest_differences(recorded, manifest)
    if found:
        raise ConfigError(
            f"{output} was run on other data than {where} holds now ({'; '.join(found)}): its "
            f"earlier trials trained and validated on other folds. Point data.root at the data "
            f"it was run on, or choose another --output.")


# --------------------------------------------------------------------------------------------
# Fold folders
# --------------------------------------------------------------------------------------------
def fingerprint(cfg: StudyConfig, seed: int) -> str:
    """What a fold trains: the configuration (less the keys that do not change training) and its
    seed. Two fold runs with the same fingerprint train the same model."""
    d = cfg.to_dict()
    for dotted in RESUMABLE_KEYS:
        section, key = dotted.split(".")
        d.get(section, {}).pop(key, None)
    d.pop("description", None)
    d["search"].pop("fixed", None)  # how a value was chosen does not change what trains
    text = json.dumps({"config": d, "seed": int(seed)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


OWNER_FILE = "owner.json"
FOLD_FILES = ("last.pt", "best.pt", "history.json", "result.json", "test_embeddings.npz")


def fold_dir_owned_by(fold_dir: Path, print_: str) -> bool:
    owner = read_json(fold_dir / OWNER_FILE)
    return isinstance(owner, dict) and owner.get("fingerprint") == print_


def claim_fold_dir(fold_dir: Path, print_: str, label: str) -> None:
    """Make `fold_dir` the home of the fold run `print_`. Work left there by another
    configuration (another study's trial folder, a database that was replaced) is removed, not
    resumed: resuming it would mix two configurations silently."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    if not fold_dir_owned_by(fold_dir, print_):
        stale = [name for name in FOLD_FILES if (fold_dir / name).exists()]
        if stale:
            print(f"[{label}] {fold_dir}: {', '.join(stale)} belong to another configuration or "
                  f"seed: discarded, this fold trains from scratch", flush=True)
            for name in stale:
                (fold_dir / name).unlink()
        write_json_atomic(fold_dir / OWNER_FILE, {"fingerprint": print_})


def move_aside(path: Path, parent: Path, stem: str) -> Path:
    """Move `path` to parent/stem (or stem_2, stem_3, ...): kept, never deleted."""
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / stem
    k = 2
    while target.exists():
        target = parent / f"{stem}_{k}"
        k += 1
    shutil.move(str(path), str(target))
    return target
