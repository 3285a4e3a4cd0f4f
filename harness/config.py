"""Typed study configuration: dataclasses whose defaults ARE the MLRC protocol.

A study is a cell of the benchmark matrix (loss x data set x recipe, generated from the
registries by harness/benchmark.py: `proxy_anchor_cub`, `proxy_nca_pp_sop_paper`) or a study file
(studies/NAME.toml or any path) that says what differs from these defaults and may `extends` a
cell or another file. Layers are applied in this order, each one type-checked and rejecting
unknown keys:

    dataclass defaults (MLRC)  <-  data set  <-  loss  <-  recipe          (a cell)
                               <-  study file (after what it `extends`, then its `profile`)
                               <-  --profile FILE  <-  --set key=value  (repeatable)

Keys are dotted paths (``train.lr``, ``model.trunk``). Loss parameters are flat keys of the
``[loss]`` table (``loss.margin``); they are checked against the loss registry's defaults, so a
typo or a wrong type fails before anything trains. Dataset-dependent MLRC values (validation
interval, patience) default to 0 / -1, meaning "the dataset's MLRC value".
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
# Run folders go under runs/ (git-ignored) unless --output says otherwise; results/ holds the
# committed reference runs, each written there with an explicit --output (results/README.md).
RUNS_DIR = STUDIES_DIR.parent / "runs"
PROFILES_DIR = STUDIES_DIR / "profiles"


@dataclass
class DataConfig:
    dataset: str = "cub200"  # registry name: cub200, cars196, sop, inshop, glyphs
    root: str = ""  # "" = --data-root, else the glyphs cache for the embedded data set
    check_counts: bool = True  # refuse a data set whose image/class counts differ from the standard
    resize: int = 256  # MLRC: Resize 256 ...
    crop: int = 227  # ... then (Random|Center)Crop 227
    scale_min: float = 0.16  # RandomResizedCrop scale (0.16, 1)
    # MLRC: RandomResizedCrop for training. False: training images get the evaluation's
    # CenterCrop (the embedded glyphs, already augmented when rendered, with resize = crop).
    random_crop: bool = True
    num_workers: int = -1  # loader worker processes; -1 = CPU cores - 1 (max 8); 0 = none
    cache: bool = True  # decode + Resize(resize) every image once into a uint8 memmap cache
    cache_dir: str = ""  # "" = $HARNESS_CACHE/images or ~/.cache/harness/images
    glyph_classes: int = 256  # embedded glyph data only: number of classes rendered
    glyph_per_class: int = 32  # embedded glyph data only: images per class


@dataclass
class ModelConfig:
    trunk: str = "bninception"  # MLRC trunk; resnet18/resnet50/small_cnn also registered
    pretrained: bool = True  # ImageNet weights, from `weights` or the torch cache, never downloaded
    weights: str = ""  # local path of the weight file ("" = look in the torch hub cache)
    pooling: str = "avg"  # avg | max | avgmax
    layer_norm: bool = False  # LayerNorm before the embedder (ProxyNCA++ recipe)
    embedding_size: int = 128  # MLRC: 128-d per fold model (512-d when 4 are concatenated)
    freeze_bn: bool = True  # MLRC: trunk BatchNorm in eval mode, affine params still train
    # The trunk's first blocks kept as pretrained (no gradient, not updated): 0 = MLRC, the
    # whole trunk fine-tuned. small_cnn only (the embedded profile: docs/embedded.md).
    frozen_blocks: int = 0
    # Compute the frozen blocks' output once per image and train the rest of the model on it
    # (harness/frozen_features.py): the same training up to the last bits, 1.38x faster for
    # the embedded comparison. Needs frozen_blocks >= 1 and a deterministic input
    # (data.random_crop = false, a trunk without flips). false = every step runs the whole
    # trunk on images.
    cache_frozen_features: bool = False


@dataclass
class LossConfig:
    name: str = "proxy_anchor"  # loss registry name (losses/registry.py)
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the registry defaults


@dataclass
class TrainConfig:
    batch_size: int = 32  # MLRC batch 32 ...
    m_per_class: int = 4  # ... from an m-per-class sampler, m = 4
    # "mlrc": pml's MPerClassSampler without batch_size, as MLRC ran it: each pass shuffles all
    # classes and takes m images of each, so every class appears once per C*m/batch batches
    # (harness/sampler.py). "per_batch": every batch draws batch/m classes independently.
    sampler: str = "mlrc"
    optimizer: str = "rmsprop"  # rmsprop | adam | adamw | sgd, for trunk + embedder
    lr: float = 1e-6  # MLRC trunk/embedder lr
    momentum: float = 0.9  # RMSprop/SGD momentum
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8  # ProxyNCA++'s recipe uses Adam with eps = 1
    loss_optimizer: str = "rmsprop"  # own optimizer for loss parameters (proxies, class weights)
    loss_lr: float = 1e-4  # searched log-uniform in [1e-6, 1]; a large value = fast-moving proxies
    loss_weight_decay: float = 1e-4  # MLRC (with_metric_loss_optimizer_bayes_opt.yaml)
    iters_per_epoch: int = 100  # MLRC "epoch" = 100 iterations
    max_epochs: int = 1000
    val_every_epochs: int = 0  # 0 = the data set's MLRC value (CUB 2, Cars 5, SOP 20)
    patience: int = -1  # -1 = the data set's MLRC value (CUB 9, Cars 14, SOP 39)
    warmup_epochs: int = 0  # epochs with the trunk frozen: only embedder and loss params train
    grad_clip: float = 0.0  # clip gradient values of model params (0 = off); proxies never clipped
    amp: bool = False  # MLRC trains in float32; True = bf16 autocast on CUDA (opt-in)
    # MLRC trains in float32; True = TF32 (10-bit mantissa) matmuls and convolutions on CUDA
    # (Ampere and newer), which PyTorch would otherwise allow for convolutions (opt-in)
    tf32: bool = False
    channels_last: bool = False  # memory format on CUDA (opt-in; slower at batch 32, measured)
    # SoftTriple's center regulariser where two centers of a class coincide exactly (the square
    # root of 0): "mlrc" = the gradient of the PyTorch MLRC ran, whose clamp passed it on, so the
    # centers turn NaN and the trial scores 0, as in MLRC; "zero" = torch >= 2.14's gradient 0
    # there, training goes on, as in the official SoftTriple code (opt-in; the embedded
    # profile's). losses/sparse_centers_regularizer.py, docs/conformance.md.
    center_collapse_gradient: str = "mlrc"
    eval_batch_size: int = 128
    device: str = "auto"  # auto = cuda when available, else cpu


@dataclass
class SearchConfig:
    trials: int = 50  # MLRC: 50 trials per (loss, dataset); one trial = the full 4-fold CV
    folds: int = 4
    # MLRC: Ax's AxClient, Sobol start then GP-EI, every trial all folds, no pruning
    # (harness/search.py cites the files). "gp" = Sobol start then Optuna's GPSampler; "tpe"
    # and "random" and the pruners are faster, explicit opt-ins (not MLRC).
    sampler: str = "gp"  # gp | tpe | random
    n_startup_trials: int = -1  # quasi-random start; -1 = auto (gp: Ax's max(5, dims); tpe: 10)
    pruner: str = "none"  # none | median | hyperband
    prune_warmup_folds: int = 1  # never prune before this many folds reported
    # Extra or replaced search dimensions: {"loss.margin": {"low": 0, "high": 1}, ...}. The loss
    # registry's space and train.loss_lr (for losses with parameters) are always included.
    space: dict[str, Any] = field(default_factory=dict)
    # Searched keys that a study file, profile or --set gave a value: they are NOT searched (the
    # value given is used). Filled by load_study; listed in config.json and in the log.
    fixed: list[str] = field(default_factory=list)


@dataclass
class FinalConfig:
    reproductions: int = 10  # MLRC retrains the best configuration 10 times
    # MLRC also tests the best trial's own fold models and reports best + reproductions
    # (bayes_opt_runner.py: test_model(best), reproduce_results, create_accuracy_report).
    include_best_trial: bool = True
    keep_checkpoints: bool = True  # keep each final fold model's best checkpoint on disk
    # Not MLRC (an explicit opt-in): before the final step, train the search's `recheck_top` best
    # trials `recheck_runs` more times each (new seeds, all folds) and test the one whose fresh
    # runs score best on validation, not the one whose single search run did (harness/recheck.py).
    # 0 = MLRC: the search's best trial is tested.
    recheck_top: int = 0
    recheck_runs: int = 2


def recheck_budget(top: int, runs: int) -> dict[str, int]:
    """The recheck's part of a final step's budget (final/summary.json, embedded_comparison's
    records): its runs count only when it is on, so every MLRC-rule budget reads alike."""
    return {"recheck_top": top, "recheck_runs": runs if top else 0}


@dataclass
class StudyConfig:
    name: str = ""
    description: str = ""
    seed: int = 0  # base seed; trial, fold and reproduction seeds derive from it
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    final: FinalConfig = field(default_factory=FinalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = ("data", "model", "loss", "train", "search", "final")
TOP_LEVEL = ("name", "description", "seed")
STUDY_FILE_KEYS = ("extends", "profile")  # a study file's own keys (not a profile's, --set's)


# --------------------------------------------------------------------------------------------
# Type checking and coercion
# --------------------------------------------------------------------------------------------
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_cli_value(text: str) -> Any:
    """A --set value as written on the command line: JSON when it parses (numbers, true/false,
    lists, objects), else the raw string (so `model.trunk=resnet50` needs no quotes)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def coerce(value: Any, expected: Any, where: str) -> Any:
    """Return `value` as type `expected`, or raise ConfigError naming `where`.

    Accepts an int for a float (1 -> 1.0) and strings from the CLI ("1e-5", "true"); rejects
    everything else, in particular a float for an int and a string for a number.
    """
    origin = typing.get_origin(expected) or expected
    if isinstance(value, str) and origin in (int, float, bool):
        value = parse_cli_value(value)
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin in (dict, list, tuple):
        if isinstance(value, origin):
            return value
    elif expected is Any:
        return value
    name = getattr(expected, "__name__", str(expected))
    raise ConfigError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


