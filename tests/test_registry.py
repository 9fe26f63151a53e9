"""Pull and push through a real OCI registry (Debian's ``docker-registry``) on loopback.

Models move between separate stores (separate ``MLXSERVE_HOME``s), through the real
``mlxctl`` processes where a user would use them, and through the daemon's ``/api/pull`` and
``/api/push`` with the real ``ollama`` client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from modelstore import mediatypes
from modelstore.blobs import sha256_digest
from modelstore.draft import LayerSource, ModelConfig, ModelDraft
from modelstore.errors import DigestMismatchError, InvalidManifestError
from modelstore.registry import pull_model, push_model
from modelstore.registry.pull import check_manifest
from modelstore.store import ModelStore
from tests.cli import MLXCTL, mlxctl
from tests.registry import Registry, registry_binary, write_htpasswd
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.skipif(
    registry_binary() is None,
    reason="docker-registry is not installed (scripts/install-system-deps.sh installs it)",
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    running = Registry(tmp_path_factory.mktemp("registry")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("auth-registry")
    htpasswd = write_htpasswd(root / "htpasswd", "ci", "s3cret")
    running = Registry(root / "registry", htpasswd=htpasswd).start()
    yield running
    running.stop()


def weights_model(store: ModelStore, name: str, folder: Path, size: int, seed: int) -> str:
    """Commit a model whose weights are ``size`` seeded random bytes; returns its digest."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"weights-{seed}.gguf"
    weights.write_bytes(_seeded_bytes(size, seed))
    draft = ModelDraft(
        ModelConfig("gguf", architecture="llama", description=f"test model {seed}"),
        [
            LayerSource(mediatypes.WEIGHTS_GGUF, weights.name, path=weights),
            LayerSource(mediatypes.SYSTEM_PROMPT, "mlxserve.system.txt", data=b"be brief"),
        ],
    )
    return store.commit(draft, name, allow_link=False).model.manifest_digest


def _seeded_bytes(size: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).bytes(size)


def store_state(home: Path) -> tuple[list[str], list[str]]:
    """The visible blobs and tags of a store: what a failed pull must leave as it was."""
    blobs = sorted(p.name for p in (home / "blobs" / "sha256").glob("*"))
    tags = sorted(str(p.relative_to(home)) for p in (home / "manifests").rglob("*") if p.is_file())
    return blobs, tags


def pull_json(home: Path, reference: str, **kwargs) -> dict:
    return json.loads(mlxctl("pull", "--insecure", "--json", reference, home=home, **kwargs).stdout)


def push_json(home: Path, name: str, target: str, **kwargs) -> dict:
    out = mlxctl("push", "--insecure", "--json", name, target, home=home, **kwargs).stdout
    return json.loads(out)


