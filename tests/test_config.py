"""Study files, profiles and --set overrides: typed, strict, layered."""

import pytest

from harness.config import StudyConfig, coerce, list_studies, load_study, set_value
from harness.errors import ConfigError


def test_defaults_are_mlrc():
    cfg = StudyConfig()
    assert (cfg.train.batch_size, cfg.train.m_per_class) == (32, 4)
    assert cfg.train.optimizer == "rmsprop" and cfg.train.lr == 1e-6
    assert cfg.train.momentum == 0.9 and cfg.train.weight_decay == 1e-4
    assert cfg.model.trunk == "bninception" and cfg.model.embedding_size == 128
    assert cfg.model.freeze_bn and cfg.train.iters_per_epoch == 100
    assert (cfg.data.resize, cfg.data.crop, cfg.data.scale_min) == (256, 227, 0.16)
    assert cfg.search.trials == 50 and cfg.search.folds == 4
    assert cfg.final.reproductions == 10


def test_set_is_type_checked():
    cfg = StudyConfig()
    set_value(cfg, "train.lr", "1e-5")
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    set_value(cfg, "train.lr", 1)  # an int is a valid float
    assert cfg.train.lr == 1.0
    set_value(cfg, "model.freeze_bn", "false")
    assert cfg.model.freeze_bn is False
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        set_value(cfg, "train.batch_size", 3.5)
    with pytest.raises(ConfigError, match="expected float"):
        set_value(cfg, "train.lr", "fast")
    with pytest.raises(ConfigError, match="expected bool"):
        set_value(cfg, "model.freeze_bn", 1)


def test_unknown_keys_are_rejected_with_the_known_ones():
    cfg = StudyConfig()
    with pytest.raises(ConfigError, match="unknown key 'lrate'.*known keys:.*lr"):
        set_value(cfg, "train.lrate", 0.1)
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        set_value(cfg, "trian.lr", 0.1)
    with pytest.raises(ConfigError, match="has no parameter 'marg'.*margin"):
        set_value(cfg, "loss.marg", 0.1)


def test_loss_params_checked_against_registry():
    cfg = StudyConfig()
    set_value(cfg, "loss.name", "proxy_anchor")
    set_value(cfg, "loss.margin", "0.2")
    assert cfg.loss.params == {"margin": 0.2}
    with pytest.raises(ConfigError, match="loss.margin"):
        set_value(cfg, "loss.margin", "wide")
    set_value(cfg, "loss.name", "normalized_softmax")  # params of the old loss are dropped
    assert cfg.loss.params == {}
    with pytest.raises(ConfigError, match="loss.name"):
        set_value(cfg, "loss.name", "no_such_loss")


def test_coerce_rejects_float_for_int_and_bool_for_number():
    assert coerce("4", int, "x") == 4
    with pytest.raises(ConfigError):
        coerce(True, int, "x")
    with pytest.raises(ConfigError):
        coerce(2.0, int, "x")


def test_every_study_file_resolves():
    names = list_studies()
    assert "quickstart" in names
    for name in names:
        cfg = load_study(name)
        assert cfg.name == name


def test_every_study_resolves_under_the_embedded_profile():
    for name in list_studies():
        cfg = load_study(name, profile="embedded")
        assert cfg.data.dataset == "glyphs" and cfg.model.trunk == "small_cnn"


def test_layering_and_cli_overrides(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('description = "base"\n[loss]\nname = "proxy_anchor"\nmargin = 0.2\n'
                    '[train]\nlr = 1e-4\n')
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{base}"\n[train]\nbatch_size = 64\n')
    cfg = load_study(str(child), overrides=["train.lr=3e-4", "loss.alpha=16"])
    assert cfg.loss.params == {"margin": 0.2, "alpha": 16.0}
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 64
    assert cfg.description == "base"


def test_bad_study_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no study named 'nope'"):
        load_study("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_study(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trainer]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'trainer'"):
        load_study(str(unknown))
    cyc = tmp_path / "cyc.toml"
    cyc.write_text(f'extends = "{cyc}"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_study(str(cyc))
    with pytest.raises(ConfigError, match="key=value"):
        load_study("quickstart", overrides=["train.lr"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="multiple of"):
        load_study("quickstart", overrides=["train.batch_size=30"])
    with pytest.raises(ConfigError, match="model.pooling='mean'"):
        load_study("quickstart", overrides=["model.pooling=mean"])
