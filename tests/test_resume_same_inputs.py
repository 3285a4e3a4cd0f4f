"""A resumed run folder trains on what its earlier trials trained on: the same data (split
manifest with the data's fingerprint) and the same trunk weights (provenance's trunk hashes).
config.json names data.root and model.weights, not what they hold; without these checks a
changed folder or weight file would mix two setups in one search, with exit 0."""

from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import optuna
import pytest
import torch

from conftest import REPO, benchmark_script, load, write_study
from fake_datasets import make_fake_cub, make_fake_inshop, write_jpeg
from harness.config import StudyConfig
from harness.data import prepare_data
from harness.datasets.glyphs import write_npz_atomically
from harness.datasets.inshop import load_inshop
from harness.errors import ConfigError, WeightsError
from harness.models import SmallCNN
from harness.provenance import file_sha256, same_trunk, tensors_sha256
from harness.run import main
from harness.run_folder import check_same_data, check_same_trunk
from harness.search import check_trial_inputs
from harness.splits import manifest_differences, recorded_data_fingerprint, split_manifest


def cub_config(root) -> StudyConfig:
    cfg = StudyConfig()
    cfg.data.dataset, cfg.data.root, cfg.data.check_counts = "cub200", str(root), False
    return cfg


# ---------------------------------------------------------------------------------------------
# The data's fingerprint


def test_data_on_disk_keeps_its_fingerprint_when_moved_and_loses_it_when_changed(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_classes=16, per_class=2)
    before = split_manifest(*_records_and_split(root))
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "cub")
    assert split_manifest(*_records_and_split(moved)) == before

    replaced = shutil.copytree(root, tmp_path / "replaced" / "cub")
    (image,) = list((replaced / "images").glob("003.*/*.jpg"))[:1]
    write_jpeg(image, np.random.default_rng(5), size=12)  # another picture under the same name
    assert manifest_differences(before, split_manifest(*_records_and_split(replaced)))[0] \
        .startswith("data_fingerprint: ")

    # one image of class 3 gone from the listing: same classes, another data set
    for name in ("images.txt", "image_class_labels.txt"):
        lines = (moved / name).read_text().splitlines()
        (moved / name).write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    after = split_manifest(*_records_and_split(moved))
    found = manifest_differences(before, after)
    assert "num_images: 32 -> 31" in found
    assert any(f.startswith("data_fingerprint: ") for f in found)
    assert "fold 0: train_images 12 -> 11" in found


def test_the_same_in_shop_files_in_either_layout_are_the_same_data(tmp_path):
    """In-Shop is read from its archive's layout (Eval/, Img/img/) or a flat one (img/):
    the same files and labels, so the same fingerprint, whatever the root."""
    archive = make_fake_inshop(tmp_path / "a", archive_layout=True)
    flat = make_fake_inshop(tmp_path / "b", archive_layout=False)
    assert load_inshop(archive, check_counts=False).fingerprint() == \
        load_inshop(flat, check_counts=False).fingerprint()


def test_data_in_memory_is_fingerprinted_by_its_pixels(glyph_root):
    records = _glyph_records(glyph_root)
    print_ = records.fingerprint()
    assert records.fingerprint() == print_
    records.images = records.images.copy()
    records.images[7, 3, 3, 0] ^= 1  # one bit of one pixel
    assert records.fingerprint() != print_


def test_an_older_manifest_without_a_fingerprint_is_compared_on_the_rest(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_classes=16, per_class=2)
    now = split_manifest(*_records_and_split(root))
    older = copy.deepcopy({k: v for k, v in now.items() if k != "data_fingerprint"})
    assert manifest_differences(older, now) == []
    older["folds"][2]["val_classes"] = older["folds"][2]["val_classes"][::-1]
    assert manifest_differences(older, now) == [
        "fold 2: val_classes [2 classes] -> [2 classes] (other ones)"]
    assert manifest_differences(["not", "a", "manifest"], now) == [
        "the recorded manifest is not a JSON object"]
    other_formula = {**now, "data_fingerprint": "0" * 64, "data_fingerprint_version": 0}
    assert manifest_differences(other_formula, now) == []  # fingerprints not comparable
    assert recorded_data_fingerprint_of(other_formula, tmp_path) is None
    assert recorded_data_fingerprint_of(now, tmp_path) == now["data_fingerprint"]
    stub = {"dataset": "cub200", "data_fingerprint": now["data_fingerprint"]}
    assert "num_images: absent -> 32" in manifest_differences(stub, now)  # a torn file proves
    assert "folds: absent -> [4 classes]" in manifest_differences({}, now)  # nothing