def test_push_then_pull_round_trip_keeps_every_digest(registry, tiny_models, tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    mlxctl("import", str(tiny_models.gguf_path), "--name", "tiny:gguf", home=source)
    pushed = push_json(source, "tiny:gguf", f"{registry.host}/team/tiny:gguf")
    local = ModelStore(source).resolve("tiny:gguf")
    assert pushed["digest"] == local.manifest_digest
    assert sorted(pushed["uploaded"]) == sorted(set(local.manifest.blob_digests()))

    pulled = pull_json(target, f"{registry.host}/team/tiny:gguf")
    assert pulled["digest"] == local.manifest_digest
    remote = ModelStore(target).resolve(f"{registry.host}/team/tiny:gguf")
    assert remote.manifest == local.manifest
    assert mlxctl("verify", home=target).returncode == 0
    assert not list((target / "tmp").glob("*"))
    shown = json.loads(
        mlxctl("show", f"{registry.host}/team/tiny:gguf", "--json", home=target).stdout
    )
    assert shown["format"] == "gguf"


def test_second_push_uploads_nothing(registry, tmp_path):
    home = tmp_path / "home"
    weights_model(ModelStore(home), "twice:1", tmp_path / "src", 1 << 20, seed=1)
    first = push_json(home, "twice:1", f"{registry.host}/team/twice:1")
    again = push_json(home, "twice:1", f"{registry.host}/team/twice:1")
    assert len(first["uploaded"]) == 3
    assert again["uploaded"] == [] and again["mounted"] == []
    assert sorted(again["present"]) == sorted(first["uploaded"])


def test_chunked_upload_and_cross_repository_mount(registry, tmp_path):
    first, second = ModelStore(tmp_path / "a"), ModelStore(tmp_path / "b")
    digest = weights_model(first, "chunky:1", tmp_path / "src", (3 << 20) + 123, seed=2)
    result = asyncio.run(
        push_model(
            first, "chunky:1", f"{registry.host}/team/chunky:1", insecure=True, chunk_size=1 << 20
        )
    )
    assert len(result.uploaded) == 3
    pulled = asyncio.run(pull_model(second, f"{registry.host}/team/chunky:1", insecure=True))
    assert pulled.manifest_digest == digest
    # The pulled model remembers its repository: pushing it to another repository of the same
    # registry mounts every blob there instead of sending it again.
    moved = asyncio.run(
        push_model(
            second,
            f"{registry.host}/team/chunky:1",
            f"{registry.host}/other/chunky:1",
            insecure=True,
        )
    )
    assert moved.uploaded == [] and sorted(moved.mounted) == sorted(result.uploaded)
    third = ModelStore(tmp_path / "c")
    assert (
        asyncio.run(
            pull_model(third, f"{registry.host}/other/chunky:1", insecure=True)
        ).manifest_digest
        == digest
    )


def test_pull_fetches_only_the_blobs_the_store_lacks(registry, tmp_path):
    publisher = ModelStore(tmp_path / "publisher")
    weights_model(publisher, "shared:1", tmp_path / "src", 4 << 20, seed=3)
    push_json(publisher.root, "shared:1", f"{registry.host}/team/shared:1")
    # The consumer already has the same weights under another model (another config).
    consumer = ModelStore(tmp_path / "consumer")
    weights = tmp_path / "src" / "weights-3.gguf"
    consumer.commit(
        ModelDraft(
            ModelConfig("gguf", description="mine"),
            [LayerSource(mediatypes.WEIGHTS_GGUF, weights.name, path=weights)],
        ),
        "mine:1",
        allow_link=False,
    )
    weights_blob = consumer.blobs.path(sha256_digest(weights.read_bytes()))
    inode = weights_blob.stat().st_ino
    proxy = TcpProxy(registry.port).start()
    try:
        pulled = pull_json(consumer.root, f"{proxy.host}/team/shared:1")
    finally:
        proxy.stop()
    assert pulled["digest"] == publisher.resolve("shared:1").manifest_digest
    assert proxy.downstream_bytes < 64 << 10, "the 4 MiB weights were fetched again"
    assert weights_blob.stat().st_ino == inode


def test_killed_pull_resumes_with_a_range_request(registry, tmp_path):
    publisher = ModelStore(tmp_path / "publisher")
    size = 8 << 20
    digest = weights_model(publisher, "big:1", tmp_path / "src", size, seed=4)
    push_json(publisher.root, "big:1", f"{registry.host}/team/big:1")
    weights = publisher.resolve("big:1").manifest.layers_of(mediatypes.WEIGHTS_GGUF)[0]
    home = tmp_path / "consumer"
    partial = ModelStore(home).blobs.partial_path(weights.digest)

    slow = TcpProxy(registry.port, bytes_per_second=2 << 20).start()
    env = {**os.environ, "MLXSERVE_HOME": str(home)}
    process = subprocess.Popen(
        [MLXCTL, "pull", "--insecure", f"{slow.host}/team/big:1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        partial.exists() and partial.stat().st_size >= 2 << 20
    ):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    slow.stop()
    done_before = partial.stat().st_size
    assert 0 < done_before < size
    blobs, tags = store_state(home)
    assert weights.digest.removeprefix("sha256:") not in blobs and tags == []

    counting = TcpProxy(registry.port).start()
    try:
        pulled = pull_json(home, f"{counting.host}/team/big:1")
    finally:
        counting.stop()
    assert pulled["digest"] == digest
    assert counting.downstream_bytes < size - done_before + (64 << 10)
    assert not partial.exists()
    assert ModelStore(home).blobs.verify(weights.digest)


def test_two_pulls_of_one_model_at_once_share_the_download(registry, tmp_path):
    publisher = ModelStore(tmp_path / "publisher")
    digest = weights_model(publisher, "twice:1", tmp_path / "src", 4 << 20, seed=9)
    push_json(publisher.root, "twice:1", f"{registry.host}/team/twice-at-once:1")
    home = tmp_path / "consumer"
    slow = TcpProxy(registry.port, bytes_per_second=4 << 20).start()
    env = {**os.environ, "MLXSERVE_HOME": str(home)}
    try:
        pulls = [
            subprocess.Popen(
                [MLXCTL, "pull", "--insecure", "--json", f"{slow.host}/team/twice-at-once:1"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [p.communicate(timeout=60) for p in pulls]
    finally:
        slow.stop()
    assert [p.returncode for p in pulls] == [0, 0], results
    assert {json.loads(out)["digest"] for out, _ in results} == {digest}
    assert slow.downstream_bytes < (4 << 20) * 1.5, "both processes downloaded the weights"
    assert mlxctl("verify", home=home).returncode == 0
    assert not list((home / "tmp").glob("pull-*"))


def test_tampered_blob_is_refused_and_the_store_is_unchanged(registry, tmp_path):
    publisher = ModelStore(tmp_path / "publisher")
    weights_model(publisher, "tampered:1", tmp_path / "src", 1 << 20, seed=5)
    push_json(publisher.root, "tampered:1", f"{registry.host}/team/tampered:1")
    weights = publisher.resolve("tampered:1").manifest.layers_of(mediatypes.WEIGHTS_GGUF)[0]
    served = registry.blob_data(weights.digest)
    data = bytearray(served.read_bytes())
    data[1000] ^= 0xFF
    served.write_bytes(bytes(data))

    home = tmp_path / "consumer"
    weights_model(ModelStore(home), "mine:1", tmp_path / "own", 1000, seed=6)
    before = store_state(home)
    result = mlxctl(
        "pull", "--insecure", f"{registry.host}/team/tampered:1", home=home, check=False
    )
    assert result.returncode == 1
    assert "Error [digest_mismatch]" in result.stderr and weights.digest in result.stderr
    assert store_state(home) == before
    assert not ModelStore(home).blobs.partial_path(weights.digest).exists()


def test_manifest_checks_refuse_wrong_digests_and_bad_blob_names():
    good = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"config":{"mediaType":"'
        + mediatypes.MODEL_CONFIG.encode()
        + b'","digest":"sha256:'
        + b"a" * 64
        + b'","size":2},"layers":[]}'
    )
    assert check_manifest(good, sha256_digest(good), None).layers == []
    with pytest.raises(DigestMismatchError):
        check_manifest(good, "sha256:" + "b" * 64, None)
    with pytest.raises(DigestMismatchError):
        check_manifest(good, None, "sha256:" + "c" * 64)
    with pytest.raises(InvalidManifestError):
        check_manifest(good.replace(b"a" * 64, b"A" * 64), None, None)
    with pytest.raises(InvalidManifestError):
        check_manifest(good.replace(b"a" * 64, b"../../etc"), None, None)


def test_run_pulls_a_missing_model_first(registry, tiny_models, tmp_path):
    publisher, user = tmp_path / "publisher", tmp_path / "user"
    mlxctl("import", str(tiny_models.gguf_path), "--name", "tiny:gguf", home=publisher)
    push_json(publisher, "tiny:gguf", f"{registry.host}/team/run-me:1")
    ran = mlxctl(
        "run",
        "--local",
        "--insecure",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        f"{registry.host}/team/run-me:1",
        "hello",
        home=user,
    )
    assert ran.stdout.strip()
    assert ModelStore(user).exists(f"{registry.host}/team/run-me:1")


def test_unknown_model_and_missing_host_are_clear_errors(registry, tmp_path):
    missing = mlxctl(
        "pull", "--insecure", f"{registry.host}/team/nothing:1", home=tmp_path, check=False
    )
    assert missing.returncode == 1 and "Error [model_not_found]" in missing.stderr
    no_host = mlxctl("pull", "team/nothing:1", home=tmp_path, check=False)
    assert no_host.returncode == 1 and "Error [model_not_found]" in no_host.stderr
    assert "mlxctl pull ollama://" in no_host.stderr, "a name without a host is Ollama's"
    no_tls = mlxctl("pull", f"{registry.host}/team/nothing:1", home=tmp_path, check=False)
    assert no_tls.returncode == 1 and "--insecure" in no_tls.stderr


def docker_config(path: Path, host: str, username: str, password: str) -> dict[str, str]:
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return {"MLXSERVE_REGISTRY_AUTH_FILE": str(path)}


def test_password_protected_registry(auth_registry, tmp_path):
    home = tmp_path / "home"
    digest = weights_model(ModelStore(home), "secret:1", tmp_path / "src", 1 << 16, seed=7)
    target = f"{auth_registry.host}/team/secret:1"

    anonymous = mlxctl(
        "push",
        "--insecure",
        "secret:1",
        target,
        home=home,
        check=False,
        env={"MLXSERVE_REGISTRY_AUTH_FILE": str(tmp_path / "none.json")},
    )
    assert anonymous.returncode == 1
    assert "Error [registry_unauthorized]" in anonymous.stderr
    assert "needs a login" in anonymous.stderr

    wrong = docker_config(tmp_path / "wrong.json", auth_registry.host, "ci", "guess")
    refused = mlxctl("push", "--insecure", "secret:1", target, home=home, check=False, env=wrong)
    assert refused.returncode == 1
    assert "Error [registry_unauthorized]" in refused.stderr and "refused" in refused.stderr

    right = docker_config(tmp_path / "right.json", auth_registry.host, "ci", "s3cret")
    assert push_json(home, "secret:1", target, env=right)["digest"] == digest
    assert pull_json(tmp_path / "other", target, env=right)["digest"] == digest
    denied = mlxctl("pull", "--insecure", target, home=tmp_path / "third", check=False, env=wrong)
    assert "Error [registry_unauthorized]" in denied.stderr
    assert store_state(tmp_path / "third") == ([], [])


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory):
    from tests.token_server import TokenServer

    root = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(root / "tokens", "ci", "t0ken-pass").start()
    running = Registry(root / "registry", auth_config=tokens.registry_config()).start()
    yield running, tokens
    running.stop()
    tokens.stop()


def test_bearer_token_flow(token_registry, tmp_path):
    registry, tokens = token_registry
    home = tmp_path / "home"
    digest = weights_model(ModelStore(home), "tokened:1", tmp_path / "src", 1 << 16, seed=8)
    target = f"{registry.host}/team/tokened:1"

    right = docker_config(tmp_path / "right.json", registry.host, "ci", "t0ken-pass")
    assert push_json(home, "tokened:1", target, env=right)["digest"] == digest
    assert tokens.issued[-1] == ["repository:team/tokened:pull,push"]
    assert pull_json(tmp_path / "other", target, env=right)["digest"] == digest
    assert tokens.issued[-1] == ["repository:team/tokened:pull"]

    wrong = docker_config(tmp_path / "wrong.json", registry.host, "ci", "nope")
    refused = mlxctl("pull", "--insecure", target, home=tmp_path / "third", check=False, env=wrong)
    assert refused.returncode == 1
    assert "Error [registry_unauthorized]" in refused.stderr and "'ci'" in refused.stderr
    anonymous = mlxctl(
        "pull",
        "--insecure",
        target,
        home=tmp_path / "third",
        check=False,
        env={"MLXSERVE_REGISTRY_AUTH_FILE": str(tmp_path / "none.json")},
    )
    assert "needs a login" in anonymous.stderr
    assert store_state(tmp_path / "third") == ([], [])


def test_daemon_pull_and_push_stream_ollama_progress(registry, tiny_models, tmp_path):
    import ollama

    from tests.daemon import Daemon

    publisher = tmp_path / "publisher"
    mlxctl("import", str(tiny_models.gguf_path), "--name", "tiny:gguf", home=publisher)
    daemon = Daemon(tmp_path / "daemon-home").start()
    try:
        client = ollama.Client(host=daemon.url)
        push_json(publisher, "tiny:gguf", f"{registry.host}/team/daemon-tiny:1")
        name = f"{registry.host}/team/daemon-tiny:1"
        events = list(client.pull(name, insecure=True, stream=True))
        assert events[0].status == "pulling manifest" and events[-1].status == "success"
        layers = [e for e in events if e.digest]
        assert layers and all(e.total and e.completed is not None for e in layers)
        assert {e.digest for e in layers} == set(
            ModelStore(publisher).resolve("tiny:gguf").manifest.blob_digests()
        )
        assert name in [m.model for m in client.list().models]

        client.copy(name, f"{registry.host}/team/daemon-copy:1")
        pushed = list(
            client.push(f"{registry.host}/team/daemon-copy:1", insecure=True, stream=True)
        )
        assert pushed[-1].status == "success"
        again = asyncio.run(
            pull_model(
                ModelStore(tmp_path / "check"), f"{registry.host}/team/daemon-copy:1", insecure=True
            )
        )
        assert again.manifest_digest == ModelStore(publisher).resolve("tiny:gguf").manifest_digest

        with pytest.raises(ollama.ResponseError) as refused:
            client.pull(f"{registry.host}/team/absent:1", insecure=True, stream=False)
        assert refused.value.status_code == 404
    finally:
        daemon.stop()