def _loss_defaults(loss_name: str) -> dict[str, Any]:
    from losses.registry import get_loss_spec  # local import: losses is heavy and optional here

    try:
        return dict(get_loss_spec(loss_name).defaults)
    except ValueError as e:
        raise ConfigError(f"loss.name: {e} (a loss from your own code needs --loss "
                          f"MODULE:CLASS on every invocation)") from None


def set_value(cfg: StudyConfig, key: str, value: Any, source: str = "--set") -> None:
    """Set one dotted key on `cfg`, type-checked; unknown keys raise ConfigError."""
    parts = key.split(".")
    where = f"{source} {key}"
    if len(parts) == 1:
        if parts[0] not in TOP_LEVEL:
            raise ConfigError(f"{where}: unknown key. Top-level keys: {', '.join(TOP_LEVEL)}; "
                              f"sections: {', '.join(SECTIONS)}")
        setattr(cfg, parts[0], coerce(value, _field_types(StudyConfig)[parts[0]], where))
        return
    section, rest = parts[0], ".".join(parts[1:])
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    if section == "loss" and rest not in ("name", "params"):
        _set_loss_param(cfg, rest, value, where)
        return
    if section == "search" and rest.startswith("space."):
        cfg.search.space[rest[len("space."):]] = value
        return
    obj = getattr(cfg, section)
    types = _field_types(type(obj))
    if rest not in types:
        raise ConfigError(f"{where}: unknown key {rest!r} in [{section}]; "
                          f"known keys: {', '.join(types)}")
    new = coerce(value, types[rest], where)
    if section == "loss" and rest == "name" and new != cfg.loss.name:
        _loss_defaults(new)  # validate the name now
        cfg.loss.params = {}  # parameters of the previous loss do not carry over
    setattr(obj, rest, new)


