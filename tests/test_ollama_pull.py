"""``mlxctl pull ollama://...`` against a real registry holding manifests in Ollama's shape.

Ollama's public registry is unreachable here; it speaks the same OCI distribution API, so a
local ``docker-registry`` holding a Docker v2 manifest with Ollama's media types and config
blob (as ``ollama push`` writes them) stands in for it.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from modelstore import mediatypes
from modelstore.store import ModelStore
from tests.cli import mlxctl
from tests.fixtures.ollama_store import (
    DOCKER_MANIFEST,
    SYSTEM,
    digest_of,
    manifest_for,
    ollama_config,
    ollama_layers,
)
from tests.registry import Registry, registry_binary

pytestmark = [
    pytest.mark.registry,
    pytest.mark.skipif(
        registry_binary() is None,
        reason="docker-registry is not installed (scripts/install-system-deps.sh installs it)",
    ),
]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    running = Registry(tmp_path_factory.mktemp("ollama-registry")).start()
    yield running
    running.stop()


def upload(host: str, repository: str, data: bytes) -> None:
    """A monolithic blob upload (POST, then PUT with the digest), as the OCI spec allows."""
    start = urllib.request.Request(
        f"http://{host}/v2/{repository}/blobs/uploads/", method="POST", data=b""
    )
    with urllib.request.urlopen(start) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = f"http://{host}{location}"
    separator = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{separator}digest={digest_of(data)}",
        method="PUT",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    urllib.request.urlopen(put).close()


def push_ollama_shaped(host: str, repository: str, tag: str, gguf: Path) -> bytes:
    described = []
    for media_type, content in ollama_layers(gguf):
        data = content.read_bytes() if isinstance(content, Path) else content
        upload(host, repository, data)
        described.append((media_type, digest_of(data), len(data)))
    config = ollama_config()
    upload(host, repository, config)
    manifest = manifest_for(described, config)
    request = urllib.request.Request(
        f"http://{host}/v2/{repository}/manifests/{tag}",
        method="PUT",
        data=manifest,
        headers={"Content-Type": DOCKER_MANIFEST},
    )
    urllib.request.urlopen(request).close()
    return manifest


def test_pull_maps_ollama_layers_and_verifies(registry, store_home, tiny_models):
    push_ollama_shaped(registry.host, "library/tiny", "q8", tiny_models.gguf_path)
    url = f"ollama://{registry.host}/library/tiny:q8"
    pulled = json.loads(mlxctl("pull", "--insecure", url, "--json", home=store_home).stdout)
    assert pulled["name"] == "tiny:q8"
    store = ModelStore(store_home)
    model = store.resolve("tiny:q8")
    (weights,) = model.manifest.layers_of(mediatypes.WEIGHTS_GGUF)
    assert weights.digest == digest_of(tiny_models.gguf_path.read_bytes())
    shown = json.loads(mlxctl("show", "tiny:q8", "--json", home=store_home).stdout)
    assert shown["system"] == SYSTEM
    assert shown["parameters"]["context_length"] == 4096
    assert store.config(model).source == {
        "kind": "ollama",
        "name": f"{registry.host}/library/tiny:q8",
    }
    assert mlxctl("verify", home=store_home).returncode == 0
    again = json.loads(
        mlxctl("pull", "--insecure", url, "--json", "--name", "again:1", home=store_home).stdout
    )
    assert again["digest"] == pulled["digest"]  # same layers, same manifest: round trip


def test_a_blob_the_registry_serves_wrong_is_refused(registry, store_home, tiny_models):
    push_ollama_shaped(registry.host, "library/broken", "1", tiny_models.gguf_path)
    data = registry.blob_data(digest_of(tiny_models.gguf_path.read_bytes()))
    original = data.read_bytes()
    try:
        data.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        result = mlxctl(
            "pull",
            "--insecure",
            f"ollama://{registry.host}/library/broken:1",
            home=store_home,
            check=False,
        )
    finally:
        data.write_bytes(original)
    assert result.returncode != 0 and "digest_mismatch" in result.stderr
    assert ModelStore(store_home).list() == []


def test_the_daemon_pulls_ollama_urls_too(registry, store_home, tiny_models):
    """``/api/pull`` with the real ``ollama`` client, as ``ollama pull`` would send it."""
    import ollama

    from tests.daemon import Daemon

    push_ollama_shaped(registry.host, "library/viadaemon", "1", tiny_models.gguf_path)
    daemon = Daemon(store_home).start()
    try:
        client = ollama.Client(host=daemon.url)
        statuses = [
            event.status
            for event in client.pull(
                f"ollama://{registry.host}/library/viadaemon:1", insecure=True, stream=True
            )
        ]
        assert statuses[-1] == "success"
        assert "viadaemon:1" in [m.model for m in client.list().models]
    finally:
        daemon.stop()
