"""Proxy-ISA: Informative Sample-Aware Proxy (Li, Sato, Ishikawa, Kawakami, Yokota, MMAsia 2022;
rioyokotalab/ProxyISA, `code/losses.py` class ProxyISA and `code/train.py`).

Proxy Anchor (losses/proxy_anchor.py) whose exponents are multiplied by per proxy-sample weights
m (no gradient), each term divided by a weighted count instead of |P+| and C:

    L = 1/Z+ sum_{p in P+} log(1 + sum_{x in X_p+} exp(alpha m_px (delta - s)))
      + 1/Z- sum_{p}       log(1 + sum_{x in X_p-} exp(alpha m_px (s + delta)))

    Z+ = sum_{p in P+} mean_{x in X_p+} m_px,   Z- = sum_p mean_{x in X_p-} m_px

With every m = 1 this is exactly Proxy Anchor (and the first forward of a fresh loss is: E_c = 0,
S_c = 1 make every weight 1).

Per-class state (registered buffers, saved and restored with state_dict):
  n_c   `class_counts`   non-outlier samples of class c seen so far (cumulative)
  E_c   `effective_num`  effective number (1 - b^n_c) / (1 - b), b = (V - 1) / V
  S_c   `similarity`     h * mean cosine between the (detached, normalised) proxy c and the
                         memory-queue features of class c; starts at 1
and the memory queue (`queue_feats`, `queue_labels`, `queue_ptr`, `queue_size`, and the per-class
sums/counts of its features `queue_class_sum`, `queue_class_count`, kept up to date on every
enqueue/eviction so that S_c costs O(batch x D), not a pass over the queue), the current
epoch (`epoch`) and the epochs at which memory and filter start (`memory_start_epoch`,
`filter_start_epoch`).

From the state, per class (float64, as the official code):
  v_c     = 1 / (1 + ln(1 + E_c))
  sigma_c = 1 + (1 + e^-tau) (v_c - 1) / (1 + e^(V - E_c - tau))
  eta_c   = (1 + k (1 - S_c)) v_c + lambda
  o_c     = S_c - eta_c                        (outlier threshold)
Weights, with s = s(x, p_c):
  positive pair, filter on:  1 + sigma_c if o_c <= s <= S_c, else sigma_c;  filter off: 1
  negative pair:             1 / max(1, E_c) if s < o_c, else 1
After each training batch: samples with s(x, p_y) < o_y are outliers (only while the filter is
on); n_c += non-outlier count of c, E_c recomputed; while the memory is on the non-outliers
(normalised, detached) are enqueued and S_c is recomputed for every class of the batch from the
queue (after the enqueue). Everything is vectorised (bincount / index_add / gather): no Python loop
over classes or samples, so 11k SOP classes cost nothing special.

Paper vs official code vs this implementation (constructor arguments where it is a choice):

1. Epoch numbering. The paper/PROTOCOL: memory queue from epoch 2, outlier filter from epoch 3.
   The official train.py compares a 0-based epoch index with `start_epoch=2` (memory) and
   `start_epoch + 1` (filter), i.e. it switches them on in the 3rd and 4th epochs. The harness
   calls `set_epoch(e)` with 1-based e; we FOLLOW THE PAPER: `memory_start_epoch=2`,
   `filter_start_epoch=3` (memory/filter active when e >= them). Pass 3 and 4 to reproduce the
   official code. (Under MLRC an "epoch" is 100 iterations, not a pass over the data.)
2. Negative weights before the filter starts. The official code applies the negative weights
   1/max(1, E_c) for s < o_c from the very first batch (its negative loop is not gated by
   `enableFilter`; E_c grows from batch 1 because n_c is counted from batch 1). The paper
   describes the weights together with the filter. We FOLLOW THE CODE:
   `weight_negatives_before_filter=True`; False weights negatives only once the filter is on.
3. n_c is counted from the first batch, before the memory starts (official code; the paper does
   not say otherwise). Not a choice here.
4. Memory queue. The official queue is not a ring buffer (when a batch does not fit it overwrites
   the LAST slots and resets the pointer, so recent entries are lost and old ones kept; "full" is
   guessed from label 0). Ours is a true ring buffer of `memory_size` slots (official T = 55,000)
   holding the most recent non-outlier features; empty slots have label -1.
5. Z- when a class has no negative in the batch (a one-class batch): the official loop skips that
   class (Z- = C - 1); we count its mean as 1 so that all-ones weights give Proxy Anchor's C
   exactly. Only one-class batches are affected (that class's negative term is 0 either way).
6. State is only updated in training mode (`loss.train()`, the nn.Module default); a forward in
   eval mode (e.g. a validation loss) computes the weights but changes nothing. The official
   code has no eval-mode forward.
7. Thresholds are compared in the similarity's dtype (float32 in training) rather than the
   official float64 promotion: it differs only when s is within float32 rounding of o_c or S_c.
8. Synthetic classes. Wrapped by ProxySynthesisLoss the loss sees extra proxies and labels
   >= the number of real classes (len(class_counts)). Every pair that involves a synthetic proxy
   or a synthetic sample has weight 1, and synthetic samples/classes never touch the state.
9. Defaults: V=100, h=0.15, k=0.9 (train.py's default; the class default in losses.py is 1.0),
   lambda=0.1, tau=1.5, alpha=32, delta=0.1, memory_size=55,000 as train.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils import common_functions as c_f

from .proxy_anchor import PairWeights, ProxyAnchorLoss


class ClassThresholds(NamedTuple):
    """Per-class quantities derived from the state (each of shape (num_real_classes,))."""

    similarity: torch.Tensor  # S_c
    outlier: torch.Tensor  # o_c = S_c - eta_c
    sigma: torch.Tensor  # sigma_c
    neg_scale: torch.Tensor  # 1 / max(1, E_c)


class ProxyISALoss(ProxyAnchorLoss):
    """Proxy Anchor with Proxy-ISA's informative-sample weights, memory queue and effective numbers.

    Call `set_epoch(e)` (1-based) at the start of every epoch: the memory queue starts at
    `memory_start_epoch`, the outlier filter at `filter_start_epoch`. See the module docstring for
    every formula and every deviation from the paper or the official code.

    Args:
        num_classes, embedding_size, margin, alpha: as ProxyAnchorLoss (delta=0.1, alpha=32).
        V: volume for the effective number, b = (V - 1) / V (must be > 1).
        h: hardness scaler of S_c.
        k: scale of eta's similarity term.
        lambda_: margin of eta.
        tau: shift of sigma's schedule.
        memory_size: ring-buffer slots of the memory queue.
        memory_start_epoch: first (1-based) epoch with the memory queue (S_c updates).
        filter_start_epoch: first (1-based) epoch with the outlier filter and positive weights.
        weight_negatives_before_filter: apply the negative weights before the filter starts
            (official code: True).
        **kwargs: pml's (reducer, weight_regularizer, weight_init_func, ...); the distance must be
            CosineSimilarity (the thresholds are cosines).
    """

    def __init__(
        self,
        num_classes,
        embedding_size,
        margin=0.1,
        alpha=32,
        V=100.0,
        h=0.15,
        k=0.9,
        lambda_=0.1,
        tau=1.5,
        memory_size=55000,
        memory_start_epoch=2,
        filter_start_epoch=3,
        weight_negatives_before_filter=True,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, margin=margin, alpha=alpha, **kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        if not V > 1:
            raise ValueError(f"ProxyISALoss: V must be > 1 (b = (V - 1) / V), got {V}")
        if int(memory_size) < 1:
            raise ValueError(f"ProxyISALoss: memory_size must be >= 1, got {memory_size}")
        self.V = float(V)
        self.h = float(h)
        self.k = float(k)
        self.lambda_ = float(lambda_)
        self.tau = float(tau)
        self.weight_negatives_before_filter = bool(weight_negatives_before_filter)
        self.add_to_recordable_attributes(
            list_of_names=["V", "h", "k", "lambda_", "tau"], is_stat=False
        )

        long = dict(dtype=torch.long)
        self.register_buffer("class_counts", torch.zeros(num_classes, **long))
        # float64 like the official code (E_c approaches V; S_c feeds thresholds of cosines)
        self.register_buffer("effective_num", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("similarity", torch.ones(num_classes, dtype=torch.float64))
        self.register_buffer("queue_feats", torch.zeros(int(memory_size), embedding_size))
        self.register_buffer("queue_labels", torch.full((int(memory_size),), -1, **long))
        self.register_buffer("queue_ptr", torch.zeros((), **long))  # next slot to write
        self.register_buffer("queue_size", torch.zeros((), **long))  # filled slots
        # per-class sum (float64) and count of the queue's features, for S_c
        self.register_buffer(
            "queue_class_sum", torch.zeros(num_classes, embedding_size, dtype=torch.float64)
        )
        self.register_buffer("queue_class_count", torch.zeros(num_classes, **long))
        self.register_buffer("epoch", torch.ones((), **long))  # a fresh loss is in epoch 1
        self.register_buffer("memory_start_epoch", torch.tensor(int(memory_start_epoch), **long))
        self.register_buffer("filter_start_epoch", torch.tensor(int(filter_start_epoch), **long))
        self._phase_cache: tuple[bool, bool] | None = None
        self._thresholds_cache: ClassThresholds | None = None

    # ---------------------------------------------------------------------------------------
    # Epoch / phase
    # ---------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current (1-based) epoch; call at the start of every epoch."""
        self.epoch.fill_(int(epoch))
        self._phase_cache = None

    def _phase(self) -> tuple[bool, bool]:
        # Cached as Python bools so that a forward does not read three GPU scalars.
        if self._phase_cache is None:
            e = int(self.epoch)
            self._phase_cache = (e >= int(self.memory_start_epoch),
                                 e >= int(self.filter_start_epoch))
        return self._phase_cache

    @property
    def memory_active(self) -> bool:
        return self._phase()[0]

    @property
    def filter_active(self) -> bool:
        return self._phase()[1]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._phase_cache = None  # epoch buffers were replaced

    @property
    def num_real_classes(self) -> int:
        """Classes with state (the constructor's num_classes); more appear when wrapped by PS."""
        return self.class_counts.numel()

    # ---------------------------------------------------------------------------------------
    # Weights
    # ---------------------------------------------------------------------------------------
    def class_thresholds(self) -> ClassThresholds:
        """S_c, o_c, sigma_c and 1/max(1, E_c) from the current state, in float64."""
        E = self.effective_num.double()
        S = self.similarity.double()
        v = 1.0 / (1.0 + torch.log1p(E))
        # 1 / (1 + e^(V - E - tau)) written as a sigmoid: no overflow for any V.
        sigma = 1.0 + (1.0 + math.exp(-self.tau)) * (v - 1.0) * torch.sigmoid(E + self.tau - self.V)
        eta = (1.0 + self.k * (1.0 - S)) * v + self.lambda_
        return ClassThresholds(
            similarity=S, outlier=S - eta, sigma=sigma, neg_scale=1.0 / E.clamp(min=1.0)
        )

    def pair_weights(self, cos, labels, pos_mask) -> PairWeights:
        num_real = self.num_real_classes
        _, filter_on = self._phase()
        wdtype = torch.promote_types(cos.dtype, torch.float32)  # bf16 similarities -> f32 weights
        th = ClassThresholds(
            *(t.to(device=cos.device, dtype=wdtype) for t in self.class_thresholds())
        )
        self._thresholds_cache = th  # the same thresholds decide the outliers in after_loss

        cos_r = cos[:, :num_real].to(wdtype)
        one = torch.ones((), dtype=wdtype, device=cos.device)
        if filter_on:
            informative = (cos_r >= th.outlier) & (cos_r <= th.similarity)
            pos_w = torch.where(informative, 1.0 + th.sigma, th.sigma)
        else:
            pos_w = one
        if filter_on or self.weight_negatives_before_filter:
            neg_w = torch.where(cos_r < th.outlier, th.neg_scale, one)
        else:
            neg_w = one
        w = torch.where(pos_mask[:, :num_real], pos_w, neg_w)
        if cos.shape[1] > num_real:  # synthetic proxies (Proxy Synthesis): weight 1
            w = torch.cat([w, w.new_ones(w.shape[0], cos.shape[1] - num_real)], dim=1)
        w = torch.where((labels >= num_real).unsqueeze(1), one, w)  # synthetic samples: weight 1

        pos_f = pos_mask.to(wdtype)
        neg_f = 1.0 - pos_f
        pos_count, neg_count = pos_f.sum(0), neg_f.sum(0)
        # Z+: classes without a positive contribute 0; Z-: a class without a negative counts 1
        # (see the module docstring, point 5), so all-ones weights give |P+| and C exactly.
        pos_divisor = ((w * pos_f).sum(0) / pos_count.clamp(min=1)).sum()
        neg_mean = torch.where(neg_count > 0, (w * neg_f).sum(0) / neg_count.clamp(min=1), one)
        return PairWeights(pos=w, neg=w, pos_divisor=pos_divisor, neg_divisor=neg_mean.sum())

    # ---------------------------------------------------------------------------------------
    # State update
    # ---------------------------------------------------------------------------------------
    def after_loss(self, embeddings, labels, cos, pos_mask) -> None:
        th, self._thresholds_cache = self._thresholds_cache, None
        if not self.training:
            return
        with torch.no_grad():
            memory_on, filter_on = self._phase()
            num_real = self.num_real_classes
            real = labels < num_real
            y = labels[real]
            if filter_on:
                s_own = cos[real].gather(1, y.unsqueeze(1)).squeeze(1).to(th.outlier.dtype)
                keep = s_own >= th.outlier[y]  # outliers: s(x, p_y) < o_y
            else:
                keep = torch.ones_like(y, dtype=torch.bool)
            kept = y[keep]
            batch_counts = torch.bincount(kept, minlength=num_real)
            self.class_counts += batch_counts
            b = (self.V - 1.0) / self.V
            new_e = (1.0 - torch.pow(b, self.class_counts.double())) / (1.0 - b)
            new_e = new_e.to(self.effective_num.dtype)
            self.effective_num.copy_(torch.where(batch_counts > 0, new_e, self.effective_num))
            if memory_on:
                feats = F.normalize(embeddings[real][keep].detach(), p=2, dim=1)
                self._enqueue(feats, kept)
                self._refresh_similarity(self.proxies[:num_real].detach(), y)

    def _enqueue(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Write into the ring buffer; when more than memory_size arrive, the newest are kept.

        The per-class sums and counts of the queue's features are kept up to date on the way
        (evicted entries subtracted, new ones added; float64), so that S_c costs O(batch * D)
        instead of a pass over the whole queue. No host-device synchronisation.
        """
        size = self.queue_labels.numel()
        n = labels.numel()
        if n == 0:
            return
        m = min(n, size)
        feats, labels = feats[n - m:].to(self.queue_feats.dtype), labels[n - m:]
        slots = (self.queue_ptr + (n - m) + torch.arange(m, device=labels.device)) % size
        acc = self.queue_class_sum.dtype  # float64 unless the module was cast
        old_labels = self.queue_labels[slots]
        evicted = (old_labels >= 0).unsqueeze(1)  # empty slots hold label -1
        old_idx = old_labels.clamp(min=0)
        self.queue_class_sum.index_add_(
            0, old_idx, -(self.queue_feats[slots].to(acc) * evicted)
        )
        self.queue_class_count.index_add_(0, old_idx, -evicted.squeeze(1).long())
        self.queue_feats[slots] = feats
        self.queue_labels[slots] = labels
        self.queue_class_sum.index_add_(0, labels, feats.to(acc))
        self.queue_class_count.index_add_(0, labels, torch.ones_like(labels))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_size.copy_(torch.clamp(self.queue_size + n, max=size))

    def _refresh_similarity(self, proxies: torch.Tensor, classes: torch.Tensor) -> None:
        """S_c = h * mean_{queue entries j of class c} cos(f_j, p_c) for c in `classes` (the
        batch's labels, repeats allowed), as h * <sum_j f_j, p_c> / count_c."""
        p = F.normalize(proxies[classes], p=2, dim=1).double()
        count = self.queue_class_count[classes]
        sums = self.queue_class_sum[classes].double()
        new_s = self.h * (sums * p).sum(dim=1) / count.clamp(min=1)
        new_s = torch.where(count > 0, new_s, self.similarity[classes].double())
        # repeated classes write the same value
        self.similarity.index_put_((classes,), new_s.to(self.similarity.dtype))

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The queue's filled entries, oldest first: (features, labels)."""
        size = self.queue_labels.numel()
        filled = int(self.queue_size)
        start = (int(self.queue_ptr) - filled) % size
        order = (start + torch.arange(filled, device=self.queue_labels.device)) % size
        return self.queue_feats[order], self.queue_labels[order]