def _set_loss_param(cfg: StudyConfig, param: str, value: Any, where: str) -> None:
    defaults = _loss_defaults(cfg.loss.name)
    if param not in defaults:
        raise ConfigError(f"{where}: loss {cfg.loss.name!r} has no parameter {param!r}; "
                          f"its parameters: {', '.join(sorted(defaults)) or '(none)'}")
    default = defaults[param]
    expected = type(default) if default is not None else Any
    cfg.loss.params[param] = coerce(value, expected, where)


def apply_table(cfg: StudyConfig, table: dict[str, Any], source: str) -> list[str]:
    """Apply a parsed TOML table (nested dicts) to cfg. `loss.name` goes first so that the
    loss parameters are checked against the right loss. Returns the dotted keys it set."""
    keys: list[str] = []
    for key in TOP_LEVEL:
        if key in table:
            set_value(cfg, key, table[key], source)
            keys.append(key)
    for key in table:
        if key not in TOP_LEVEL and key not in SECTIONS:
            raise ConfigError(f"{source}: unknown top-level key {key!r}; expected "
                              f"{', '.join(TOP_LEVEL + STUDY_FILE_KEYS)} or a section "
                              f"[{'] ['.join(SECTIONS)}]")
    for section in SECTIONS:
        sub = table.get(section)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: {section} must be a table [{section}]")
        if section == "loss" and "name" in sub:
            set_value(cfg, "loss.name", sub["name"], source)
            keys.append("loss.name")
        for key, value in sub.items():
            if section == "loss" and key == "name":
                continue
            if section == "search" and key == "space":
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: search.space must be a table")
                cfg.search.space.update(value)
                continue
            set_value(cfg, f"{section}.{key}", value, source)
            keys.append(f"{section}.{key}")
    return keys


