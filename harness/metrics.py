"""Retrieval metrics of the MLRC protocol, and embedding of a data set.

Definitions (PROTOCOL.md section 1), for each query q with label y:
  * R = number of reference items labelled y; in self-retrieval (no separate reference set) the
    query itself does not count, so R = (class size) - 1. Queries with R = 0 are left out of
    every average (`num_queries` says how many were counted).
  * The neighbours of q are the references ranked by similarity to q, most similar first. In
    self-retrieval q itself is removed from its own ranking by INDEX (not by distance), so an
    exact duplicate of q elsewhere in the set is still a neighbour.
  * precision_at_1: the first neighbour has label y (the DML papers call this Recall@1).
  * recall_at_K: at least one of the first K neighbours has label y (DML sense, not IR recall).
  * r_precision: r / R, r = number of label-y items among the first R neighbours.
  * map_at_r: (1/R) * sum_{i <= R} P(i) * rel(i), P(i) = precision of the first i neighbours,
    rel(i) = 1 when neighbour i has label y. The divisor is R, not the number of hits.

Similarity is the inner product of L2-normalised embeddings (cosine) when `normalize=True`, the
raw inner product otherwise. Ties (exactly equal similarities) are ordered by the backend's
top-k, which neither torch nor faiss specifies; with float embeddings of a real model exact
ties between items of different labels are rare, and the two backends also round the inner
products differently in the last bit. Compare results across backends or with pml with a
tolerance (~1e-5), as PROTOCOL.md says.

Why not pml's AccuracyCalculator: it gives the same values, but at SOP size (60,502 references,
11,317 classes) its label-count step builds a classes x references matrix and it holds all k
neighbours of all queries at once (7.2 GB peak RSS on a 2-core machine). Here queries are
processed in chunks: per chunk, similarities to all references (chunk_size x N floats, about
1 GB at chunk_size 4096 and N = 60,502), then a top-k with k = max(R) and max(ks), so only
that much plus O(N) label bookkeeping is ever held. Neither an N x N nor a classes x N matrix
is built.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness.progress import bar, progress_disabled

BACKENDS = ("auto", "torch", "faiss")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def retrieval_metrics(query: torch.Tensor, query_labels, reference: torch.Tensor | None = None,
                      reference_labels=None, ks: Sequence[int] = (1, 2, 4, 8),
                      backend: str = "auto", normalize: bool = True, chunk_size: int = 4096,
                      device: str | torch.device | None = None) -> dict[str, float]:
    """P@1, Recall@K, R-Precision and MAP@R of `query` against `reference`.

    Args:
        query: (Nq, D) embeddings (tensor or array).
        query_labels: Nq integer labels (tensor, array or list).
        reference, reference_labels: the gallery. None (both) = self-retrieval: the query set is
            also the reference set and every query is left out of its own ranking by index.
        ks: the K of recall_at_K.
        backend: "torch" (matmul + top-k on `device`), "faiss" (IndexFlatIP, on the GPU when
            faiss has GPU support and `device` is CUDA) or "auto": faiss when it is importable,
            except that a CUDA `device` with a CPU-only faiss uses torch on the GPU (faster).
        normalize: L2-normalise both sets first (similarity = cosine).
        chunk_size: queries per chunk; memory per chunk is about chunk_size x len(reference)
            float32 (torch backend).
        device: torch device for the torch backend; None = CUDA when available, else CPU.

    Returns:
        {"precision_at_1", "recall_at_K" for each K, "r_precision", "map_at_r": float,
         "num_queries": int (queries counted, i.e. with R > 0)}. With no countable query every
        metric is NaN and num_queries is 0.
    """
    self_retrieval = reference is None
    if self_retrieval and reference_labels is not None:
        raise ValueError("reference_labels given without reference embeddings")
    query = _as_embeddings(query, "query")
    query_labels = _as_labels(query_labels, len(query), "query_labels")
    if self_retrieval:
        reference, reference_labels = query, query_labels
    else:
        if reference_labels is None:
            raise ValueError("reference embeddings given without reference_labels")
        reference = _as_embeddings(reference, "reference")
        reference_labels = _as_labels(reference_labels, len(reference), "reference_labels")
        if reference.shape[1] != query.shape[1]:
            raise ValueError(f"query has {query.shape[1]} dimensions, reference "
                             f"{reference.shape[1]}")
    ks = _check_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = _resolve_device(device)
    backend = _resolve_backend(backend, device)

    # The torch backend works where the search runs: on a GPU, normalising, gathering and
    # scoring there (O(N x D) memory) is what keeps the total close to the bare matmul + top-k.
    work = device if backend == "torch" else torch.device("cpu")
    query = query.to(work)
    _check_finite(query, "query")
    reference = query if self_retrieval else reference.to(work)
    if not self_retrieval:
        _check_finite(reference, "reference")
    if normalize:
        query = F.normalize(query, dim=1)
        reference = query if self_retrieval else F.normalize(reference, dim=1)

    relevant = relevant_counts(query_labels, reference_labels, self_retrieval)
    counted = torch.nonzero(relevant > 0).flatten()
    if len(counted) == 0:
        return _empty_result(ks)
    available = len(reference) - int(self_retrieval)  # neighbours a query can have at most
    k = min(max(int(relevant[counted].max()), max(ks)), available)

    # Only counted queries are searched; self_positions = where each one sits in `reference`.
    self_positions = counted if self_retrieval else None
    search = _faiss_neighbours if backend == "faiss" else _torch_neighbours
    sums = _MetricSums(ks)
    labels_at: dict[torch.device, tuple[torch.Tensor, ...]] = {}
    for start, neighbours in search(query[counted.to(work)], reference, k, self_positions,
                                    chunk_size, device):
        at = neighbours.device
        if at not in labels_at:  # moved once, not per chunk
            labels_at[at] = (reference_labels.to(at), query_labels[counted].to(at),
                             relevant[counted].to(at))
        ref_labels, counted_labels, counted_relevant = labels_at[at]
        rows = slice(start, start + len(neighbours))
        hits = ref_labels[neighbours] == counted_labels[rows, None]
        sums.add(hits, counted_relevant[rows])
    return sums.result()


@torch.no_grad()
def compute_embeddings(model: torch.nn.Module, loader, device, amp: bool = False,
                       desc: str = "embed", batch_transform=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of `loader` with `model` in eval mode.

    `loader` yields (images, labels, ...) batches. Returns float32 CPU embeddings (N, D) and int64
    CPU labels (N), in loader order. `batch_transform`, when given, maps each batch on the device
    before the model (the harness's loaders yield uint8 images; see harness/transforms.py).
    `amp` = bfloat16 autocast (CUDA only; ignored on CPU, where the harness always runs
    float32). The model's train/eval mode is restored afterwards. The
    progress bar is hidden when stderr is not a terminal or HARNESS_NO_PROGRESS=1.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    use_amp = amp and device.type == "cuda"
    try:
        for batch in _with_progress(loader, desc):
            images, batch_labels = batch[0], batch[1]
            images = images.to(device, non_blocking=True)
            if batch_transform is not None:
                images = batch_transform(images)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(images)
            embeddings.append(out.float().cpu())
            labels.append(torch.as_tensor(batch_labels).long().cpu().reshape(-1))
    finally:
        model.train(was_training)
    if not embeddings:
        raise ValueError(f"{desc}: the loader yielded no batch")
    return torch.cat(embeddings), torch.cat(labels)


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor,
                    self_retrieval: bool) -> torch.Tensor:
    """R per query: how many references share its label (minus itself in self-retrieval).

    Sorted unique labels + searchsorted: O(N log N) time and O(N) memory, where the obvious
    `query_labels[:, None] == unique_labels` would build a queries x classes matrix.
    """
    query_labels, reference_labels = query_labels.cpu(), reference_labels.cpu()
    unique, counts = torch.unique(reference_labels, return_counts=True)
    position = torch.searchsorted(unique, query_labels).clamp(max=len(unique) - 1)
    found = unique[position] == query_labels
    relevant = torch.where(found, counts[position], torch.zeros_like(position))
    return relevant - int(self_retrieval)


# --------------------------------------------------------------------------------------------
# Metric accumulation
# --------------------------------------------------------------------------------------------


class _MetricSums:
    """Running float64 sums of the per-query metrics over chunks, kept where the hits are (no
    host synchronisation per chunk) and read once at the end."""

    def __init__(self, ks: Sequence[int]):
        self.ks = ks
        self.count = 0
        self.sums: dict[str, torch.Tensor | float] = {name: 0.0 for name in _metric_names(ks)}

    def add(self, hits: torch.Tensor, relevant: torch.Tensor) -> None:
        """hits: (n, k) bool, neighbour j of query i has its label; relevant: (n,) R > 0."""
        k = hits.shape[1]
        rank = torch.arange(1, k + 1, device=hits.device)
        hits_in_r = hits & (rank[None, :] <= relevant[:, None])  # only the first R neighbours
        r = relevant.double()
        correct_so_far = torch.cumsum(hits_in_r, dim=1).double()
        precision_at_hits = correct_so_far / rank.double()[None, :] * hits_in_r
        self.sums["precision_at_1"] += hits[:, 0].double().sum()
        for k_recall in self.ks:
            found = hits[:, :k_recall].any(dim=1)
            self.sums[f"recall_at_{k_recall}"] += found.double().sum()
        self.sums["r_precision"] += (hits_in_r.sum(dim=1).double() / r).sum()
        self.sums["map_at_r"] += (precision_at_hits.sum(dim=1) / r).sum()
        self.count += len(hits)

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {name: float(total) / self.count
                                 for name, total in self.sums.items()}
        out["num_queries"] = self.count
        return out


def _metric_names(ks: Sequence[int]) -> list[str]:
    return ["precision_at_1", *(f"recall_at_{k}" for k in ks), "r_precision", "map_at_r"]


def _empty_result(ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {name: math.nan for name in _metric_names(ks)}
    out["num_queries"] = 0
    return out


# --------------------------------------------------------------------------------------------
# Nearest-neighbour search backends. Each yields (offset of the chunk's first query, (n, k)
# int64 neighbour indices into `reference`, most similar first, the query itself excluded).
# --------------------------------------------------------------------------------------------


def _torch_neighbours(query: torch.Tensor, reference: torch.Tensor, k: int,
                      self_positions: torch.Tensor | None, chunk_size: int,
                      device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    reference = reference.to(device)
    if self_positions is not None:
        self_positions = self_positions.to(device)
    # One similarity block, reused by every chunk: a fresh ~1 GB allocation per chunk costs a
    # third of the matmul time in page faults on CPU, and two blocks would coexist briefly.
    block = torch.empty(min(chunk_size, len(query)), len(reference), device=device)
    for start in range(0, len(query), chunk_size):
        chunk = query[start:start + chunk_size].to(device)
        similarity = torch.mm(chunk, reference.T, out=block[:len(chunk)])
        if self_positions is not None:  # exclude the query itself by index, not by distance
            rows = torch.arange(len(chunk), device=device)
            similarity[rows, self_positions[start:start + len(chunk)]] = -math.inf
        yield start, similarity.topk(k, dim=1, largest=True, sorted=True).indices


# faiss GPU indexes answer at most this many neighbours per query.
_FAISS_GPU_MAX_K = 2048


def _faiss_neighbours(query: torch.Tensor, reference: torch.Tensor, k: int,
                      self_positions: torch.Tensor | None, chunk_size: int,
                      device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    import faiss

    # In self-retrieval ask for one more: the query itself is usually among them and is dropped.
    k_search = k + int(self_positions is not None)
    index = faiss.IndexFlatIP(reference.shape[1])
    use_gpu = (device.type == "cuda" and _faiss_gpu_count() > 0 and k_search <= _FAISS_GPU_MAX_K)
    if use_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
    index.add(_as_faiss_array(reference))
    for start in range(0, len(query), chunk_size):
        chunk = _as_faiss_array(query[start:start + chunk_size])
        _, found = index.search(chunk, k_search)
        if self_positions is not None:
            found = _drop_self(found, self_positions[start:start + len(chunk)].numpy(), k)
        yield start, torch.from_numpy(np.ascontiguousarray(found)).long()


def _drop_self(found: np.ndarray, self_positions: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's own index from its k+1 neighbours; where it is absent (ties pushed it
    out), drop the last neighbour instead, so every row keeps k."""
    drop = found == self_positions[:, None]
    absent = ~drop.any(axis=1)
    drop[absent, -1] = True
    return found[~drop].reshape(len(found), k)


