"""ModelSpec: schema errors with locations, semantic checks, build, pack determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelstore import mediatypes
from modelstore.default_model import DEFAULT_MODEL, DEFAULT_SPEC, ensure_default_model
from modelstore.errors import SpecValidationError
from modelstore.ocilayout import pack
from modelstore.runtime import open_model
from modelstore.spec import SCHEMA_PATH, build_draft, load_spec

BAD_SPEC = """\
name: mymodel:1
from: ./mini-model
format: safetensors
parameters:
  temperature: hot
  top_k: -1
  colour: blue
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_schema_is_committed_where_the_issue_says():
    root = Path(__file__).resolve().parents[1]
    assert root / "modelstore/data/modelspec.schema.json" == SCHEMA_PATH
    assert json.loads(SCHEMA_PATH.read_text())["type"] == "object"


def test_every_schema_error_is_reported_with_pointer_and_line(tmp_path, mini_hf_folder):
    spec = load_spec(write(mini_hf_folder.parent / "bad.yaml", BAD_SPEC))
    found = {(p.pointer, p.line) for p in spec.problems}
    assert found == {
        ("/format", 3),
        ("/parameters/temperature", 5),
        ("/parameters/top_k", 6),
        ("/parameters", 4),
    }
    assert any("colour" in p.message for p in spec.problems)


def test_missing_from_is_reported(tmp_path):
    spec = load_spec(write(tmp_path / "s.yaml", "name: x\n"))
    assert [(p.pointer, p.line) for p in spec.problems] == [("", 1)]
    assert "'from' is a required property" in spec.problems[0].message


def test_broken_yaml_reports_its_line(tmp_path):
    spec = load_spec(write(tmp_path / "s.yaml", "from: ./x\nparameters: [\n  a: b\n"))
    assert spec.problems and spec.problems[0].line is not None


def test_missing_files_and_bad_template_are_reported(tmp_path):
    text = "from: ./nowhere\ntemplate: |\n  {% for m in messages %}\n  {{ m }\n"
    spec = load_spec(write(tmp_path / "s.yaml", text))
    by_pointer = {p.pointer: p for p in spec.problems}
    assert set(by_pointer) == {"/from", "/template"}
    assert by_pointer["/from"].line == 1
    assert by_pointer["/template"].line == 2
    assert "does not compile" in by_pointer["/template"].message


def test_json_specs_are_accepted(tmp_path, mini_hf_folder):
    path = write(mini_hf_folder.parent / "s.json", json.dumps({"from": "./mini-model"}))
    assert load_spec(path).problems == []


def test_build_applies_template_parameters_system_and_license(store, mini_hf_folder):
    text = (
        "name: mine:1\nfrom: ./mini-model\nformat: mlx\ntemplate: '{{ messages }}'\n"
        "system: Be brief.\nlicense: MIT\nparameters:\n  temperature: 0.1\n  stop: END\n"
    )
    spec = load_spec(write(mini_hf_folder.parent / "s.yaml", text))
    model = store.commit(build_draft(spec, store), "mine:1").model
    local = open_model(store, "mine:1")
    assert local.chat_template == "{{ messages }}"
    assert local.system == "Be brief."
    assert local.license == "MIT"
    assert local.parameters == {"temperature": 0.1, "stop": ["END"]}
    assert store.config(model).license == "MIT"


def test_format_that_contradicts_the_source_is_refused(store, mini_hf_folder):
    spec = load_spec(write(mini_hf_folder.parent / "s.yaml", "from: ./mini-model\nformat: gguf\n"))
    with pytest.raises(SpecValidationError):
        build_draft(spec, store)


def test_spec_can_build_on_a_model_in_the_store(store, mini_hf_folder):
    store.commit(
        build_draft(load_spec(write(mini_hf_folder.parent / "a.yaml", "from: ./mini-model\n"))),
        "base:1",
    )
    spec = load_spec(
        write(mini_hf_folder.parent / "b.yaml", "from: model://base:1\nsystem: You are terse.\n")
    )
    model = store.commit(build_draft(spec, store), "derived:1").model
    assert model.manifest.layers_of(mediatypes.SYSTEM_PROMPT)
    assert store.verify() == []


def test_packing_the_same_spec_twice_gives_the_same_bytes(tmp_path):
    spec = load_spec(DEFAULT_SPEC)
    first = pack(build_draft(spec), DEFAULT_MODEL, tmp_path / "one.tar")
    second = pack(build_draft(spec), DEFAULT_MODEL, tmp_path / "two.tar")
    assert first.digest == second.digest


def test_default_model_is_imported_on_first_use(store):
    model = ensure_default_model(store)
    assert model.name == DEFAULT_MODEL
    again = ensure_default_model(store)
    assert again.manifest_digest == model.manifest_digest
    assert store.config(model).quantization == "Q4_1"


@pytest.mark.parametrize("key", ["template_file", "license_file"])
@pytest.mark.parametrize("where", ["/etc/passwd", "../outside.txt", "./link.txt"])
def test_template_and_license_files_must_be_in_the_specs_folder(
    tmp_path, mini_hf_folder, key, where
):
    """Issue 21: ``/api/show`` serves these texts, so a spec may not read any file it names
    (a symlink in the folder pointing out of it included)."""
    folder = tmp_path / "spec"
    folder.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    (folder / "link.txt").symlink_to(tmp_path / "outside.txt")
    text = f"from: {mini_hf_folder}\n{key}: {where}\n"
    spec = load_spec(write(folder / "s.yaml", text))
    messages = [p.message for p in spec.problems if p.pointer == f"/{key}"]
    assert any("must be a file in the ModelSpec's folder" in m for m in messages), spec.problems


def test_a_license_file_in_the_specs_folder_is_stored(store, mini_hf_folder):
    (mini_hf_folder.parent / "docs").mkdir()
    (mini_hf_folder.parent / "docs" / "LICENSE").write_text("MIT")
    text = "from: ./mini-model\nformat: mlx\nlicense_file: docs/LICENSE\n"
    spec = load_spec(write(mini_hf_folder.parent / "s.yaml", text))
    assert spec.problems == []
    assert open_model(store, store.commit(build_draft(spec, store), "lic:1").model.name).license