# --------------------------------------------------------------------------------------------
# Studies: cells of the benchmark matrix and study files
# --------------------------------------------------------------------------------------------
def study_path(name: str) -> Path:
    """The study file `name` (a path to a .toml file, or studies/NAME.toml)."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    path = STUDIES_DIR / f"{name}.toml"
    if not path.exists():
        from harness.benchmark import dataset_by_name

        if dataset_by_name(name):
            raise ConfigError(f"{name!r} is a data set, not a study: name a cell such as "
                              f"proxy_anchor_{name}, or give your own loss with --loss "
                              f"MODULE:CLASS")
        close = difflib.get_close_matches(name, list_studies(), n=5)
        raise ConfigError(f"no study named {name!r}: no cell of the benchmark matrix "
                          f"(<loss>_<data set>[_paper], e.g. proxy_anchor_cub) and no {path}. "
                          f"{'Did you mean: ' + ', '.join(close) + '? ' if close else ''}"
                          f"python -m harness.run --list shows them all")
    return path


def study_files() -> list[str]:
    """Names of the study files in studies/ (one-offs such as quickstart, not the matrix)."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml") if not p.stem.startswith("_"))


def list_studies() -> list[str]:
    """Every study name: the matrix's cells (registry order), then the study files."""
    from harness.benchmark import cell_name, cells

    return [cell_name(c) for c in cells()] + study_files()


def find_cell(name: str):
    """The benchmark cell that study `name` means, or None for a study file or path. A file in
    studies/ that has a cell's name is refused: which one runs would be a guess."""
    from harness.benchmark import parse_cell_name

    if name.endswith(".toml") or "/" in name:
        return None
    cell = parse_cell_name(name)
    if cell is not None and (STUDIES_DIR / f"{name}.toml").exists():
        raise ConfigError(f"{STUDIES_DIR / name}.toml has the name of a generated benchmark "
                          f"cell; rename the file (or delete it: the cell exists without it)")
    return cell


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None


