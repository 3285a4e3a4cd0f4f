"""Final step: retrain the best configuration from scratch and test it (MLRC).

For each reproduction r (MLRC: 10) and each fold k, the best trial's configuration is trained
from scratch on fold k (new seed), its best-validation checkpoint embeds the test set, and:
  * "separated": each 128-d fold model is tested alone (the table reports the mean of the 4);
  * "concatenated": the 4 fold models' L2-normalised embeddings are joined (512-d) and
    re-normalised, then tested once per reproduction.
Every (reproduction, fold) result is written as it finishes (test_metrics.csv, and the test
embeddings as .npy), so an interrupted run resumes at the first missing fold and nothing is lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.config import StudyConfig
from harness.data import PreparedData, batch_transform, eval_loader, query_gallery_indices
from harness.metrics import compute_embeddings, retrieval_metrics
from harness.progress import bar
from harness.seeds import reproduction_fold_seed
from harness.train import load_best_model, train_fold

METRIC_COLUMNS = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
                  "r_precision", "map_at_r")


def embed_test_set(cfg: StudyConfig, model, data: PreparedData, device) -> dict[str, np.ndarray]:
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


def _append_row(csv_path: Path, row: dict) -> None:
    frame = pd.DataFrame([row])
    frame.to_csv(csv_path, mode="a", header=not csv_path.exists(), index=False)


def _done_rows(csv_path: Path) -> pd.DataFrame:
    return pd.read_csv(csv_path) if csv_path.exists() else pd.DataFrame(
        columns=["reproduction", "mode", "fold"])


def retrain_and_test(cfg: StudyConfig, data: PreparedData, output: Path, device,
                     params: dict, reproductions: int) -> pd.DataFrame:
    """Train `reproductions` x folds models with `cfg` (already holding the best params)."""
    final_dir = output / "final"
    final_dir.mkdir(parents=True, exist_ok=True)
    (final_dir / "best_params.json").write_text(json.dumps(params, indent=2))
    csv_path = final_dir / "test_metrics.csv"
    done = _done_rows(csv_path)
    folds = data.split.folds[: cfg.search.folds]
    jobs = bar(total=reproductions * len(folds), desc="retrain", unit="fold", leave=True)
    for rep in range(reproductions):
        rep_dir = final_dir / f"rep_{rep:02d}"
        fold_embeddings = []
        for fold in folds:
            fold_dir = rep_dir / f"fold_{fold.index}"
            emb_path = fold_dir / "test_embeddings.npz"
            is_done = ((done["reproduction"] == rep) & (done["mode"] == "separated")
                       & (done["fold"] == fold.index)).any()
            if not (is_done and emb_path.exists()):
                row = _train_and_test_fold(cfg, data, fold, device, rep, fold_dir, emb_path)
                _append_row(csv_path, row)
            fold_embeddings.append(dict(np.load(emb_path)))
            jobs.update(1)
        concat_done = ((done["reproduction"] == rep) & (done["mode"] == "concatenated")).any()
        if not concat_done:
            metrics = test_metrics(concatenate(fold_embeddings), device)
            _append_row(csv_path, {"reproduction": rep, "mode": "concatenated", "fold": -1,
                                   "val_map_at_r": float("nan"), "best_epoch": -1,
                                   "stop": "", **_metric_row(metrics)})
    jobs.close()
    return pd.read_csv(csv_path)


def _train_and_test_fold(cfg, data, fold, device, rep, fold_dir, emb_path) -> dict:
    seed = reproduction_fold_seed(cfg.seed, rep, fold.index)
    result = train_fold(cfg, data, fold, device, seed=seed, run_dir=fold_dir,
                        desc=f"rep {rep} fold {fold.index}")
    (fold_dir / "history.json").write_text(json.dumps(result.history, indent=1))
    if not result.checkpoint:
        raise RuntimeError(f"reproduction {rep} fold {fold.index} produced no checkpoint "
                           f"(stop reason: {result.stop_reason}); its configuration diverged "
                           f"before the first validation")
    model = load_best_model(cfg, Path(result.checkpoint), device)
    embeddings = embed_test_set(cfg, model, data, device)
    np.savez(emb_path, **embeddings)
    if not cfg.final.keep_checkpoints:
        Path(result.checkpoint).unlink(missing_ok=True)
    metrics = test_metrics(embeddings, device)
    return {"reproduction": rep, "mode": "separated", "fold": fold.index,
            "val_map_at_r": result.best_map_at_r, "best_epoch": result.best_epoch,
            "stop": result.stop_reason, **_metric_row(metrics)}


def _metric_row(metrics: dict) -> dict:
    return {k: metrics[k] for k in METRIC_COLUMNS if k in metrics}


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and 95% Student-t half-width per mode over reproductions.

    "separated" is first averaged over the folds of each reproduction (MLRC: average the 4 fold
    models' scores), so both modes have one value per reproduction.
    """
    from scipy import stats

    per_rep = (frame.groupby(["mode", "reproduction"])[list(_present(frame))].mean()
               .reset_index())
    rows = []
    for mode, group in per_rep.groupby("mode"):
        for metric in _present(frame):
            values = group[metric].to_numpy(dtype=float)
            n = len(values)
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
            rows.append({"mode": mode, "metric": metric, "mean": float(values.mean()),
                         "std": std, "ci95": half, "n": n})
    return pd.DataFrame(rows)


def _present(frame: pd.DataFrame) -> list[str]:
    return [c for c in METRIC_COLUMNS if c in frame.columns]