def _faiss_gpu_count() -> int:
    try:
        import faiss
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        return 0


def _as_faiss_array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _as_embeddings(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) array, got shape "
                         f"{tuple(x.shape)}")
    return x.float()  # finiteness is checked on the work device (fast on a GPU)


class NonFiniteEmbeddings(ValueError):
    """The model produced NaN/inf embeddings: its weights diverged (training treats this as a
    diverged fold, like a non-finite loss)."""


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteEmbeddings(f"{name} embeddings contain NaN or inf (a diverged model?)")


def _as_labels(labels, n: int, name: str) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels) if isinstance(labels, (list, tuple)) else labels)
    labels = labels.detach().reshape(-1)
    if labels.is_floating_point() or labels.is_complex():
        if not torch.equal(labels, labels.round()):
            raise ValueError(f"{name} must be integer class labels")
    labels = labels.long().cpu()
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries for {n} embeddings")
    return labels


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _faiss_importable() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "faiss" and not _faiss_importable():
        raise ValueError("backend 'faiss' requested but faiss is not installed "
                         "(pip install faiss-cpu, or use backend='torch')")
    if backend != "auto":
        return backend
    if not _faiss_importable():
        return "torch"
    if device.type == "cuda" and _faiss_gpu_count() == 0:
        return "torch"  # a GPU matmul beats a CPU faiss index
    return "faiss"


def _with_progress(loader, desc: str):
    """`loader` under a progress bar, or bare when stderr is not a terminal (logs, CI) or
    HARNESS_NO_PROGRESS=1. (The bar is skipped here rather than passed disable=..., so the
    shared `bar` helper only sees the arguments it always gets.)"""
    if progress_disabled() or not _stderr_is_tty():
        return loader
    return bar(loader, desc=desc, unit="batch")


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = ["retrieval_metrics", "compute_embeddings", "relevant_counts", "BACKENDS"]
