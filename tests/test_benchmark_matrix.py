"""The benchmark matrix's names, layers and recipes, and losses from the user's own code.

tests/data/study_configs_before.json was written from the 65 studies/*.toml files before the
matrix replaced them (commit 4585b56): `load_study(name).to_dict()` of every name `--list`
printed then, alone and with `--profile embedded`. Every such name must still resolve to the same
configuration; under the embedded profile only the name and description may change (a cell run
on the glyphs is named for them).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

import losses.registry as registry
from harness import benchmark
from harness import config as config_mod
from harness.benchmark import Cell, parse_cell_name
from harness.config import load_study
from harness.errors import ConfigError
from harness.run import main, output_dir, parse_args, resolve_config
from harness.search import search_space

BEFORE = json.loads((Path(__file__).parent / "data" / "study_configs_before.json").read_text())

# Deliberate changes since the snapshot (#12, the embedded benchmark that ranks losses): the
# `embedded` profile fine-tunes the glyph-pretrained trunk (its last block) to convergence, and
# the quickstart is that profile with a demonstration budget. Nothing else may differ.
EMBEDDED_PROFILE_CHANGES = {
    "data.resize": 32, "data.scale_min": 0.16, "data.random_crop": False,
    "model.pretrained": True, "model.freeze_bn": True,
    "train.lr": 1e-3, "train.weight_decay": 1e-4, "train.iters_per_epoch": 20,
    "train.max_epochs": 50, "search.trials": 10, "final.reproductions": 10,
    "train.center_collapse_gradient": "zero", "model.frozen_blocks": 3,
    "model.cache_frozen_features": True}
QUICKSTART_CHANGES = {**EMBEDDED_PROFILE_CHANGES, "train.lr": 5e-4, "train.max_epochs": 6,
                      "search.trials": 4, "final.reproductions": 1}


def changed(config: dict, changes: dict) -> dict:
    config = json.loads(json.dumps(config))
    config.setdefault("data", {}).setdefault("random_crop", True)  # a field added since
    config.setdefault("train", {}).setdefault("tf32", False)  # added since, off (float32)
    # added since: MLRC's gradient at collapsed SoftTriple centers (docs/conformance.md)
    config["train"].setdefault("center_collapse_gradient", "mlrc")
    config.setdefault("model", {}).setdefault("frozen_blocks", 0)  # added since: MLRC's, none
    config["model"].setdefault("cache_frozen_features", False)  # added since: images each step
    # added since: MLRC's rule, the search's best trial is tested (harness/recheck.py)
    config.setdefault("final", {}).setdefault("recheck_top", 0)
    config["final"].setdefault("recheck_runs", 2)
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_former_study_name_keeps_its_configuration(name):
    quickstart = name == "quickstart"
    expected = changed(BEFORE[name]["mlrc"], QUICKSTART_CHANGES if quickstart else {})
    actual = load_study(name).to_dict()
    if quickstart:  # its description now says what its budget is
        expected["description"] = actual["description"]
    assert actual == expected
    embedded = load_study(name, profile="embedded").to_dict()
    old = changed(BEFORE[name]["embedded"], EMBEDDED_PROFILE_CHANGES)
    assert {k: v for k, v in embedded.items() if k not in ("name", "description")} == \
        {k: v for k, v in old.items() if k not in ("name", "description")}
    if quickstart:  # a study file keeps its own name under any profile
        assert embedded["name"] == old["name"]


def test_names_parse_from_aliases_and_registry_spellings():
    assert parse_cell_name("proxy_synthesis_cars") == \
        Cell("proxy_synthesis_normalized_softmax", "cars196")
    assert parse_cell_name("proxy_synthesis_proxy_anchor_cars196") == \
        Cell("proxy_synthesis_proxy_anchor", "cars196")
    assert parse_cell_name("norm_softmax_sop") == Cell("normalized_softmax", "sop")
    assert parse_cell_name("proxy_nca_pp_inshop_paper") == Cell("proxy_nca_pp", "inshop", "paper")
    assert parse_cell_name("proxy_anchor_glyphs") == Cell("proxy_anchor", "glyphs")
    assert parse_cell_name("quickstart") is None
    assert load_study("proxy_synthesis_proxy_anchor_cars196").name == "proxy_synthesis_pa_cars"


def test_bad_names_say_what_exists():
    with pytest.raises(ConfigError, match="has no 'paper' recipe"):
        load_study("proxy_isa_cub_paper")
    with pytest.raises(ConfigError, match="'cub' is a data set"):
        load_study("cub")
    with pytest.raises(ConfigError, match="Did you mean: proxy_anchor_cub"):
        load_study("proxy_anchr_cub")


def test_a_study_file_with_a_cell_name_is_refused(tmp_path, monkeypatch):
    (tmp_path / "proxy_anchor_cub.toml").write_text('description = "shadow"\n')
    monkeypatch.setattr(config_mod, "STUDIES_DIR", tmp_path)
    with pytest.raises(ConfigError, match="name of a generated benchmark cell"):
        load_study("proxy_anchor_cub")


def test_a_recipe_may_differ_per_dataset():
    cub, sop = load_study("proxy_nca_pp_cub_paper"), load_study("proxy_nca_pp_sop_paper")
    assert (cub.train.batch_size, cub.train.m_per_class, cub.train.loss_lr) == (32, 4, 400.0)
    assert "train.loss_lr" not in search_space(cub)
    assert (sop.train.batch_size, sop.train.m_per_class) == (192, 3)
    assert "train.loss_lr" in search_space(sop)
    assert cub.model.trunk == sop.model.trunk == "resnet50"


def test_a_recipe_cannot_change_the_cells_loss_or_dataset(tmp_path, monkeypatch):
    (tmp_path / "proxy_anchor_paper.toml").write_text(
        'description = "x"\n[datasets.sop.data]\ndataset = "cub200"\n')
    monkeypatch.setattr(benchmark, "RECIPES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"\[datasets.sop\] data.dataset is the cell's"):
        load_study("proxy_anchor_cub_paper")


def test_embedded_runs_are_named_for_the_glyphs():
    args = parse_args(["--study", "proxy_anchor_cub", "--profile", "embedded"])
    cfg = resolve_config(args)
    assert cfg.name == "proxy_anchor_glyphs" and cfg.data.dataset == "glyphs"
    assert output_dir(args, cfg).parts[-2:] == ("embedded", "proxy_anchor_glyphs")
    assert load_study("proxy_anchor_cars", profile="embedded").to_dict() == cfg.to_dict()
    # the SOP table of the recipe still applies: the name says so
    assert load_study("proxy_nca_pp_sop_paper", profile="embedded").name == \
        "proxy_nca_pp_glyphs_paper_sop"
    assert load_study("proxy_anchor_sop_paper", profile="embedded").name == \
        "proxy_anchor_glyphs_paper"


def test_quickstart_is_the_embedded_profile_over_proxy_anchor():
    """Only its budget differs (a demonstration): 4 trials, 1 retraining, short folds."""
    budget = ["search.trials=4", "final.reproductions=1", "train.max_epochs=6", "train.lr=5e-4"]
    quick = load_study("quickstart").to_dict()
    cell = load_study("proxy_anchor_cub", profile="embedded", overrides=budget).to_dict()
    assert {k: v for k, v in quick.items() if k not in ("name", "description")} == \
        {k: v for k, v in cell.items() if k not in ("name", "description")}
    assert quick["name"] == "quickstart"


def test_list_prints_every_cell_and_the_study_files(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line and line[0] not in "#"}
    assert {benchmark.cell_name(c) for c in benchmark.cells()} | {"quickstart"} <= listed
    assert set(BEFORE) <= listed  # every former name is still listed


# --------------------------------------------------------------------------------------------
# Losses from the user's own code
# --------------------------------------------------------------------------------------------
OWN_LOSSES = '''
import torch
from pytorch_metric_learning import losses


class FancyLoss(torch.nn.Module):
    """Proxies, built with the sizes the harness passes."""
    def __init__(self, num_classes, embedding_size, margin=0.1, scale=16):
        super().__init__()
        self.sizes = (num_classes, embedding_size)
        self.margin, self.scale = margin, scale
        self.proxies = torch.nn.Parameter(torch.randn(num_classes, embedding_size))

    def forward(self, embeddings, labels):
        logits = self.scale * torch.nn.functional.normalize(embeddings) @ \\
            torch.nn.functional.normalize(self.proxies).T
        return torch.nn.functional.cross_entropy(logits - self.margin, labels)


class PlainLoss(losses.ContrastiveLoss):
    """A pml loss without parameters: no own optimizer, no searched loss lr."""


class Rejecting(torch.nn.Module):
    def __init__(self, margin=0.1):
        super().__init__()
        raise ValueError("margin must be negative")

    def forward(self, embeddings, labels):
        return embeddings.sum()


class NoLabels(torch.nn.Module):
    def forward(self, embeddings):
        return embeddings.sum()


NOT_A_MODULE = 3
'''


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(OWN_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "LOSSES", dict(registry.LOSSES))  # registrations stay here
    return tmp_path


def space_file(folder: Path, text: str) -> str:
    path = folder / "space.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_own_loss_is_a_fair_cell_of_the_matrix(own_module):
    space = space_file(own_module, '''
        [space]
        "loss.margin" = {low = 0.0, high = 0.5}
        "loss.scale" = {low = 1.0, high = 64.0, log = true}
        ''')
    cfg = resolve_config(parse_args(["--loss", "my_losses:FancyLoss", "--loss-space", space,
                                     "--study", "cub"]))
    assert (cfg.name, cfg.loss.name) == ("fancy_loss_cub", "fancy_loss")
    assert set(search_space(cfg)) == {"loss.margin", "loss.scale", "train.loss_lr"}
    peer = load_study("proxy_anchor_cub").to_dict()
    mine = cfg.to_dict()
    for section in ("data", "model", "train", "final"):
        assert mine[section] == peer[section]
    assert registry.get_loss_spec("fancy_loss").defaults == {"margin": 0.1, "scale": 16.0}
    loss = registry.build_loss("fancy_loss", num_classes=5, embedding_size=8, dataset="cub200",
                               scale=8.0)
    assert loss.sizes == (5, 8) and loss.scale == 8.0
    value = loss(torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0]))
    assert torch.isfinite(value)
    # the generated name works too, and --set fixes a searched parameter
    again = resolve_config(parse_args(["--loss", "my_losses:FancyLoss", "--loss-space", space,
                                       "--study", "fancy_loss_cars", "--set",
                                       "loss.margin=0.2"]))
    assert again.data.dataset == "cars196" and again.search.fixed == ["loss.margin"]


def test_own_loss_without_parameters_searches_no_loss_lr(own_module):
    space = space_file(own_module, '''
        name = "plain"
        [space]
        "loss.neg_margin" = {low = 0.0, high = 2.0}
        ''')
    cfg = resolve_config(parse_args(["--loss", "my_losses:PlainLoss", "--loss-space", space,
                                     "--study", "sop"]))
    assert cfg.name == "plain_sop"
    assert set(search_space(cfg)) == {"loss.neg_margin"}


@pytest.mark.parametrize("loss, space, message", [
    ("no_such_module:X", None, "cannot import 'no_such_module'"),
    ("my_losses:Missing", None, "has no 'Missing'"),
    ("my_losses", None, "expected MODULE:CLASS"),
    ("my_losses:NOT_A_MODULE", None, "not a torch.nn.Module subclass"),
    ("my_losses:NoLabels", None, r"must accept \(embeddings, labels\)"),
    ("my_losses:Rejecting", None, "Rejecting\\(margin=0.1\\) failed: ValueError: margin must"),
    ("my_losses:FancyLoss", '[space]\n"loss.margn" = {low = 0.0, high = 1.0}\n',
     "has no parameter\\(s\\) margn; its parameters: margin, scale"),
    ("my_losses:FancyLoss", '[space]\n"margin" = {low = 0.0, high = 1.0}\n',
     "expected \"loss.<parameter>\""),
    ("my_losses:FancyLoss", 'name = "proxy_anchor"\n', "is a built-in loss"),
    ("my_losses:FancyLoss", '[spaces]\n', "unknown keys \\['spaces'\\]"),
])
def test_own_loss_errors_are_clear(own_module, capsys, loss, space, message):
    argv = ["--loss", loss, "--study", "cub"]
    if space is not None:
        argv += ["--loss-space", space_file(own_module, space)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_loss_space_needs_a_loss(capsys):
    assert main(["--loss-space", "x.toml", "--study", "cub"]) == 2
    assert "--loss-space needs --loss" in capsys.readouterr().err
