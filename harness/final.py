"""Final step: test the best configuration's models on the test classes (MLRC).

MLRC tests the best trial's own fold models, then retrains the best configuration from scratch
`reproductions` times (10) and reports mean and 95% interval over all of them, best trial
included (powerful-benchmarker v0.9.33 runners/bayes_opt_runner.py: `test_model(best)`,
`reproduce_results`, `create_accuracy_report`, which globs the best trial and its
reproductions). Here reproduction 0 is the best trial (its fold checkpoints from the search;
`final.include_best_trial`), reproductions 1..N are retrainings with new seeds. For each
reproduction:
  * "separated": each 128-d fold model is tested alone (the table reports the mean of the 4);
  * "concatenated": the 4 fold models' L2-normalised embeddings are joined (512-d) and
    re-normalised, then tested once per reproduction.

The untrained model (the trunk as the study starts it, a random embedder) is tested once too
(`untrained_baseline`): the floor that training must clearly beat.

Resumable and safe: each result is its own JSON file, written atomically and tagged with the
fingerprint of what it tests (a torn or foreign file is redone, never averaged);
`test_metrics.csv` is regenerated from them. A reproduction whose fold and concatenated results
are all stored and its own is left as it is, so a folder without its test embeddings (they are
not committed) resumes without retraining. Results belong to the trial they name
(`final/best_trial.json`): when a larger budget finds another best trial, the old `final/` is
moved to `superseded/` and the new best is tested. One process at a time runs the final stage
of a folder (a lock; a second one is refused with a clear message).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.aggregate import METRICS
from harness.config import StudyConfig
from harness.data import PreparedData, batch_transform, eval_loader, query_gallery_indices
from harness.metrics import compute_embeddings, retrieval_metrics
from harness.progress import bar
from harness.errors import ConfigError, HarnessError
from harness.run_folder import (claim_fold_dir, fingerprint, fold_dir_owned_by, move_aside,
                                read_json, write_json_atomic)
from harness.storage import file_lock
from harness.seeds import reproduction_fold_seed, trial_fold_seed
from harness.train import load_best_model, train_fold, use_float32_precision


def embed_test_set(cfg: StudyConfig, model, data: PreparedData, device) -> dict[str, np.ndarray]:
    use_float32_precision(cfg)
    query_idx, gallery_idx = query_gallery_indices(data.records, data.split)
    out = {}
    for name, idx in (("query", query_idx), ("gallery", gallery_idx)):
        if idx is None:
            continue
        emb, labels = compute_embeddings(model, eval_loader(cfg, data, idx, device), device,
                                         amp=cfg.train.amp and device.type == "cuda",
                                         desc=f"embed test {name}",
                                         batch_transform=batch_transform(cfg, device, False))
        out[f"{name}_emb"], out[f"{name}_labels"] = emb.numpy(), labels.numpy()
    return out


def test_metrics(embeddings: dict[str, np.ndarray], device) -> dict[str, float]:
    q, ql = torch.from_numpy(embeddings["query_emb"]), torch.from_numpy(embeddings["query_labels"])
    if "gallery_emb" in embeddings:  # In-Shop: query/gallery retrieval
        return retrieval_metrics(q, ql, torch.from_numpy(embeddings["gallery_emb"]),
                                 torch.from_numpy(embeddings["gallery_labels"]), device=device)
    return retrieval_metrics(q, ql, device=device)  # MLRC: self-retrieval over the test classes


def untrained_baseline(cfg: StudyConfig, data: PreparedData, output: Path, device) -> dict:
    """Test metrics of the model before any training (pretrained trunk when the study uses one,
    random embedder): the floor that training must clearly beat. Computed once per run folder
    (final/untrained_metrics.json)."""
    from harness.models import build_model
    from harness.seeds import UNTRAINED_STAGE, hash_seed
    from harness.train import seed_everything

    path = output / "final" / "untrained_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    seed_everything(hash_seed(cfg.seed, UNTRAINED_STAGE))
    model = build_model(cfg.model).to(device)
    metrics = test_metrics(embed_test_set(cfg, model, data, device), device)
    write_json_atomic(path, metrics)
    return metrics


def concatenate(fold_embeddings: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join the fold models' L2-normalised embeddings; retrieval re-normalises the result."""
    out = {}
    for part in ("query", "gallery"):
        if f"{part}_emb" not in fold_embeddings[0]:
            continue
        normed = [e[f"{part}_emb"] / np.maximum(
            np.linalg.norm(e[f"{part}_emb"], axis=1, keepdims=True), 1e-12)
            for e in fold_embeddings]
        out[f"{part}_emb"] = np.concatenate(normed, axis=1).astype(np.float32)
        labels = fold_embeddings[0][f"{part}_labels"]
        for e in fold_embeddings[1:]:
            assert np.array_equal(e[f"{part}_labels"], labels), "test sets differ between folds"
        out[f"{part}_labels"] = labels
    return out