def _apply_study(cfg: StudyConfig, name: str, seen: tuple[Path, ...] = ()) -> list[str]:
    """Apply study `name` (cell or file) to cfg; returns the dotted keys it gave a value."""
    cell = find_cell(name)
    if cell is None:
        return _apply_study_file(cfg, study_path(name), seen)
    from harness.benchmark import cell_description, cell_layers

    keys = []
    for source, table in cell_layers(cell):
        keys += apply_table(cfg, table, source)
    cfg.description = cell_description(cell)
    return keys


def _apply_study_file(cfg: StudyConfig, path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    if path in seen:
        raise ConfigError(f"{path}: `extends` cycle: {' -> '.join(map(str, seen + (path,)))}")
    table = read_toml(path)
    keys = []
    if "extends" in table:
        keys = _apply_study(cfg, _text(table["extends"], f"{path}: extends"), seen + (path,))
    if "profile" in table:  # the file's own keys still override its profile's
        profile = _text(table["profile"], f"{path}: profile")
        keys += apply_table(cfg, read_toml(profile_path(profile)), f"{path}: profile {profile}")
    own = {k: v for k, v in table.items() if k not in STUDY_FILE_KEYS}
    return keys + apply_table(cfg, own, str(path))


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a name, got {value!r}")
    return value


def profile_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    path = PROFILES_DIR / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
        raise ConfigError(f"no profile named {name!r}: {path} does not exist. "
                          f"Known profiles: {', '.join(known) or '(none)'}")
    return path


def load_study(name: str, profile: str | None = None, overrides: list[str] = ()) -> StudyConfig:
    """Resolve a study: defaults <- cell or study file (and what it extends) <- profile <-
    overrides. A cell run on another data set (the `embedded` profile: glyphs) is named for it."""
    cfg = StudyConfig()
    cell = find_cell(name)
    explicit = _apply_study(cfg, name)
    if cell is not None:
        from harness.benchmark import cell_name

        cfg.name = cell_name(cell)  # the alias spelling, whichever spelling was given
    elif not cfg.name:
        cfg.name = study_path(name).stem
    if profile:
        explicit += apply_table(cfg, read_toml(profile_path(profile)), f"profile {profile}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-5")
        set_value(cfg, key.strip(), parse_cli_value(value.strip()) if value else value)
        explicit.append(key.strip())
    if cell is not None and cfg.data.dataset != cell.dataset:
        _name_for_dataset(cfg, cell, profile)
    validate(cfg)
    _fix_explicit_search_keys(cfg, set(explicit))
    return cfg


def _name_for_dataset(cfg: StudyConfig, cell, profile: str | None) -> None:
    """A cell that runs on another data set than its own is named and described for the data it
    uses (`proxy_anchor_cub --profile embedded` is `proxy_anchor_glyphs`): a name must never
    claim a data set the run did not see."""
    from harness.benchmark import renamed_for_dataset

    cfg.name, cfg.description = renamed_for_dataset(cell, cfg.data.dataset)
    if profile:
        cfg.description += f" (profile {Path(profile).stem})"


def searched_keys(cfg: StudyConfig) -> set[str]:
    """Every key the search would vary: the loss's space for this data set, the loss-parameter
    lr (losses with parameters) and the study's own `search.space` ranges."""
    from losses.registry import get_loss_spec

    spec = get_loss_spec(cfg.loss.name)
    try:
        keys = {f"loss.{k}" for k in spec.space_for(cfg.data.dataset)}
    except ValueError as e:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r}: {e}") from None
    if spec.has_parameters:
        keys.add("train.loss_lr")
    keys |= {k for k, v in cfg.search.space.items() if v not in ("fixed", None, False)}
    return keys


