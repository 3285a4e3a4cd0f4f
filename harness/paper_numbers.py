"""Published numbers of the seed methods, for orientation only.

Transcribed from the project's reference notes (shared/PROTOCOL.md, section 2), which cite the
papers and official repositories below. Every number was obtained under its authors' own
protocol (backbone, embedding size, batch, split, and often a checkpoint picked on the test set),
so it is NOT comparable with the harness's MLRC numbers; `harness.report` prints these rows only
for the real data sets, below a separator, labelled `PAPER_LABEL`, and never for glyphs.

Values are in percent, as published. `metrics` keys are the harness's metric names: the DML
papers' "Recall@1" is the harness's P@1 (first neighbour correct), so it fills both
`precision_at_1` and `recall_at_1`.

MLRC's own reference values in PROTOCOL.md section 1 are *validation* MAP@R of its search, not
test numbers, and are deliberately not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAPER_LABEL = "paper (own protocol, not comparable)"
REAL_DATASETS = ("cub200", "cars196", "sop", "inshop")


@dataclass(frozen=True)
class PaperResult:
    method: str                       # as the paper names it
    losses: tuple[str, ...]           # the harness loss names (config loss.name) it belongs to
    dataset: str                      # harness data.dataset
    metrics: dict[str, float]         # percent
    std: dict[str, float] = field(default_factory=dict)  # percent, where published
    source: str = ""                  # citation
    protocol: str = ""                # backbone / embedding / protocol of the published number


_PNPP_SRC = ("Teh, DeVries & Taylor, ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood "
             "Component Analysis, ECCV 2020 (github.com/euwern/proxynca_pp)")
_PNPP_PROTO = ("ResNet-50, global max pooling + LayerNorm, 2048-d, fast-moving proxies, "
               "standard train/test split, no cross-validation")
_PS_SRC = ("Gu, Ko & Kim, Proxy Synthesis: Learning with Synthetic Classes for Deep Metric "
           "Learning, AAAI 2021 (github.com/navervision/proxy-synthesis README)")
_PS_PROTO = ("8 runs, 512-d, batch 128, standard split, checkpoint picked on the test set")
_ISA_SRC = ("Li et al., Proxy-ISA (Proxy Anchor with imbalance/sample-aware weights), "
            "MMAsia 2022, Table 2 (github.com/rioyokotalab/ProxyISA)")
_ISA_PROTO = ("the authors' run of the MLRC setting (their implementation; separated/"
              "concatenated not stated)")


def _r1(value: float) -> dict[str, float]:
    return {"precision_at_1": value, "recall_at_1": value}


PAPER_RESULTS: tuple[PaperResult, ...] = (
    # ProxyNCA++ (PROTOCOL.md section 2: "Reported R@1: CUB 72.2, Cars 90.1, SOP 81.4, InShop 90.9")
    PaperResult("ProxyNCA++", ("proxy_nca_pp",), "cub200", _r1(72.2), {}, _PNPP_SRC, _PNPP_PROTO),
    PaperResult("ProxyNCA++", ("proxy_nca_pp",), "cars196", _r1(90.1), {}, _PNPP_SRC,
                _PNPP_PROTO),
    PaperResult("ProxyNCA++", ("proxy_nca_pp",), "sop", _r1(81.4), {}, _PNPP_SRC,
                _PNPP_PROTO.replace("fast-moving proxies", "batch 192 = 64 x 3")),
    PaperResult("ProxyNCA++", ("proxy_nca_pp",), "inshop", _r1(90.9), {}, _PNPP_SRC,
                _PNPP_PROTO.replace("fast-moving proxies", "batch 192 = 64 x 3")),
    # Proxy Synthesis repository README, Cars196
    PaperResult("Norm-Softmax", ("normalized_softmax",), "cars196",
                {**_r1(83.08), "map_at_r": 24.92}, {"precision_at_1": 0.21, "recall_at_1": 0.21},
                _PS_SRC, _PS_PROTO),
    PaperResult("PS + Norm-Softmax", ("proxy_synthesis_normalized_softmax",), "cars196",
                {**_r1(84.25), "map_at_r": 26.51}, {"precision_at_1": 0.31, "recall_at_1": 0.31},
                _PS_SRC, _PS_PROTO),
    PaperResult("ProxyNCA", ("proxy_nca",), "cars196",
                {**_r1(83.28), "map_at_r": 25.35}, {"precision_at_1": 0.36, "recall_at_1": 0.36},
                _PS_SRC, _PS_PROTO),
    PaperResult("PS + ProxyNCA", ("proxy_synthesis_proxy_nca",), "cars196",
                {**_r1(84.21), "map_at_r": 26.42}, {"precision_at_1": 0.21, "recall_at_1": 0.21},
                _PS_SRC, _PS_PROTO),
    # Proxy-ISA paper, Table 2
    PaperResult("Proxy-ISA", ("proxy_isa",), "cub200", {**_r1(68.1), "map_at_r": 26.8},
                {**_r1(0.3), "map_at_r": 0.2}, _ISA_SRC, _ISA_PROTO),
    PaperResult("Proxy-ISA", ("proxy_isa",), "cars196", {**_r1(86.3), "map_at_r": 29.3},
                {**_r1(0.2), "map_at_r": 0.2}, _ISA_SRC, _ISA_PROTO),
    PaperResult("Proxy-Anchor (in Proxy-ISA paper)", ("proxy_anchor",), "cub200",
                {**_r1(66.3), "map_at_r": 25.7}, {**_r1(0.3), "map_at_r": 0.3}, _ISA_SRC,
                _ISA_PROTO),
    PaperResult("Proxy-Anchor (in Proxy-ISA paper)", ("proxy_anchor",), "cars196",
                {**_r1(83.6), "map_at_r": 27.1}, {**_r1(0.4), "map_at_r": 0.3}, _ISA_SRC,
                _ISA_PROTO),
)


def paper_results(dataset: str, losses: set[str] | None = None) -> list[PaperResult]:
    """Published rows for `dataset` (real data sets only; [] for glyphs or unknown names),
    restricted to the given harness loss names when `losses` is not None."""
    if dataset not in REAL_DATASETS:
        return []
    return [r for r in PAPER_RESULTS
            if r.dataset == dataset and (losses is None or set(r.losses) & set(losses))]