def test_check_same_data_refuses_other_data_and_an_unreadable_manifest(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_classes=16, per_class=2)
    records, split = _records_and_split(root)
    manifest = split_manifest(records, split)
    out = tmp_path / "run"
    out.mkdir()
    check_same_data(out, manifest, records)  # a new folder: nothing to compare
    other = dict(manifest, data_fingerprint="0" * 64)
    (out / "split_manifest.json").write_text(json.dumps(other))
    where = re.escape(f"cub200 at {root}")
    with pytest.raises(ConfigError, match=rf"run on other data than {where} holds now "
                                          r"\(data_fingerprint: 000000000000\.\.\. -> "):
        check_same_data(out, manifest, records)
    (out / "split_manifest.json").write_text(json.dumps(manifest)[:50])  # torn
    with pytest.raises(ConfigError, match="unreadable.*delete the file to go on"):
        check_same_data(out, manifest, records)
    (out / "split_manifest.json").write_text(json.dumps(manifest))
    check_same_data(out, manifest, records)


# ---------------------------------------------------------------------------------------------
# The trunk's weights


def test_tensor_hash_ignores_how_the_file_was_written_but_not_one_weight(tmp_path):
    torch.manual_seed(0)
    state = SmallCNN().state_dict()
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "zip.pt").read_bytes() != (tmp_path / "legacy.pt").read_bytes()
    assert tensors_sha256(tmp_path / "zip.pt") == tensors_sha256(tmp_path / "legacy.pt")
    state["features.0.weight"][0, 0, 0, 0] += 1e-7
    torch.save(state, tmp_path / "changed.pt")
    assert tensors_sha256(tmp_path / "changed.pt") != tensors_sha256(tmp_path / "zip.pt")