def _fix_explicit_search_keys(cfg: StudyConfig, explicit: set[str]) -> None:
    """A searched key given a value (study file, profile, --set) is fixed at that value: the
    search must never silently override what the user set. A key that a study both sets and
    lists as a range under [search.space] is ambiguous: refused."""
    ranged = {k for k, v in cfg.search.space.items() if v not in ("fixed", None, False)}
    both = sorted(explicit & ranged)
    if both:
        raise ConfigError(f"{', '.join(both)}: given a value AND a search range in "
                          f"[search.space]; remove one (a value fixes the key, a range "
                          f"searches it)")
    fixed = explicit & searched_keys(cfg)
    cfg.search.fixed = sorted(set(cfg.search.fixed) | fixed)


# --------------------------------------------------------------------------------------------
# Validation: names and value ranges
# --------------------------------------------------------------------------------------------
# A study name becomes a folder (runs/NAME) and the Optuna study name: no path separators,
# no "..", nothing a shell or a file system could misread.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_study_name(name: str) -> None:
    """ConfigError unless `name` is safe as a folder name (run folders are runs/NAME)."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"study name {name!r} is not allowed: it names the run folder (runs/NAME), so it "
            f"must start with a letter or digit and hold only letters, digits, '_', '.' and "
            f"'-' (at most 100 characters, no '..'). Rename the study file, or set "
            f"name = \"...\" in it, or pass --set name=NEW_NAME")


@dataclass(frozen=True)
class Bound:
    """The allowed range of one numeric config value; None = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False
    note: str = ""  # what the special values mean, shown in the error

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or
                                         (self.high_open and value == self.high))

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
AT_LEAST_ONE = Bound(1)