SOURCES = ("best_trial", "best_trial_retrained", "retrained")


def reproduction_plan(cfg: StudyConfig, reproductions: int) -> list[tuple[int, str]]:
    """(reproduction index, source): 0 is the best trial's own models when included."""
    plan = [(0, "best_trial")] if cfg.final.include_best_trial else []
    first = 1 if cfg.final.include_best_trial else 0
    return plan + [(first + r, "retrained") for r in range(reproductions)]


def retrain_and_test(cfg: StudyConfig, data: PreparedData, output: Path, device,
                     best: dict, reproductions: int) -> pd.DataFrame:
    """Test the best trial's models and `reproductions` retrainings of `cfg` (which already holds
    the best params). `best`: {"trial", "seed_number", "params", "value"} of the best trial.
    The caller holds `final_stage_lock(output)`."""
    final_dir = output / "final"
    _supersede_other_trial(final_dir, output, best)
    final_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(final_dir / "best_trial.json", best)
    write_json_atomic(final_dir / "best_params.json", best["params"])
    folds = data.split.folds[: cfg.search.folds]
    plan = reproduction_plan(cfg, reproductions)
    jobs = bar(total=len(plan) * len(folds), desc="final", unit="fold", leave=True)
    for rep, source in plan:
        rep_dir = final_dir / f"rep_{rep:02d}"
        if _reproduction_done(cfg, output, best, rep, source, rep_dir, folds):
            jobs.update(len(folds))
            continue
        fold_embeddings, fold_prints, fold_sources = [], [], set()
        for fold in folds:
            fold_dir = rep_dir / f"fold_{fold.index}"
            seed, trial_dir = _fold_seed_and_dir(cfg, output, best, rep, source, fold)
            print_ = fingerprint(cfg, seed)
            if _fold_result(fold_dir, print_) is None:
                _test_fold(cfg, data, fold, device, rep, source, seed, trial_dir, fold_dir,
                           print_)
                _write_csv(final_dir)
            fold_embeddings.append(dict(np.load(fold_dir / "test_embeddings.npz")))
            fold_prints.append(print_)
            fold_sources.add(read_json(fold_dir / "result.json")["source"])
            jobs.update(1)
        metrics = test_metrics(concatenate(fold_embeddings), device)
        write_json_atomic(rep_dir / "concatenated.json", {
            "reproduction": rep, "mode": "concatenated", "fold": -1,
            "source": "+".join(sorted(fold_sources)),
            "val_map_at_r": float("nan"), "best_epoch": -1, "stop": "",
            **_metric_row(metrics), "fingerprint": "+".join(fold_prints)})
        _write_csv(final_dir)
    jobs.close()
    return _write_csv(final_dir)


def _reproduction_done(cfg, output: Path, best: dict, rep: int, source: str, rep_dir: Path,
                       folds) -> bool:
    """Every fold result and the concatenated result of a reproduction are stored and belong to
    it (fingerprints): nothing to redo. The fold embeddings are not needed then, so a run
    folder copied without them (they are not committed: .gitignore) resumes without
    retraining."""
    prints = [fingerprint(cfg, _fold_seed_and_dir(cfg, output, best, rep, source, fold)[0])
              for fold in folds]
    fold_rows = [read_json(rep_dir / f"fold_{fold.index}" / "result.json") for fold in folds]
    return (all(_valid_result(row, p) for row, p in zip(fold_rows, prints))
            and _valid_result(read_json(rep_dir / "concatenated.json"), "+".join(prints)))


@contextlib.contextmanager
def final_stage_lock(output: Path):
    """One process at a time runs the final stage of a run folder. Two would train the same
    folds twice and write two results for one fold; the second is refused, not queued."""
    path = output / ".final.lock"
    with contextlib.ExitStack() as stack:
        try:  # only the lock's own refusal is reported as another process
            stack.enter_context(file_lock(path, wait=False))
        except BlockingIOError:
            raise ConfigError(f"another process is running the final stage of {output} "
                              f"(lock {path.name}); wait for it to finish, then re-run to "
                              f"resume") from None
        yield


def _supersede_other_trial(final_dir: Path, output: Path, best: dict) -> None:
    """Final results always belong to the trial they name: results of another best trial (the
    budget grew, or the folder predates best_trial.json) are moved to superseded/, kept."""
    if not final_dir.exists():
        return
    before = read_json(final_dir / "best_trial.json")
    same = isinstance(before, dict) and before.get("trial") == best["trial"] and \
        before.get("params") == best["params"]
    if same:
        return
    label = f"trial_{before['trial']:04d}" if isinstance(before, dict) and \
        isinstance(before.get("trial"), int) else "unnamed"
    moved = move_aside(final_dir, output / "superseded", f"final_{label}")
    print(f"[final] the best trial is now {best['trial']} (was {label}): the earlier final "
          f"results were moved to {moved} and the new best trial is tested", flush=True)


