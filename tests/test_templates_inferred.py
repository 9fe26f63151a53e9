"""A model that ships no chat template gets its family's, inferred from its vocabulary, with
BOS exactly when its tokenizer adds one; the store records that the template was inferred."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxserve.prompts import render_chat
from modelstore import mediatypes
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.store import ModelStore
from modelstore.templates import NO_TEMPLATE_WARNING
from tests.chat_helpers import chat_request
from tests.fixtures.family_ggufs import CASES, make_family_gguf

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]
EXPECTED = {
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
    "<start_of_turn>model\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Bye [/INST]",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\n",
}
"""Each family's own format; BOS in front for Gemma, Llama 3 and Mistral (whose tokenizers add
it: Mistral's by llama.cpp's SPM default), none for the ChatML model (``add_bos_token`` false)."""
SPECIALS = {
    "gemma": ("<bos>", "<eos>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "chatml": ("<|endoftext|>", "<|im_end|>"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_a_template_less_gguf_renders_its_family_format(
    family: str, tmp_path: Path, store: ModelStore
) -> None:
    path = make_family_gguf(tmp_path / f"{family}.gguf", CASES[family])
    result = import_path(store, path, f"{family}:test")
    assert result.warnings and f"a {family} template was inferred" in result.warnings[0]
    model = open_model(store, f"{family}:test")
    assert model.chat_template is not None
    bos, eos = SPECIALS[family]
    prompt = render_chat(model.chat_template, CONVERSATION, bos_token=bos, eos_token=eos)
    assert prompt == EXPECTED[family]
    config = store.config(store.resolve(f"{family}:test"))
    assert config.template_source == f"inferred:{family}"


def test_a_model_with_no_recognisable_vocabulary_warns_and_stores_no_template(
    tmp_path: Path, store: ModelStore
) -> None:
    path = make_family_gguf(tmp_path / "plain.gguf", CASES["unknown"])
    result = import_path(store, path, "plain:test")
    assert result.warnings == [NO_TEMPLATE_WARNING]
    stored = store.resolve("plain:test")
    assert not stored.manifest.layers_of(mediatypes.CHAT_TEMPLATE)
    assert store.config(stored).template_source == "none"


def test_the_vocabulary_gives_capabilities_and_model_info(
    tmp_path: Path, store: ModelStore
) -> None:
    path = make_family_gguf(tmp_path / "qwen.gguf", CASES["chatml"])
    import_path(store, path, "qwen:test")
    config = store.config(store.resolve("qwen:test"))
    assert config.features == ["thinking", "insert"]
    assert config.fim_tokens == {
        "prefix": "<|fim_prefix|>",
        "suffix": "<|fim_suffix|>",
        "middle": "<|fim_middle|>",
    }
    info = config.model_info
    assert info["general.architecture"] == "qwen2"
    assert info["qwen2.context_length"] == 8192
    assert info["qwen2.attention.head_count_kv"] == 1
    assert info["qwen2.vocab_size"] == len(CASES["chatml"].tokens)


def test_a_model_that_ships_a_template_keeps_it_unmarked(tiny_store: ModelStore) -> None:
    config = tiny_store.config(tiny_store.resolve("tiny:gguf"))
    assert config.template_source is None
    assert config.chat_template and "<|im_start|>" in config.chat_template


def test_a_base_gguf_chats_in_its_inferred_format_with_bos_in_llama_cpp(
    tmp_path: Path, store: ModelStore
) -> None:
    """End to end in a real runner: the tiny model without a template, whose tokenizer adds
    BOS, gets ChatML (its vocabulary has ``<|im_start|>``) and exactly one BOS token."""
    import asyncio

    from mlxserve.chat.model import LoadedModel
    from tests.fixtures.tiny_models import BOS_ID, BOS_TOKEN, IM_START, make_tiny_gguf

    path = make_tiny_gguf(tmp_path / "base.gguf", chat_template=None, add_bos=True)
    import_path(store, path, "base:test")

    async def tokens() -> tuple[str, list[int]]:
        loaded = await LoadedModel.load(store, "base:test", "llamacpp")
        try:
            request = chat_request(loaded, [{"role": "user", "content": "Hi"}], {})
            return request.prompt or "", request.prompt_tokens or []
        finally:
            await loaded.unload()

    prompt, ids = asyncio.run(tokens())
    assert prompt == f"{BOS_TOKEN}{IM_START}user\nHi<|im_end|>\n{IM_START}assistant\n"
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1


def test_an_hf_folder_without_a_template_gets_one_from_its_tokenizer_files(
    mini_hf_folder: Path, store: ModelStore
) -> None:
    import json

    (mini_hf_folder / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<|begin_of_text|>"})
    )
    added = [
        {"id": i, "content": t, "special": True}
        for i, t in enumerate(
            ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        )
    ]
    (mini_hf_folder / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "model": {"vocab": {}}, "added_tokens": added})
    )
    result = import_path(store, mini_hf_folder, "hf:test")
    assert "llama3 template was inferred" in result.warnings[0]
    template = open_model(store, "hf:test").chat_template or ""
    assert template.startswith("{{ bos_token }}") and "<|start_header_id|>" in template


def test_mlxctl_import_and_show_warn_and_show_the_inferred_template(tmp_path: Path) -> None:
    from tests.cli import mlxctl

    home = tmp_path / "home"
    path = make_family_gguf(tmp_path / "gemma.gguf", CASES["gemma"])  # metadata, no weights
    imported = mlxctl("import", str(path), "--name", "gemma:cli", "--no-trial", home=home)
    assert "warning:" in imported.stdout and "gemma template was inferred" in imported.stdout
    shown = mlxctl("show", "gemma:cli", home=home).stdout
    assert "template (inferred)" in shown and "<start_of_turn>model" in shown
    assert "mlxserve.template.jinja (inferred)" in shown