# Every int and float field of the config dataclasses (tests/test_faults_config.py checks that
# none is missing): values outside these ranges would fail later, deep inside torch or Optuna.
RANGES: dict[str, Bound] = {
    "seed": Bound(0, 2**32 - 1, note="Optuna's samplers take 32-bit seeds"),
    "data.resize": AT_LEAST_ONE,
    "data.crop": AT_LEAST_ONE,
    "data.scale_min": Bound(0, 1, low_open=True, note="RandomResizedCrop's smallest area"),
    "data.num_workers": Bound(-1, note="-1 = one per CPU core but one, 0 = none"),
    "data.glyph_classes": Bound(16, 256, note="the MLRC split needs 16 classes; 256 exist"),
    "data.glyph_per_class": Bound(2, note="retrieval needs another image of the class"),
    "model.embedding_size": AT_LEAST_ONE,
    "model.frozen_blocks": Bound(0, note="0 = the whole trunk fine-tuned (MLRC)"),
    "train.batch_size": AT_LEAST_ONE,
    "train.m_per_class": AT_LEAST_ONE,
    "train.lr": POSITIVE,
    "train.momentum": Bound(0, 1, high_open=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.adam_eps": POSITIVE,
    "train.loss_lr": POSITIVE,
    "train.loss_weight_decay": NON_NEGATIVE,
    "train.iters_per_epoch": AT_LEAST_ONE,
    "train.max_epochs": AT_LEAST_ONE,
    "train.val_every_epochs": Bound(0, note="0 = the data set's MLRC value"),
    "train.patience": Bound(-1, note="-1 = the data set's MLRC value"),
    "train.warmup_epochs": NON_NEGATIVE,
    "train.grad_clip": Bound(0, note="0 = off"),
    "train.eval_batch_size": AT_LEAST_ONE,
    "search.trials": AT_LEAST_ONE,
    "search.folds": Bound(1, 4, note="MLRC uses 4 folds"),
    "search.n_startup_trials": Bound(-1, note="-1 = auto: gp max(5, dims), tpe 10"),
    "search.prune_warmup_folds": NON_NEGATIVE,
    "final.reproductions": NON_NEGATIVE,
    "final.recheck_top": Bound(0, note="0 = MLRC: test the search's best trial"),
    "final.recheck_runs": AT_LEAST_ONE,
}


def get_value(cfg: StudyConfig, key: str) -> Any:
    """The value of dotted `key` (the reverse of set_value): `loss.<param>` is the study's value
    or the registry's default for its data set."""
    section, _, rest = key.partition(".")
    if section == "loss" and rest not in ("name", "params"):
        from losses.registry import get_loss_spec

        defaults = get_loss_spec(cfg.loss.name).defaults_for(cfg.data.dataset)
        return cfg.loss.params.get(rest, defaults.get(rest))
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_ranges(cfg: StudyConfig) -> None:
    """ConfigError naming the key, the value and the allowed range of the first value out of
    range (NaN and infinity are never allowed)."""
    for key, bound in RANGES.items():
        value = get_value(cfg, key)
        if not math.isfinite(value) or not bound.holds(value):
            note = f" ({bound.note})" if bound.note else ""
            raise ConfigError(f"{key}={value!r}: must be {bound.text()}{note}")
    d = cfg.data
    if d.crop > d.resize:
        raise ConfigError(f"data.crop={d.crop} is larger than data.resize={d.resize}: images are "
                          f"resized (shorter side) to data.resize, then cropped to data.crop, "
                          f"so crop must be <= resize")


def _check_frozen_feature_cache(cfg: StudyConfig) -> None:
    """model.cache_frozen_features holds one output per image: only right when the frozen
    blocks see the same input for an image at every step."""
    if not cfg.model.cache_frozen_features:
        return
    from harness.models import input_norm

    why = ""
    if cfg.model.frozen_blocks < 1:
        why = "model.frozen_blocks is 0: no block is frozen, so there is nothing to cache"
    elif cfg.data.random_crop:
        why = ("data.random_crop is true: each step draws another crop of an image, so its "
               "frozen blocks' output changes (set data.random_crop = false)")
    elif input_norm(cfg.model.trunk).hflip:
        why = (f"trunk {cfg.model.trunk!r} is trained on randomly flipped images, so an "
               f"image's frozen blocks' output changes between steps")
    if why:
        raise ConfigError(f"model.cache_frozen_features = true: {why}. Set "
                          f"model.cache_frozen_features = false to run the whole trunk on "
                          f"images at every step.")


def validate(cfg: StudyConfig) -> None:
    """Cross-field checks that single-key type checks cannot do."""
    check_study_name(cfg.name)
    check_ranges(cfg)
    t = cfg.train
    if t.batch_size % t.m_per_class:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                          f"train.m_per_class ({t.m_per_class})")
    # The registries are the one source of each list of names (imported here: they load torch
    # and the data-set readers, which `--list` and most config errors never need).
    from harness.datasets import DATASETS
    from harness.models import POOLINGS, TRUNKS
    from harness.train import OPTIMIZERS
    from losses.sparse_centers_regularizer import COLLAPSE_GRADIENTS

    choices = {
        "data.dataset": (cfg.data.dataset, tuple(DATASETS)),
        "model.trunk": (cfg.model.trunk, tuple(TRUNKS)),
        "train.optimizer": (t.optimizer, tuple(OPTIMIZERS)),
        "train.loss_optimizer": (t.loss_optimizer, tuple(OPTIMIZERS)),
        "model.pooling": (cfg.model.pooling, POOLINGS),
        "search.sampler": (cfg.search.sampler, ("gp", "tpe", "random")),
        "train.sampler": (t.sampler, ("mlrc", "per_batch")),
        "train.center_collapse_gradient": (t.center_collapse_gradient, COLLAPSE_GRADIENTS),
        "search.pruner": (cfg.search.pruner, ("none", "median", "hyperband")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    _check_frozen_feature_cache(cfg)
    if cfg.final.reproductions == 0 and not cfg.final.include_best_trial:
        raise ConfigError("final.reproductions=0 with final.include_best_trial=false leaves "
                          "nothing to test: allow one of them")
    if cfg.final.recheck_top == 1:
        raise ConfigError("final.recheck_top=1 rechecks the search's best trial alone, which "
                          "cannot change what is tested: use 0 (MLRC) or at least 2")
    _loss_defaults(cfg.loss.name)