def _fold_seed_and_dir(cfg, output: Path, best: dict, rep: int, source: str, fold):
    """The seed a fold model was (or is) trained with, and where the search left it."""
    if source == "best_trial":
        seed = trial_fold_seed(cfg.seed, best["seed_number"], fold.index)
        trial_dir = output / "trials" / f"trial_{best['seed_number']:04d}" / f"fold_{fold.index}"
        return seed, trial_dir
    return reproduction_fold_seed(cfg.seed, rep, fold.index), None


def _valid_result(row, print_: str) -> bool:
    """A stored result counts only if it belongs to this fold run and its numbers are finite."""
    if not isinstance(row, dict) or row.get("fingerprint") != print_ or "map_at_r" not in row:
        return False
    try:
        return all(math.isfinite(float(row[k])) for k in METRICS if k in row)
    except (TypeError, ValueError):
        return False


def _fold_result(fold_dir: Path, print_: str) -> dict | None:
    """The fold's stored result when it is complete, valid and belongs to this fold run."""
    row = read_json(fold_dir / "result.json")
    if not _valid_result(row, print_) or not (fold_dir / "test_embeddings.npz").is_file():
        return None
    return row


def _test_fold(cfg, data, fold, device, rep, source, seed, trial_dir, fold_dir, print_) -> None:
    checkpoint = None
    if source == "best_trial":
        checkpoint = trial_dir / "best.pt"
        if not (fold_dir_owned_by(trial_dir, print_) and checkpoint.is_file()
                and (trial_dir / "history.json").is_file()):
            # The best trial ran elsewhere (another machine's run folder) or its files are gone:
            # train it again with the trial's own seed, and say so in the results.
            print(f"[final] best trial fold {fold.index}: no checkpoint of it in {trial_dir}; "
                  f"retraining it with the trial's own seed", flush=True)
            source, checkpoint = "best_trial_retrained", None
    claim_fold_dir(fold_dir, print_, "final")
    if checkpoint is None:
        result = train_fold(cfg, data, fold, device, seed=seed, run_dir=fold_dir,
                            desc=f"rep {rep} fold {fold.index}")
        if not result.checkpoint:
            raise HarnessError(
                f"reproduction {rep} fold {fold.index} produced no checkpoint (stop reason: "
                f"{result.stop_reason}): its configuration diverged before the first "
                f"validation. Results so far are kept in {fold_dir.parent.parent}")
        checkpoint = Path(result.checkpoint)
        val, best_epoch, stop = result.best_map_at_r, result.best_epoch, result.stop_reason
    else:
        history = read_json(trial_dir / "history.json") or []
        best_row = max(history, key=lambda h: h.get("map_at_r", -1), default={})
        val = best_row.get("map_at_r", float("nan"))
        best_epoch = best_row.get("epoch", -1)
        stop = "search"
    model = load_best_model(cfg, checkpoint, device)
    embeddings = embed_test_set(cfg, model, data, device)
    tmp = fold_dir / f".test_embeddings.{os.getpid()}.npz"
    np.savez(tmp, **embeddings)
    os.replace(tmp, fold_dir / "test_embeddings.npz")
    if not cfg.final.keep_checkpoints and source != "best_trial":
        checkpoint.unlink(missing_ok=True)
    metrics = test_metrics(embeddings, device)
    write_json_atomic(fold_dir / "result.json", {
        "reproduction": rep, "mode": "separated", "fold": fold.index, "source": source,
        "val_map_at_r": val, "best_epoch": best_epoch, "stop": stop,
        **_metric_row(metrics), "fingerprint": print_})


def _write_csv(final_dir: Path) -> pd.DataFrame:
    """test_metrics.csv from the result files (atomic; one row per result by construction)."""
    rows = []
    for rep_dir in sorted(final_dir.glob("rep_*")):
        for path in sorted(rep_dir.glob("fold_*/result.json")) + [rep_dir / "concatenated.json"]:
            row = read_json(path)
            if isinstance(row, dict) and "fingerprint" in row:
                rows.append({k: v for k, v in row.items() if k != "fingerprint"})
    frame = pd.DataFrame(rows, columns=["reproduction", "mode", "fold", "source", "val_map_at_r",
                                        "best_epoch", "stop", *METRICS])
    tmp = final_dir / f".test_metrics.{os.getpid()}.csv"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, final_dir / "test_metrics.csv")
    return frame


def _metric_row(metrics: dict) -> dict:
    return {k: metrics[k] for k in METRICS if k in metrics}