def test_a_file_whose_tensors_cannot_be_hashed_is_a_clear_error(tmp_path):
    torch.save({"w": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    with pytest.raises(WeightsError, match="sparse.pt: its tensors cannot be hashed"):
        tensors_sha256(tmp_path / "sparse.pt")
    (tmp_path / "text.pt").write_text("not torch")
    with pytest.raises(WeightsError, match="not a readable torch weight file"):
        tensors_sha256(tmp_path / "text.pt")


def test_trunk_records_match_by_tensors_else_by_file():
    assert same_trunk({"sha256": "a", "tensors_sha256": "t"},
                      {"sha256": "b", "tensors_sha256": "t"})
    assert not same_trunk({"sha256": "a", "tensors_sha256": "t"},
                          {"sha256": "a", "tensors_sha256": "u"})
    assert same_trunk({"sha256": "a"}, {"sha256": "a", "tensors_sha256": "t"})
    assert not same_trunk({"sha256": "a"}, {"sha256": "b", "tensors_sha256": "t"})
    assert not same_trunk({"sha256": 7}, {"sha256": "b"})  # a damaged record matches nothing


def test_check_same_trunk_compares_with_every_earlier_invocation(tmp_path):
    now = {"file": "w.pt", "sha256": "b" * 64, "tensors_sha256": "t" * 64}
    check_same_trunk(tmp_path, now)  # no provenance yet
    runs = [{"command": "x"},  # from before trunks were recorded: nothing to compare
            {"trunk_weights": None},  # a run with no trunk found (preflight refused it)
            {"trunk_weights": {"file": "w.pt", "sha256": "a" * 64, "tensors_sha256": "t" * 64}}]
    (tmp_path / "provenance.json").write_text(json.dumps(runs))
    check_same_trunk(tmp_path, now)
    check_same_trunk(tmp_path, None)
    for damaged in ("[{", '{"a": 1}'):  # unreadable, or not the list harness.run writes
        (tmp_path / "provenance.json").write_text(damaged)
        with pytest.raises(ConfigError, match="damaged or foreign"):
            check_same_trunk(tmp_path, now)
    runs.append({"trunk_weights": {"file": "old.pt", "sha256": "c" * 64}})
    (tmp_path / "provenance.json").write_text(json.dumps(runs))
    with pytest.raises(ConfigError, match=r"other trunk weights: old\.pt \(file sha256 "
                                          r"cccccccccccc\.\.\.\) then, w\.pt \(file sha256 "
                                          r"bbbbbbbbbbbb\.\.\., tensors tttttttttttt\.\.\.\) now"):
        check_same_trunk(tmp_path, now)


def test_an_older_record_is_completed_from_its_file_when_that_is_still_there(tmp_path):
    """A folder from before tensor hashes names its file by bytes only: a rebuilt trunk with the
    same weights but other bytes resumes if the recorded file is still there to compare."""
    torch.manual_seed(0)
    state = SmallCNN().state_dict()
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(state, old, _use_new_zipfile_serialization=False)
    torch.save(state, new)
    record = {"file": str(old), "sha256": file_sha256(old)}
    (tmp_path / "provenance.json").write_text(json.dumps([{"trunk_weights": record}]))
    now = {"file": str(new), "sha256": file_sha256(new), "tensors_sha256": tensors_sha256(new)}
    check_same_trunk(tmp_path, now)
    old.write_bytes(old.read_bytes()[:-1] + b"x")  # the recorded file changed since: no proof
    with pytest.raises(ConfigError, match="other trunk weights"):
        check_same_trunk(tmp_path, now)
    old.unlink()
    with pytest.raises(ConfigError, match="other trunk weights"):
        check_same_trunk(tmp_path, now)


def test_trials_on_other_inputs_are_refused_whoever_ran_them():
    study = optuna.create_study(study_name="s", direction="maximize")
    mine = {"data_fingerprint": "d" * 64, "trunk_tensors_sha256": "t" * 64}
    for number, inputs in enumerate([mine, None, {"data_fingerprint": "d" * 64,
                                                   "trunk_tensors_sha256": None}]):
        study.add_trial(optuna.trial.create_trial(
            value=0.5, params={}, distributions={},
            user_attrs={"inputs": inputs} if inputs else {}))
    check_trial_inputs(study, mine)  # the same, unrecorded, or no trunk recorded
    check_trial_inputs(study, None)
    study.add_trial(optuna.trial.create_trial(
        value=0.5, params={}, distributions={},
        user_attrs={"inputs": {**mine, "data_fingerprint": "e" * 64}}))
    with pytest.raises(ConfigError, match=r"trials run on other inputs than this machine's "
                                          r"\(data_fingerprint: trials 3 recorded another"):
        check_trial_inputs(study, mine)


def test_record_trunk_tensors_completes_the_records_of_that_file_only(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "trunk.pt"
    torch.save(SmallCNN().state_dict(), weights)
    runs = [{"trunk_weights": {"file": "/gone/trunk.pt", "sha256": file_sha256(weights)}},
            {"trunk_weights": {"file": "/gone/other.pt", "sha256": "c" * 64}}, {"command": "x"}]
    (tmp_path / "provenance.json").write_text(json.dumps(runs))
    assert benchmark_script("record_trunk_tensors").record_tensors(tmp_path, weights) == 1
    after = json.loads((tmp_path / "provenance.json").read_text())
    assert after[0]["trunk_weights"]["tensors_sha256"] == tensors_sha256(weights)
    assert after[0]["trunk_weights"]["tensors_sha256_recorded_later"] is True
    assert after[1:] == runs[1:]
    assert benchmark_script("record_trunk_tensors").record_tensors(tmp_path, weights) == 0


def test_every_committed_run_folder_can_be_resumed_from_a_rebuilt_trunk(tmp_path):
    """The committed folders' trunk records name files that exist on no other machine; they
    record the tensors' hash, so a trunk rebuilt with those weights in other bytes resumes
    them (more_trials.py, embedded_comparison.py), and only it."""
    recorded: dict[str, set] = {}  # results that must share a trunk -> the trunks they name
    for number, provenance in enumerate(sorted((REPO / "results").rglob("provenance.json"))):
        runs = json.loads(provenance.read_text())
        trunks = [r["trunk_weights"] for r in runs if r.get("trunk_weights")]
        assert all(t.get("tensors_sha256") for t in trunks), provenance
        group = "recheck" if "recheck" in provenance.relative_to(REPO / "results").parts \
            else "the rest"
        recorded.setdefault(group, set()).update(t["tensors_sha256"] for t in trunks)
        folder = tmp_path / str(number)
        folder.mkdir(parents=True)
        shutil.copy(provenance, folder / "provenance.json")
        for tensors in {t["tensors_sha256"] for t in trunks}:
            check_same_trunk(folder, {"file": "/rebuilt.pt", "sha256": "f" * 64,
                                      "tensors_sha256": tensors})
        if trunks:
            with pytest.raises(ConfigError, match="other trunk weights"):
                check_same_trunk(folder, {"file": "/rebuilt.pt", "sha256": "f" * 64,
                                          "tensors_sha256": "e" * 64})
    # one glyph trunk behind every committed result, but results/embedded/recheck/, measured
    # on another CPU whose build differs (docs/embedded.md, "Not the same trunk on every CPU")
    assert {group: len(trunks) for group, trunks in recorded.items()} == \
        {"recheck": 1, "the rest": 1}


# ---------------------------------------------------------------------------------------------
# End to end: harness.run refuses, writes nothing, and resumes what is the same


@pytest.mark.slow
def test_resuming_on_other_glyph_pixels_is_refused_and_on_a_copy_goes_on(tmp_path, glyph_root,
                                                                        capsys):
    out = tmp_path / "run"
    study = write_study(tmp_path, glyph_root)
    args = ["--study", str(study), "--output", str(out), "--device", "cpu", "--trials", "1",
            "--stage", "search"]
    assert main(args) == 0
    recorded = (out / "split_manifest.json").read_text()
    config = (out / "config.json").read_text()
    invocations = len(json.loads((out / "provenance.json").read_text()))

    copy = shutil.copytree(glyph_root, tmp_path / "copy")  # the data moved: same fingerprint
    moved = write_study(_folder(tmp_path / "moved"), copy)  # the same study name, "tiny"
    assert main(["--study", str(moved), *args[2:]]) == 0
    assert len(load(out).get_trials()) == 1

    changed = _changed_glyphs(glyph_root, tmp_path / "changed")
    other = write_study(_folder(tmp_path / "other"), changed)
    assert main(["--study", str(other), *args[2:]]) == 2
    assert "was run on other data than glyphs at" in capsys.readouterr().err
    assert json.loads((out / "split_manifest.json").read_text()) == json.loads(recorded)
    assert len(json.loads((out / "provenance.json").read_text())) == invocations + 1
    assert (out / "config.json").read_text() != config  # the copy's data.root: it resumed
    resumed = (out / "config.json").read_text()
    assert main(["--study", str(other), *args[2:]]) == 2
    assert (out / "config.json").read_text() == resumed  # the refused run wrote nothing


def test_a_run_that_fails_preflight_writes_nothing_into_its_folder(tmp_path, glyph_root, capsys):
    """Preflight (here: a weight file that is not there) runs before config.json, provenance
    and the manifest are written: a failed start leaves no invocation on record."""
    study = write_study(tmp_path, glyph_root)
    study.write_text(study.read_text().replace(
        "pretrained = false", f'pretrained = true\nweights = "{tmp_path / "absent.pt"}"'))
    out = tmp_path / "run"
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not any(out.iterdir())


@pytest.mark.slow
def test_workers_check_the_data_before_writing_the_folders_config(tmp_path, glyph_root):
    """harness.workers writes config.json and creates the study before starting the workers:
    on other data it refuses first, as harness.run does."""
    from harness.workers import prepare

    out = tmp_path / "run"
    study = write_study(tmp_path, glyph_root)
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu", "--trials", "1",
                 "--stage", "search"]) == 0
    config = (out / "config.json").read_text()
    changed = _changed_glyphs(glyph_root, tmp_path / "changed")
    other = write_study(_folder(tmp_path / "other"), changed)
    with pytest.raises(ConfigError, match="was run on other data"):
        prepare(["--study", str(other), "--output", str(out), "--device", "cpu"])
    assert (out / "config.json").read_text() == config


@pytest.mark.slow
def test_resuming_from_other_trunk_weights_is_refused(tmp_path, glyph_root, capsys):
    torch.manual_seed(0)
    state = SmallCNN().state_dict()
    weights = tmp_path / "trunk.pt"
    torch.save(state, weights)
    study = write_study(tmp_path, glyph_root)
    study.write_text(study.read_text().replace(
        "pretrained = false", f'pretrained = true\nweights = "{weights}"'))
    out = tmp_path / "run"
    args = ["--study", str(study), "--output", str(out), "--device", "cpu", "--trials", "1",
            "--stage", "search"]
    assert main(args) == 0
    (record,) = [r["trunk_weights"] for r in json.loads((out / "provenance.json").read_text())]
    assert record["tensors_sha256"] == tensors_sha256(weights)

    torch.save(state, weights, _use_new_zipfile_serialization=False)  # same weights, new bytes
    assert main(args) == 0

    state["features.1.running_var"][0] *= 2
    torch.save(state, weights)
    assert main(args) == 2
    assert "run from other trunk weights" in capsys.readouterr().err
    assert len(json.loads((out / "provenance.json").read_text())) == 2


# ---------------------------------------------------------------------------------------------


def _records_and_split(root):
    data = prepare_data(cub_config(root))
    return data.records, data.split


def _glyph_records(glyph_root):
    cfg = StudyConfig()
    cfg.data.dataset, cfg.data.root = "glyphs", str(glyph_root)
    cfg.data.glyph_classes, cfg.data.glyph_per_class = 32, 8
    return prepare_data(cfg).records


def _folder(path):
    path.mkdir()
    return path


@pytest.mark.slow
def test_machines_sharing_a_database_but_not_a_folder_must_share_the_data(tmp_path, glyph_root,
                                                                          capsys):
    """Without a shared disk each machine has its own run folder (and manifest); the trials in
    the database say what they trained on, and a machine on other data is refused."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = write_study(tmp_path, glyph_root)
    args = ["--study", str(study), "--device", "cpu", "--storage", storage, "--stage", "search"]
    assert main([*args, "--output", str(tmp_path / "machine_a"), "--trials", "1"]) == 0

    changed = _changed_glyphs(glyph_root, tmp_path / "changed")
    other = write_study(_folder(tmp_path / "b"), changed)
    assert main(["--study", str(other), "--device", "cpu", "--storage", storage, "--stage",
                 "search", "--output", str(tmp_path / "machine_b"), "--trials", "2"]) == 2
    assert "trials run on other inputs than this machine's" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="tiny", storage=storage).get_trials()) == 1


def recorded_data_fingerprint_of(manifest: dict, folder):
    (folder / "m.json").write_text(json.dumps(manifest))
    return recorded_data_fingerprint(folder / "m.json")


def _changed_glyphs(glyph_root, copy):
    """A copy of the glyph cache with one bit of one pixel flipped (another renderer's output,
    say): its cache key still matches, so it is loaded as the same data set."""
    changed = shutil.copytree(glyph_root, copy)
    (cache,) = changed.glob("glyphs_*.npz")
    with np.load(cache, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["images"][0, 0, 0, 0] ^= 1
    write_npz_atomically(cache, arrays)
    return changed
