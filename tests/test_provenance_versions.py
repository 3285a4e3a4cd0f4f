"""A run folder resumed under another torch or pml than its earlier invocations says so (their
trials may differ numerically: torch 2.11 and 2.14 differ in SoftTriple's gradients); a damaged
provenance.json is a clear error, not a traceback."""

from __future__ import annotations

import json

import pytest

from harness.errors import HarnessError
from harness.run import _log_invocation, main, mixed_versions_note
from conftest import write_study

OLD = {"torch": "2.11.0", "pytorch-metric-learning": "2.9.0"}
NEW = {"torch": "2.14.1", "pytorch-metric-learning": "2.9.0"}


@pytest.mark.parametrize("earlier, noted", [
    ([], False),  # a new folder
    ([{"versions": NEW}], False),
    ([{"versions": {**NEW, "torch": "2.14.1+cu130"}}], False),  # another build, same release
    ([{"versions": OLD}], True),
    ([{"versions": NEW}, {"versions": OLD}], True),
    ([{"command": "x"}, "not a record"], False),  # nothing recorded to compare with
])
def test_a_new_torch_or_pml_in_a_folder_is_noted(tmp_path, earlier, noted):
    note = mixed_versions_note(tmp_path, earlier, NEW)
    assert bool(note) == noted
    if noted:
        assert "torch 2.11.0, pytorch-metric-learning 2.9.0" in note
        assert "this invocation runs torch 2.14.1" in note


def test_resuming_under_another_torch_prints_the_note(tmp_path, glyph_root, capsys):
    out = tmp_path / "tiny_glyphs"
    argv = ["--study", str(write_study(tmp_path, glyph_root)), "--output", str(out),
            "--device", "cpu", "--stage", "search"]
    assert main(argv) == 0
    assert "was run before with" not in capsys.readouterr().out
    runs = json.loads((out / "provenance.json").read_text())
    runs[0]["versions"]["torch"] = "2.11.0"
    (out / "provenance.json").write_text(json.dumps(runs))
    assert main(argv) == 0  # the search is complete: nothing trains, the note is printed
    assert "was run before with torch 2.11.0" in capsys.readouterr().out
    assert len(json.loads((out / "provenance.json").read_text())) == 2


@pytest.mark.parametrize("text", ["{", "{}", "3"])
def test_a_damaged_provenance_file_is_a_clear_error_and_kept(tmp_path, text):
    (tmp_path / "provenance.json").write_text(text)
    with pytest.raises(HarnessError, match="provenance.json: not the harness's record"):
        _log_invocation(tmp_path, None, "sqlite:///x.db", None)
    assert (tmp_path / "provenance.json").read_text() == text


def test_hardware_names_the_processor_and_its_vector_instructions(monkeypatch, tmp_path):
    """The glyph trunk's weights differ between an Intel and an AMD CPU (docs/embedded.md): a
    run records which processor and which of torch's CPU kernels (AVX2, AVX512, ...) it ran."""
    import harness.provenance as provenance

    info = provenance.hardware()
    assert isinstance(info["cpu_model"], str) and info["cpu_capability"] in (
        "DEFAULT", "NO AVX", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n")
    real_path = provenance.Path
    monkeypatch.setattr(provenance, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo"
                        else real_path(p))
    assert provenance.cpu_model() == "AMD EPYC 9R14"
    monkeypatch.setattr(provenance, "Path", lambda p: tmp_path / "absent")
    monkeypatch.setattr(provenance.platform, "processor", lambda: "arm")
    assert provenance.cpu_model() == "arm"
