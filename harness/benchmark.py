"""The benchmark matrix: every registered loss x every data set x its recipes, generated.

A cell is (loss, data set, recipe). Its configuration is built in layers, each overriding the one
before, so two cells on one data set with the same recipe differ only in the loss (fairness by
construction):

    dataclass defaults (MLRC)  <-  data set  <-  loss (and its space: per data set, in the
    registry)  <-  recipe  <-  --profile  <-  --set

- losses: `losses.registry.LOSSES`; data sets: `harness.datasets.DATASETS` (the embedded glyphs
  are no column of the matrix but every name accepts them: `proxy_anchor_glyphs`);
- recipes: "mlrc" (the defaults: nothing to add) and, where a file
  `studies/recipes/<loss registry name>_<recipe>.toml` exists, that recipe ("paper": the method's
  own training recipe under MLRC's split, search and test). A recipe file holds only what the
  recipe changes, plus `[datasets.<data set>]` tables for what differs on one data set.

Names: `<loss>_<data set>[_<recipe>]` with the loss's alias or registry name and the data set's
alias or registry name; `--list` prints the aliases (`proxy_synthesis_pa_cars`), the registry
spelling resolves to the same cell and the same name (`proxy_synthesis_proxy_anchor_cars196`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "studies" / "recipes"
MLRC = "mlrc"  # the recipe with no file: the dataclass defaults are MLRC's protocol
RECIPES = (MLRC, "paper")
EMBEDDED_DATASET = "glyphs"  # rendered offline; the `embedded` profile runs any cell on it


@dataclass(frozen=True)
class Row:
    alias: str  # the short name in study names (what users type)
    title: str  # for descriptions: "<title> on <data set title>"


#: One row per loss registry entry: the alias of its study names and its title. The aliases keep
#: every study name of the former studies/*.toml files (norm_softmax, proxy_synthesis[_pa]).
LOSS_ROWS: dict[str, Row] = {
    "proxy_anchor": Row("proxy_anchor", "Proxy Anchor (Kim et al. 2020)"),
    "proxy_nca_pp": Row("proxy_nca_pp", "ProxyNCA++ (Teh et al. 2020)"),
    "proxy_isa": Row("proxy_isa", "Proxy-ISA (Li et al. 2022)"),
    "proxy_nca": Row("proxy_nca",
                     "ProxyNCA (Movshovitz-Attias et al. 2017), pml baseline"),
    "proxy_nca_log_softmax": Row("proxy_nca_log_softmax",
                                 "ProxyNCA as a log-softmax (Movshovitz-Attias et al. 2017)"),
    "normalized_softmax": Row("norm_softmax", "Normalized Softmax (Zhai & Wu 2019), pml baseline"),
    "soft_triple": Row("soft_triple", "SoftTriple (Qian et al. 2019), pml baseline"),
    "cosface": Row("cosface", "CosFace (Wang et al. 2018), pml baseline"),
    "arcface": Row("arcface", "ArcFace (Deng et al. 2019), pml baseline"),
    "multi_similarity": Row("multi_similarity",
                            "Multi-Similarity (Wang et al. 2019), pml baseline"),
    "contrastive": Row("contrastive", "Contrastive (Hadsell et al. 2006), pml baseline"),
    "triplet": Row("triplet", "Triplet margin (Weinberger & Saul 2009), pml baseline"),
    "proxy_synthesis_normalized_softmax": Row(
        "proxy_synthesis", "Proxy Synthesis wrapping Normalized Softmax (Gu et al. 2021)"),
    "proxy_synthesis_proxy_anchor": Row(
        "proxy_synthesis_pa", "Proxy Synthesis wrapping Proxy Anchor (Gu et al. 2021)"),
    "proxy_synthesis_proxy_nca": Row(
        "proxy_synthesis_nca",
        "Proxy Synthesis wrapping ProxyNCA, log-softmax form (Gu et al. 2021)"),
    "proxy_synthesis_proxy_nca_pp": Row(
        "proxy_synthesis_nca_pp", "Proxy Synthesis wrapping ProxyNCA++ (Gu et al. 2021)"),
    "proxy_synthesis_cosface": Row(
        "proxy_synthesis_cosface", "Proxy Synthesis wrapping CosFace (Gu et al. 2021)"),
    "proxy_synthesis_arcface": Row(
        "proxy_synthesis_arcface", "Proxy Synthesis wrapping ArcFace (Gu et al. 2021)"),
    "proxy_synthesis_soft_triple": Row(
        "proxy_synthesis_soft_triple", "Proxy Synthesis wrapping SoftTriple (Gu et al. 2021)"),
    "proxy_synthesis_proxy_isa": Row(
        "proxy_synthesis_isa", "Proxy Synthesis wrapping Proxy-ISA (Gu et al. 2021)"),
}

#: One row per data set registry entry: the alias of study names and its title.
DATASET_ROWS: dict[str, Row] = {
    "cub200": Row("cub", "CUB-200-2011"),
    "cars196": Row("cars", "Cars196"),
    "sop": Row("sop", "Stanford Online Products"),
    "inshop": Row("inshop", "In-Shop Clothes"),
    "glyphs": Row("glyphs", "the embedded glyphs"),
}


@dataclass(frozen=True)
class Cell:
    loss: str  # loss registry name
    dataset: str  # data-set registry name
    recipe: str = MLRC


# --------------------------------------------------------------------------------------------
# The registries, and the names derived from them
# --------------------------------------------------------------------------------------------
def loss_names() -> list[str]:
    """Every registered loss (including one registered from the user's own code)."""
    from losses.registry import LOSSES  # local import: torch and pml are heavy

    return list(LOSSES)


def benchmark_datasets() -> list[str]:
    """The matrix's columns: every registered data set but the embedded glyphs."""
    from harness.datasets import DATASETS

    return [d for d in DATASETS if d != EMBEDDED_DATASET]


def loss_row(loss: str) -> Row:
    """The row of `loss`; a loss without one (e.g. from the user's own code) is its own alias."""
    return LOSS_ROWS.get(loss, Row(loss, loss))


def dataset_row(dataset: str) -> Row:
    return DATASET_ROWS.get(dataset, Row(dataset, dataset))


def recipe_path(loss: str, recipe: str) -> Path:
    return RECIPES_DIR / f"{loss}_{recipe}.toml"


def recipes_for(loss: str) -> list[str]:
    """"mlrc" and every recipe with a file for `loss`."""
    return [MLRC] + [r for r in RECIPES if r != MLRC and recipe_path(loss, r).exists()]


def cells() -> list[Cell]:
    """The whole matrix, in registry order: loss, then recipe, then data set."""
    return [Cell(loss, dataset, recipe) for loss in loss_names() for recipe in recipes_for(loss)
            for dataset in benchmark_datasets()]


def cell_name(cell: Cell) -> str:
    suffix = "" if cell.recipe == MLRC else f"_{cell.recipe}"
    return f"{loss_row(cell.loss).alias}_{dataset_row(cell.dataset).alias}{suffix}"


def _spellings(names: list[str], row) -> dict[str, str]:
    """alias and registry name -> registry name."""
    out = {}
    for name in names:
        out[name] = name
        out[row(name).alias] = name
    return out


def parse_cell_name(name: str) -> Cell | None:
    """The cell a study name means (`proxy_anchor_cub`, `proxy_anchor_cub200_paper`), or None
    when `name` is no cell name. A known loss and data set with a recipe the loss lacks is an
    error, not None: the user meant a cell."""
    from harness.datasets import DATASETS

    losses = _spellings(loss_names(), loss_row)
    datasets = _spellings(list(DATASETS), dataset_row)
    recipe = next((r for r in RECIPES if r != MLRC and name.endswith(f"_{r}")), MLRC)
    stem = name.removesuffix(f"_{recipe}") if recipe != MLRC else name
    found = [Cell(losses[stem[:-len(d) - 1]], datasets[d], recipe) for d in datasets
             if stem.endswith(f"_{d}") and stem[:-len(d) - 1] in losses]
    if len(set(found)) > 1:  # a registry change made two spellings collide: never guess
        raise ConfigError(f"study name {name!r} is ambiguous: {sorted(set(found))}")
    if not found:
        return None
    cell = found[0]
    if cell.recipe not in recipes_for(cell.loss):
        raise ConfigError(f"{name}: loss {cell.loss!r} has no {cell.recipe!r} recipe "
                          f"(no {recipe_path(cell.loss, cell.recipe)}); its recipes: "
                          f"{', '.join(recipes_for(cell.loss))}")
    return cell


def dataset_by_name(name: str) -> str | None:
    """The data-set registry name of an alias or registry name, else None."""
    from harness.datasets import DATASETS

    return _spellings(list(DATASETS), dataset_row).get(name)


# --------------------------------------------------------------------------------------------
# Layers and descriptions
# --------------------------------------------------------------------------------------------
def read_recipe(loss: str, recipe: str) -> dict[str, Any]:
    path = recipe_path(loss, recipe)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    _check_recipe(path, table)
    return table


def _check_recipe(path: Path, table: dict[str, Any]) -> None:
    """A recipe changes the training recipe: never the cell's data set or loss."""
    from harness.datasets import DATASETS

    if "description" not in table:
        raise ConfigError(f"{path}: a recipe needs a description (cells append ' on <data set>')")
    for where, sub in [("", table), *[(f"[datasets.{d}] ", t) for d, t in
                                      table.get("datasets", {}).items()]]:
        for key in ("data.dataset", "loss.name", "extends", "name"):
            section, _, field = key.rpartition(".")
            holder = sub.get(section, {}) if section else sub
            if isinstance(holder, dict) and field in holder:
                raise ConfigError(f"{path}: {where}{key} is the cell's, not the recipe's")
    unknown = set(table.get("datasets", {})) - set(DATASETS)
    if unknown:
        raise ConfigError(f"{path}: [datasets] names unknown data sets {sorted(unknown)}; "
                          f"known: {', '.join(DATASETS)}")


def cell_layers(cell: Cell) -> list[tuple[str, dict[str, Any]]]:
    """(source, table) pairs to apply, in order, over the dataclass defaults."""
    layers = [(f"data set {cell.dataset}", {"data": {"dataset": cell.dataset}}),
              (f"loss {cell.loss}", {"loss": {"name": cell.loss}})]
    if cell.recipe != MLRC:
        recipe = read_recipe(cell.loss, cell.recipe)
        source = str(recipe_path(cell.loss, cell.recipe))
        common = {k: v for k, v in recipe.items() if k not in ("description", "datasets")}
        layers.append((source, common))
        own = recipe.get("datasets", {}).get(cell.dataset)
        if own:
            layers.append((f"{source} [datasets.{cell.dataset}]", own))
    return layers


def has_dataset_variant(cell: Cell) -> bool:
    """Whether the recipe of `cell` has a table of its own for the cell's data set."""
    if cell.recipe == MLRC:
        return False
    return cell.dataset in read_recipe(cell.loss, cell.recipe).get("datasets", {})


def cell_description(cell: Cell) -> str:
    on = dataset_row(cell.dataset).title
    if cell.recipe == MLRC:
        return f"{loss_row(cell.loss).title} on {on}, MLRC protocol"
    return f"{read_recipe(cell.loss, cell.recipe)['description']} on {on}"


def renamed_for_dataset(cell: Cell, dataset: str) -> tuple[str, str]:
    """Name and description of `cell` run on another data set (a profile such as `embedded`
    changes it): named for the data it uses. Where the recipe had a table for the cell's own
    data set, the configuration still carries it: the name says whose
    (`proxy_nca_pp_sop_paper` on glyphs: `proxy_nca_pp_glyphs_paper_sop`)."""
    moved = Cell(cell.loss, dataset, cell.recipe)
    name, description = cell_name(moved), cell_description(moved)
    if has_dataset_variant(cell):
        name += f"_{dataset_row(cell.dataset).alias}"
        description += f", with its {dataset_row(cell.dataset).title} settings"
    return name, description
