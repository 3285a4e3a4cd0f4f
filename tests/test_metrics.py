"""Retrieval metrics: hand-computed cases, a slow float64 reference, pml, both backends.

Hand cases use 2-D unit vectors given by angles, so the ranking of a query is simply "smallest
angle difference first" and every expected value is worked out in the comments.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from harness.metrics import _drop_self, compute_embeddings, relevant_counts, retrieval_metrics

BACKENDS = ["torch", "faiss"]
KS = (1, 2, 4, 8)


def at_angles(*degrees):
    """Unit vectors (cos t, sin t): cosine similarity falls with the angle difference."""
    t = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(t), torch.sin(t)], dim=1).float()


def assert_metrics(got, expected, tol=1e-9):
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=tol), name


# -------------------------------------------------------------------------------------------
# Hand-computed cases
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_self_retrieval_by_hand(backend):
    # a 0 (A), b 10 (A), c 25 (B), d 45 (A), e 70 (B), f 120 (C, alone in its class).
    # Rankings (angle differences), each query itself left out:
    #   a (R=2): b10 c25 d45 ...  hits 1 0 1 -> P@1 1, RP 1/2, MAP (1/2)(1/1) = 1/2
    #   b (R=2): a10 c15 d35 ...  hits 1 0 1 -> P@1 1, RP 1/2, MAP 1/2
    #   c (R=1): b15 d20 a25 e45  hits 0 0 0 1 -> 0, 0, 0; first hit at rank 4
    #   d (R=2): c20 e25 b35 a45  hits 0 0 1 1 -> 0, 0, 0; first hit at rank 3
    #   e (R=1): d25 c45 f50 ...  hits 0 1 -> 0, 0, 0; first hit at rank 2
    #   f: R = 0, not counted.
    emb = at_angles(0, 10, 25, 45, 70, 120)
    labels = [0, 0, 1, 0, 1, 2]
    got = retrieval_metrics(emb, labels, backend=backend, device="cpu")
    assert got["num_queries"] == 5
    assert_metrics(got, {"precision_at_1": 2 / 5, "recall_at_1": 2 / 5, "recall_at_2": 3 / 5,
                         "recall_at_4": 1.0, "recall_at_8": 1.0, "r_precision": 1 / 5,
                         "map_at_r": 1 / 5})


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_at_r_differs_from_r_precision(backend):
    # Query at 0 (label A); gallery 10 B, 20 A, 30 A, 40 B, 50 A: R = 3, hits 0 1 1 0 1.
    # RP = 2/3 (two hits in the first 3); MAP@R = (1/3)(P(2) + P(3)) = (1/3)(1/2 + 2/3) = 7/18.
    # A second query (label 9) has no match in the gallery: R = 0, not counted.
    got = retrieval_metrics(at_angles(0, 5), [0, 9], at_angles(10, 20, 30, 40, 50),
                            [1, 0, 0, 1, 0], backend=backend, device="cpu")
    assert got["num_queries"] == 1
    assert_metrics(got, {"precision_at_1": 0.0, "recall_at_1": 0.0, "recall_at_2": 1.0,
                         "recall_at_4": 1.0, "recall_at_8": 1.0, "r_precision": 2 / 3,
                         "map_at_r": 7 / 18})


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_excluded_by_index_not_by_distance(backend):
    # x0 and x1 are the same vector, both label A; x2 (10, B), x3 (25, B).
    # x0: its duplicate x1 is a genuine neighbour (only x0 itself is removed) -> all 1.
    #     Excluding "everything at distance 0" would wrongly give P@1 = 0.
    # x1: likewise -> all 1.   x2 (R=1): x0, x1 (10) then x3 (15) -> 0; first hit rank 3.
    # x3 (R=1): x2 (15) first -> 1.
    emb = at_angles(0, 0, 10, 25)
    got = retrieval_metrics(emb, [0, 0, 1, 1], backend=backend, device="cpu")
    assert got["num_queries"] == 4
    assert_metrics(got, {"precision_at_1": 3 / 4, "recall_at_2": 3 / 4, "recall_at_4": 1.0,
                         "r_precision": 3 / 4, "map_at_r": 3 / 4})


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_flag(backend):
    # Query (1, 0) label A; gallery (2, 1) label B, (1, 0) label A.
    # Cosine: A 1.0 > B 0.894 -> P@1 = 1. Raw inner product: B 2 > A 1 -> P@1 = 0.
    q, g, gl = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0], [1.0, 0.0]]), [1, 0]
    cos = retrieval_metrics(q, [0], g, gl, backend=backend, device="cpu")
    raw = retrieval_metrics(q, [0], g, gl, backend=backend, normalize=False, device="cpu")
    assert cos["precision_at_1"] == 1.0 and raw["precision_at_1"] == 0.0
    # Raw: R = 1 and the hit is at rank 2, outside the first R -> RP = MAP@R = 0, Recall@2 = 1.
    assert raw["map_at_r"] == 0.0 and raw["r_precision"] == 0.0 and raw["recall_at_2"] == 1.0


def test_no_countable_query_gives_nan():
    got = retrieval_metrics(at_angles(0, 10, 20), [0, 1, 2], device="cpu")
    assert got["num_queries"] == 0
    assert all(math.isnan(v) for k, v in got.items() if k != "num_queries")


def test_relevant_counts():
    ref = torch.tensor([3, 1, 3, 3, 7])
    assert relevant_counts(torch.tensor([3, 1, 7, 5]), ref, False).tolist() == [3, 1, 1, 0]
    assert relevant_counts(ref, ref, True).tolist() == [2, 0, 2, 2, 0]


def test_drop_self_when_ties_pushed_it_out():
    found = np.array([[4, 0, 2], [5, 6, 7]])  # row 0 holds itself (0); row 1 (self 9) does not
    assert _drop_self(found, np.array([0, 9]), 2).tolist() == [[4, 2], [5, 6]]


# -------------------------------------------------------------------------------------------
# Independent slow reference: pure Python loops over queries, float64
# -------------------------------------------------------------------------------------------
def slow_reference(query, query_labels, reference=None, reference_labels=None, ks=KS):
    self_retrieval = reference is None
    q = F.normalize(torch.as_tensor(query, dtype=torch.float64), dim=1).tolist()
    r = q if self_retrieval else F.normalize(torch.as_tensor(reference, dtype=torch.float64),
                                             dim=1).tolist()
    ql = [int(y) for y in query_labels]
    rl = ql if self_retrieval else [int(y) for y in reference_labels]
    totals = {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0,
              **{f"recall_at_{k}": 0.0 for k in ks}}
    counted = 0
    for i, (qi, yi) in enumerate(zip(q, ql)):
        others = [j for j in range(len(r)) if not (self_retrieval and j == i)]
        R = sum(1 for j in others if rl[j] == yi)
        if R == 0:
            continue
        counted += 1
        sims = {j: sum(a * b for a, b in zip(qi, r[j])) for j in others}
        ranked = sorted(others, key=lambda j: -sims[j])
        rel = [1 if rl[j] == yi else 0 for j in ranked]
        totals["precision_at_1"] += rel[0]
        for k in ks:
            totals[f"recall_at_{k}"] += 1.0 if any(rel[:k]) else 0.0
        totals["r_precision"] += sum(rel[:R]) / R
        hits, ap = 0, 0.0
        for i_rank in range(R):
            if rel[i_rank]:
                hits += 1
                ap += hits / (i_rank + 1)
        totals["map_at_r"] += ap / R
    return {k: v / counted for k, v in totals.items()}, counted


def clustered(n, num_classes, dim, seed, spread=1.0, centres_seed=None):
    """Random class centres plus noise; uneven class sizes, some singletons. Two calls with the
    same `centres_seed` draw samples around the same centres (query / gallery)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(
        seed if centres_seed is None else centres_seed))
    g = torch.Generator().manual_seed(seed + 1000)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_self_retrieval_matches_slow_reference(backend, chunk_size):
    x, y = clustered(240, 45, 8, seed=1)
    expected, counted = slow_reference(x, y)
    got = retrieval_metrics(x, y, backend=backend, chunk_size=chunk_size, device="cpu")
    assert got["num_queries"] == counted
    assert_metrics(got, expected, tol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_gallery_matches_slow_reference(backend):
    q, ql = clustered(90, 30, 8, seed=2, centres_seed=0)
    g, gl = clustered(150, 30, 8, seed=3, centres_seed=0)
    expected, counted = slow_reference(q, ql, g, gl, ks=(1, 5, 200))
    got = retrieval_metrics(q, ql, g, gl, ks=(1, 5, 200), backend=backend, chunk_size=11,
                            device="cpu")
    assert got["num_queries"] == counted
    assert_metrics(got, expected, tol=1e-9)


# -------------------------------------------------------------------------------------------
# Backends agree; pml agrees
# -------------------------------------------------------------------------------------------
def test_torch_and_faiss_agree_on_random_data():
    x, y = clustered(3000, 400, 32, seed=4, spread=1.5)
    a = retrieval_metrics(x, y, backend="torch", chunk_size=500, device="cpu")
    b = retrieval_metrics(x, y, backend="faiss", chunk_size=777, device="cpu")
    assert a["num_queries"] == b["num_queries"]
    assert_metrics(a, {k: v for k, v in b.items() if k != "num_queries"}, tol=1e-5)


def test_matches_pml_accuracy_calculator():
    x, y = clustered(2000, 300, 16, seed=5, spread=1.2)
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision",
                                       "mean_average_precision_at_r"), k="max_bin_count")
    # reference=None is pml 2.x's self-retrieval (1.x: embeddings_come_from_same_source=True).
    # pml's FaissKNN ranks by L2 distance: on unit vectors that is our cosine ranking.
    expected = calc.get_accuracy(F.normalize(x), y)
    for backend in BACKENDS:
        got = retrieval_metrics(x, y, backend=backend, chunk_size=300, device="cpu")
        assert got["precision_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-5)
        assert got["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-5)
        assert got["map_at_r"] == pytest.approx(expected["mean_average_precision_at_r"],
                                                abs=1e-5)


def test_accepts_numpy_and_lists_and_scale():
    x, y = clustered(200, 20, 8, seed=6)
    base = retrieval_metrics(x, y, device="cpu")
    assert retrieval_metrics(x.numpy() * 3.0, y.tolist(), device="cpu") == pytest.approx(base)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="annoy"), "backend"),
    (dict(ks=(0,)), "ks"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(at_angles(0, 10), [0, 0], device="cpu", **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(at_angles(0, 10), [0], device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[0.0, math.nan], [1.0, 0.0]]), [0, 0], device="cpu")
    with pytest.raises(ValueError, match="dimensions"):
        retrieval_metrics(at_angles(0), [0], torch.ones(2, 3), [0, 0], device="cpu")


# -------------------------------------------------------------------------------------------
# compute_embeddings
# -------------------------------------------------------------------------------------------
class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return 2 * x.double()  # a non-float32 output: compute_embeddings returns float32


def test_compute_embeddings(monkeypatch):
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    model = Doubler().train()
    batches = [(torch.ones(2, 3), torch.tensor([1, 2])),
               (torch.zeros(1, 3), torch.tensor([3], dtype=torch.int32), "extra")]
    emb, labels = compute_embeddings(model, batches, "cpu")
    assert emb.dtype == torch.float32 and emb.shape == (3, 3) and emb.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.tolist() == [1, 2, 3]
    assert torch.equal(emb[0], torch.full((3,), 2.0))
    assert model.seen_training == [False, False]  # eval mode while embedding
    assert model.training  # ... and the previous mode afterwards
    model.eval()
    compute_embeddings(model, batches, "cpu")
    assert not model.training
