"""Every study file: it loads, it is fair (differs from its peers only in the loss), and it runs.

The end-to-end part runs each distinct study configuration through the whole CLI protocol on
tiny embedded data (`--profile embedded` plus a few `--set` to make it seconds), so CI proves
that every study file is valid and its loss trains, validates, retrains and tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.config import list_studies, load_study, study_path
from harness.datasets import DATASETS
from harness.run import main
from harness.search import search_space
from losses.registry import LOSSES

STUDIES = [s for s in list_studies() if s != "quickstart"]
DATASET_SUFFIX = {"cub": "cub200", "cars": "cars196", "sop": "sop", "inshop": "inshop"}
SEED_METHODS = ("proxy_anchor", "proxy_nca_pp", "proxy_synthesis", "proxy_isa")
STUDY_NAME = re.compile(r"^(?P<method>[a-z_]+?)_(?P<data>cub|cars|sop|inshop)(?P<paper>_paper)?$")

# What a study may change relative to the shared MLRC configuration (the dataclass defaults):
# its loss and search space, its names, and (paper variants only) the recipe.
FREE_KEYS = {"name", "description", "loss", "search.space"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in ("loss", "search.space"):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def test_there_is_a_study_per_method_and_dataset():
    methods = {STUDY_NAME.match(s)["method"] for s in STUDIES}
    for method in ("proxy_anchor", "proxy_nca_pp", "proxy_synthesis", "proxy_synthesis_pa",
                   "proxy_isa", "proxy_nca", "norm_softmax", "soft_triple", "cosface", "arcface",
                   "multi_similarity", "contrastive", "triplet"):
        assert method in methods
        for suffix in DATASET_SUFFIX:
            assert f"{method}_{suffix}" in STUDIES, f"missing study {method}_{suffix}"
    for method in SEED_METHODS:
        for suffix in DATASET_SUFFIX:
            if method == "proxy_isa":
                continue  # Proxy-ISA's paper recipe is MLRC's own (its Table 2 setting)
            assert f"{method}_{suffix}_paper" in STUDIES


@pytest.mark.parametrize("name", STUDIES)
def test_study_loads_and_names_its_dataset_and_loss(name):
    match = STUDY_NAME.match(name)
    assert match, f"{name}: expected <method>_<cub|cars|sop|inshop>[_paper]"
    cfg = load_study(name)
    assert cfg.data.dataset == DATASET_SUFFIX[match["data"]]
    assert cfg.data.dataset in DATASETS
    assert cfg.loss.name in LOSSES
    assert cfg.description
    space = search_space(cfg)
    assert space, f"{name}: empty search space"
    embedded = load_study(name, profile="embedded")
    assert embedded.data.dataset == "glyphs" and embedded.loss.name == cfg.loss.name


@pytest.mark.parametrize("name", [s for s in STUDIES if not s.endswith("_paper")])
def test_mlrc_studies_share_everything_but_the_loss(name):
    """The fairness of the comparison: same trunk, data, budget, optimiser for every method."""
    cfg = flatten(load_study(name).to_dict())
    dataset = cfg["data.dataset"]
    peer = next(s for s in STUDIES if not s.endswith("_paper") and s != name
                and load_study(s).data.dataset == dataset)
    peer_cfg = flatten(load_study(peer).to_dict())
    differing = {k for k in cfg if cfg[k] != peer_cfg.get(k)} - FREE_KEYS
    assert not differing, f"{name} vs {peer}: differ in {sorted(differing)}"


@pytest.mark.parametrize("name", [s for s in STUDIES if s.endswith("_paper")])
def test_paper_variants_extend_their_mlrc_study(name):
    text = study_path(name).read_text()
    base = name.removesuffix("_paper")
    assert f'extends = "{base}"' in text
    assert load_study(name).loss.name == load_study(base).loss.name


def test_proxy_synthesis_studies_name_their_base_loss():
    bases = {load_study(s).loss.name for s in STUDIES if s.startswith("proxy_synthesis")}
    assert {"proxy_synthesis_normalized_softmax", "proxy_synthesis_proxy_anchor"} <= bases


def distinct_embedded_configs() -> list[str]:
    """One study per distinct configuration under the embedded profile (datasets collapse)."""
    seen, chosen = set(), []
    for name in STUDIES:
        cfg = load_study(name, profile="embedded").to_dict()
        key = json.dumps({k: v for k, v in cfg.items() if k not in ("name", "description")},
                         sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            chosen.append(name)
    return chosen


TINY = ["data.glyph_classes=16", "data.glyph_per_class=6", "train.batch_size=12",
        "train.iters_per_epoch=2", "train.max_epochs=1", "train.val_every_epochs=1",
        "train.eval_batch_size=64", "search.trials=1", "search.n_startup_trials=1",
        "final.reproductions=1"]


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory):
    return tmp_path_factory.mktemp("glyphs")


@pytest.mark.slow
@pytest.mark.parametrize("name", distinct_embedded_configs())
def test_every_study_runs_end_to_end_on_embedded_data(name, tmp_path, glyph_root):
    out = tmp_path / name
    sets = [x for item in TINY + [f"data.root={glyph_root}"] for x in ("--set", item)]
    code = main(["--study", name, "--profile", "embedded", "--output", str(out), *sets])
    assert code == 0
    metrics = pd.read_csv(out / "final" / "test_metrics.csv")
    assert set(metrics["mode"]) == {"separated", "concatenated"}
    assert metrics["map_at_r"].between(0, 1).all()
    assert json.loads((out / "config.json").read_text())["loss"]["name"] == \
        load_study(name).loss.name
