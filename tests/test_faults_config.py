"""Config values that would fail later inside torch or Optuna, and study names that would write
outside results/, are refused when the config is read: one `error:` line, exit 2, nothing
trained and no run folder created."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from harness import config
from harness.errors import ConfigError
from harness.run import main

BAD_VALUES = [
    ("train.lr", "-0.001"), ("train.lr", "0"), ("train.lr", "NaN"), ("train.lr", "Infinity"),
    ("train.loss_lr", "0"), ("train.loss_lr", "-1"),
    ("train.momentum", "1"), ("train.momentum", "-0.1"),
    ("train.weight_decay", "-1e-4"), ("train.loss_weight_decay", "-1"), ("train.adam_eps", "0"),
    ("train.eval_batch_size", "0"), ("train.batch_size", "0"), ("train.m_per_class", "0"),
    ("train.iters_per_epoch", "0"), ("train.max_epochs", "-1"),
    ("train.patience", "-2"), ("train.val_every_epochs", "-1"), ("train.warmup_epochs", "-1"),
    ("train.grad_clip", "-1"),
    ("data.scale_min", "1.5"), ("data.scale_min", "0"), ("data.resize", "16"),
    ("data.resize", "0"), ("data.crop", "0"), ("data.num_workers", "-2"),
    ("data.glyph_classes", "8"), ("data.glyph_classes", "1000"), ("data.glyph_per_class", "1"),
    ("model.embedding_size", "0"),
    ("search.trials", "0"), ("search.folds", "5"), ("search.n_startup_trials", "-2"),
    ("search.prune_warmup_folds", "-1"), ("final.reproductions", "-1"),
    ("seed", "-1"), ("seed", str(2**32)),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_impossible_value_is_one_clear_error_before_anything_runs(tmp_path, capsys, key, value):
    out = tmp_path / "run"
    assert main(["--study", "quickstart", "--set", f"{key}={value}", "--output", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    shown = "data.crop" if key == "data.resize" and value == "16" else key
    assert shown in err and ("must be" in err or "larger than" in err)
    assert "Traceback" not in err
    assert not out.exists()  # nothing written, nothing trained


def test_message_names_key_value_and_range():
    with pytest.raises(ConfigError, match=r"train\.momentum=1\.0: must be in \[0, 1\)"):
        config.load_study("quickstart", overrides=["train.momentum=1"])
    with pytest.raises(ConfigError, match=r"data\.scale_min=1\.5: must be in \(0, 1\]"):
        config.load_study("quickstart", overrides=["data.scale_min=1.5"])
    with pytest.raises(ConfigError, match=r"data\.crop=64 is larger than data\.resize=32"):
        config.load_study("quickstart", overrides=["data.crop=64"])


def test_every_numeric_config_field_has_a_range():
    """A numeric field added later without a range would let impossible values through."""
    numeric = []
    for prefix, cls in [("", config.StudyConfig)] + [
            (f"{s}.", type(getattr(config.StudyConfig(), s))) for s in config.SECTIONS]:
        for name, hint in typing.get_type_hints(cls).items():
            if hint in (int, float) and name in {f.name for f in dataclasses.fields(cls)}:
                numeric.append(prefix + name)
    assert sorted(set(numeric) - set(config.RANGES)) == []


def test_defaults_and_studies_pass_the_ranges():
    config.check_ranges(config.StudyConfig(name="x"))
    for name in config.list_studies():
        config.load_study(name)


# ----------------------------------------------------------------------------------- case F
ESCAPES = ["../../escape", "../x", "a/b", "..", ".hidden", "a..b", "x" * 101, "", "sp ace"]


@pytest.mark.parametrize("name", ESCAPES)
def test_study_name_from_set_cannot_leave_results(tmp_path, capsys, name):
    assert main(["--study", "quickstart", "--set", f"name={name}", "--device", "cpu",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study name") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_study_name_from_the_study_file_cannot_leave_results(tmp_path, capsys):
    study = tmp_path / "evil.toml"
    study.write_text('extends = "quickstart"\nname = "../../outside"\n')
    assert main(["--study", str(study), "--device", "cpu"]) == 2
    assert "study name '../../outside'" in capsys.readouterr().err
    dotted = tmp_path / "..sneaky.toml"  # no name inside: the file's stem becomes the name
    dotted.write_text('extends = "quickstart"\n')
    assert main(["--study", str(dotted), "--device", "cpu"]) == 2
    assert "study name '..sneaky'" in capsys.readouterr().err


def test_ordinary_names_and_toml_paths_are_accepted(tmp_path):
    study = tmp_path / "my_study-1.v2.toml"
    study.write_text('extends = "quickstart"\n')
    assert config.load_study(str(study)).name == "my_study-1.v2"
    assert config.load_study("quickstart", overrides=["name=Run_2"]).name == "Run_2"
