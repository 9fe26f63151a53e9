"""The prompt cache: KV state of prompts kept in RAM and on disk, beyond a model's lifetime.

One home for both text runners. A runner hands over the state of a finished sequence as bytes
(llama.cpp's per-sequence state, mlx-lm's saved prompt cache) with the tokens it holds; the
cache keeps it in a RAM tier, writes it behind to a disk tier under the daemon's home, and
answers a new prompt with the entry sharing its longest prefix, from whichever tier holds it.
The live KV of the runner's own slots is the tier above; the runner reports its hits here.

Prompts are cut into ``BLOCK_TOKENS``-token blocks named by a chained hash that starts from the
digest of everything that makes KV valid (``key``: weights, adapter, runner, KV type, library
and format versions), so an entry can only ever match a prompt of the same key, and a prompt
that shares its first N blocks with an entry reuses at least those N. Entries on disk are
published atomically (temporary file, fsync, ``os.replace``) with a digest over the whole file;
a file that is truncated, flipped, foreign or stale is a miss, logged and removed.

Layout: ``<root>/<weights-hex>/<key-hex>/<chain-hex>.kv`` (``root`` is
``$MLXSERVE_HOME/cache/prompts``, docs/STORE.md), owner-only; ``<root>/tmp/`` holds partial
writes. Nothing is read until the first lookup (the daemon starts without reading the cache).

Everything here is plain data and files: the cache lives in the runner's process, and the
daemon reads its ``stats()`` and the files, never the object.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import shutil
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelstore.atomic import publish_file

log = logging.getLogger("mlxserve.promptcache")

BLOCK_TOKENS = 64
"""Tokens per block: what a prompt shares with an entry is reused in whole blocks at least."""
FORMAT_VERSION = 1
"""Of the files below; part of every key, so a file of another version is a miss."""
MAGIC = b"MLXSPC\x00\x01"
DIGEST_BYTES = 32
HASH_BYTES = 16
"""A block's chained hash (blake2b): 128 bits, so two different prefixes never collide."""
HEADER_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 64 << 20
"""A header claiming more is not ours (a token list of 8M tokens would be 40 MiB of JSON)."""
DISK_SHARE_OF_FREE = 0.10
DISK_CAP_BYTES = 16 << 30
"""The disk tier's default budget: a tenth of the free space at the home, at most 16 GiB."""
STALE_TEMP_S = 600.0
"""A partial write older than this was left by a killed process: removed on the next scan."""
ENTRY_SUFFIX = ".kv"
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
RATE_WEIGHT = 0.3
"""Of a new measurement in a running rate estimate (an exponentially weighted mean): recent
prefills and reads count most, as the machine's load changes."""
MIN_PREFILL_TOKENS = BLOCK_TOKENS
"""A prefill shorter than this says more about a step's overhead than the prefill rate."""
PROBE_EVERY = 16
"""A disk entry judged slower to read than to recompute is read anyway once in this many such
lookups, so the read-rate estimate follows the disk (a page cache warms, a load passes)."""


def default_disk_bytes(home: Path) -> int:
    """The disk budget when none is set: a share of the free space, capped."""
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return 0
    return min(DISK_CAP_BYTES, int(free * DISK_SHARE_OF_FREE))


def open_prompt_cache(model: Any, options: Any, key: dict[str, Any]) -> PromptCache | None:
    """The prompt cache of a model a runner loads (``LocalModel``, ``RunnerOptions``), keyed
    by ``key`` (what of the runner's settings makes KV valid) plus the weights and adapter."""
    if options.prompt_cache_bytes <= 0 and not options.prompt_cache_dir:
        return None
    weights = ",".join(sorted(path.resolve().name for path in model.weights))
    adapter = None
    if model.adapter is not None:
        files = [model.adapter] if model.adapter.is_file() else sorted(model.adapter.iterdir())
        adapter = ",".join(f"{p.name}={p.resolve().name}:{p.stat().st_size}" for p in files)
    root = Path(options.prompt_cache_dir) if options.prompt_cache_dir else None
    return PromptCache(
        {**key, "weights": weights, "adapter": adapter},
        weights=model.weights[0].resolve().name,
        ram_bytes=options.prompt_cache_bytes,
        root=root,
        disk_bytes=options.prompt_cache_disk_bytes,
    )


def key_digest(key: dict[str, Any]) -> str:
    """The digest of what makes KV valid; the first link of every block chain."""
    text = json.dumps({**key, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def block_hashes(key_hex: str, tokens: list[int]) -> list[bytes]:
    """One chained hash per whole block of ``tokens``: block i's hash covers blocks 0..i."""
    previous = bytes.fromhex(key_hex)
    hashes = []
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = struct.pack(f"<{BLOCK_TOKENS}i", *tokens[start : start + BLOCK_TOKENS])
        previous = hashlib.blake2b(previous + block, digest_size=HASH_BYTES).digest()
        hashes.append(previous)
    return hashes


def common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        count += 1
    return count


@dataclass
class Entry:
    """The state of one token sequence; ``payload`` is ``None`` when only the disk holds it."""

    tokens: list[int]
    hashes: list[bytes]
    size: int
    payload: bytes | None = None
    path: Path | None = None
    dropped: bool = False
    """Superseded or evicted: the writer skips it (or removes what it just wrote)."""
    keep: bool = False
    """Marked by a client's caching hint: evicted from RAM after every unmarked entry, and
    written to disk before them."""

    @property
    def name(self) -> str:
        return self.hashes[-1].hex()


@dataclass
class Hit:
    """What a lookup found: the first ``tokens`` of the prompt are in ``payload``'s state (which
    may hold more: the runner trims it), from ``tier``."""

    tokens: int
    payload: bytes
    entry_tokens: int
    tier: str


@dataclass
class TierStats:
    hits: int = 0
    tokens: int = 0
    """Prompt tokens reused from this tier."""

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "tokens": self.tokens}


@dataclass
class Counters:
    live: TierStats = field(default_factory=TierStats)
    ram: TierStats = field(default_factory=TierStats)
    disk: TierStats = field(default_factory=TierStats)
    misses: int = 0
    rejected: int = 0
    """Disk entries found corrupt, truncated, foreign or stale (each removed)."""
    slower: int = 0
    """Disk entries not read because recomputing their tokens was estimated faster."""


@dataclass
class Rate:
    """A running estimate of a throughput (units per second); 0 until measured."""

    per_s: float = 0.0

    def note(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        rate = units / seconds
        self.per_s = rate if not self.per_s else (1 - RATE_WEIGHT) * self.per_s + RATE_WEIGHT * rate

    def seconds(self, units: float) -> float | None:
        return units / self.per_s if self.per_s else None


class EntryError(Exception):
    """A disk entry that must not be used."""


def encode_entry(key: dict[str, Any], tokens: list[int], payload: bytes) -> Iterator[bytes]:
    header = json.dumps(
        {"format": FORMAT_VERSION, "key": key, "tokens": tokens, "payload_bytes": len(payload)}
    ).encode()
    yield MAGIC + HEADER_LENGTH.pack(len(header)) + header
    yield payload


def read_header(handle: Any, size: int) -> dict[str, Any]:
    start = handle.read(len(MAGIC) + HEADER_LENGTH.size)
    if len(start) < len(MAGIC) + HEADER_LENGTH.size or not start.startswith(MAGIC):
        raise EntryError("not a prompt-cache entry of this version")
    (length,) = HEADER_LENGTH.unpack(start[len(MAGIC) :])
    if length > min(MAX_HEADER_BYTES, size):
        raise EntryError("header larger than the file")
    try:
        header = json.loads(handle.read(length))
    except ValueError as exc:
        raise EntryError(f"unreadable header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise EntryError("another format version")
    tokens = header.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise EntryError("no token list")
    header["offset"] = len(start) + length
    return header


class PromptCache:
    """The RAM and disk tiers of one loaded model's prompt cache (thread-safe)."""

    def __init__(
        self,
        key: dict[str, Any],
        *,
        weights: str,
        ram_bytes: int,
        root: Path | None,
        disk_bytes: int,
    ) -> None:
        self.key = {**key, "format": FORMAT_VERSION}
        self.key_hex = key_digest(key)
        self.ram_bytes = ram_bytes
        self.disk_bytes = disk_bytes if root is not None else 0
        self.root = root
        self.folder = root / weights / self.key_hex[:32] if root is not None else None
        self.counters = Counters()
        self.prefill = Rate()
        """Prompt tokens per second the runner prefills (``note_prefill``)."""
        self.read = Rate()
        """Disk entry bytes per second read and checked (``_read``)."""
        self.restore = Rate()
        """Entry bytes per second the runner loads into its KV cache (``note_restore``)."""
        self._probe = 0
        self._lock = threading.Lock()
        self._ram: OrderedDict[str, Entry] = OrderedDict()
        self._disk: OrderedDict[str, Entry] = OrderedDict()
        self._index: dict[bytes, str] = {}
        """Every block hash of every entry -> the name of an entry holding that prefix."""
        self._scanned = False
        self._scan_lock = threading.Lock()
        self._writes: queue.PriorityQueue[tuple[int, int, Entry | None]] = queue.PriorityQueue()
        """Marked entries first, then in order (the count); ``None`` (last) stops the writer."""
        self._queued = 0
        self._writer: threading.Thread | None = None
        if self.disk_bytes > 0:
            self._writer = threading.Thread(
                target=self._write_loop, name="prompt-cache-writer", daemon=True
            )
            self._writer.start()

    # -- lookup ------------------------------------------------------------------------------

    def lookup(self, tokens: list[int], *, better_than: int = 0) -> Hit | None:
        """The entry sharing the longest prefix with ``tokens`` (at most all but the last, whose
        logits the runner must compute). A disk entry is read and verified here (call it off
        the engine), and only if it beats the ``better_than`` tokens the runner's live slots
        hold; a RAM entry costs nothing to return (concurrent prompts may find the slot that
        holds their prefix taken). The runner reports what it used with ``record``."""
        limit = len(tokens) - 1
        hashes = block_hashes(self.key_hex, tokens[:limit])
        if not hashes:
            return None
        self._scan()
        while True:
            with self._lock:
                found = next(
                    (
                        (i, self._index[h])
                        for i, h in reversed(list(enumerate(hashes)))
                        if h in self._index
                    ),
                    None,
                )
                if found is None:
                    return None
                blocks, name = found
                entry = self._ram.get(name) or self._disk.get(name)
                if entry is None:
                    self._forget_hashes(name, hashes[: blocks + 1])
                    continue
                reused = min(common_prefix(entry.tokens, tokens), limit)
                if entry.payload is not None:
                    if name in self._ram:
                        self._ram.move_to_end(name)
                    return Hit(reused, entry.payload, len(entry.tokens), "ram")
                if reused <= better_than:
                    return None
                if not self._worth_reading(entry.size, reused - better_than):
                    self.counters.slower += 1
                    return None
            payload = self._read(entry)
            if payload is None:
                continue
            with self._lock:
                if 0 < entry.size <= self.ram_bytes and not entry.dropped:
                    entry.payload = payload  # promoted: the next prompt like it reads RAM
                    self._ram[name] = entry
                    self._trim_ram()
            return Hit(reused, payload, len(entry.tokens), "disk")

    def note_prefill(self, tokens: int, seconds: float) -> None:
        """The runner prefilled ``tokens`` prompt tokens in ``seconds`` (a sample of what a
        disk read is weighed against)."""
        if tokens >= MIN_PREFILL_TOKENS:
            with self._lock:
                self.prefill.note(tokens, seconds)

    def note_restore(self, payload_bytes: int, seconds: float) -> None:
        """The runner loaded a ``payload_bytes`` entry into its KV cache in ``seconds``."""
        with self._lock:
            self.restore.note(payload_bytes, seconds)

    def _worth_reading(self, size: int, saved_tokens: int) -> bool:
        """Under the lock: whether reading and restoring a ``size``-byte entry is estimated
        faster than prefilling the ``saved_tokens`` it saves. Read while any rate is still
        unmeasured (that is how it gets measured), and once in ``PROBE_EVERY`` refusals."""
        recompute = self.prefill.seconds(saved_tokens)
        read = self.read.seconds(size)
        restore = self.restore.seconds(size)
        if recompute is None or read is None or restore is None or read + restore < recompute:
            return True
        self._probe += 1
        return self._probe % PROBE_EVERY == 0

    def record(self, hit: Hit | None, live_tokens: int) -> None:
        """What a prompt reused: ``hit`` if the runner restored it, else ``live_tokens`` from
        the runner's own slots (none: a miss)."""
        with self._lock:
            if hit is not None:
                tier = self.counters.ram if hit.tier == "ram" else self.counters.disk
                tier.hits += 1
                tier.tokens += hit.tokens
            elif live_tokens > 0:
                self.counters.live.hits += 1
                self.counters.live.tokens += live_tokens
            else:
                self.counters.misses += 1

    # -- store -------------------------------------------------------------------------------

    def wants(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` would add anything (so the runner can skip copying its state)."""
        if len(tokens) < BLOCK_TOKENS or (self.ram_bytes <= 0 and self.disk_bytes <= 0):
            return False
        hashes = block_hashes(self.key_hex, tokens)
        with self._lock:
            name = self._index.get(hashes[-1])
            held = self._ram.get(name or "") or self._disk.get(name or "")
            return held is None or len(held.tokens) < len(tokens)

    def store(self, tokens: list[int], payload: bytes, *, keep: bool = False) -> None:
        """Keep the state of ``tokens`` in RAM and write it behind to disk. An entry whose
        tokens this one extends is superseded (dropped from both tiers; the new one inherits
        its mark). ``keep``: a client's caching hint marks it (see ``Entry.keep``)."""
        hashes = block_hashes(self.key_hex, tokens)
        if not hashes:
            return
        entry = Entry(list(tokens), hashes, len(payload), payload, keep=keep)
        with self._lock:
            superseded = {self._index[h] for h in hashes if h in self._index}
            for name in superseded:
                old = self._ram.get(name) or self._disk.get(name)
                if old is not None and old.tokens == tokens[: len(old.tokens)]:
                    entry.keep = entry.keep or old.keep
                    self._drop(name)
            for h in hashes:
                self._index[h] = entry.name
            if self.ram_bytes > 0 and entry.size <= self.ram_bytes:
                self._ram[entry.name] = entry
                self._ram.move_to_end(entry.name)
                self._trim_ram()
        if self._writer is not None:
            self._queue(entry)

    def _queue(self, entry: Entry | None) -> None:
        with self._lock:
            self._queued += 1
            order = self._queued
        rank = 2 if entry is None else (0 if entry.keep else 1)
        self._writes.put((rank, order, entry))

    def spill(self) -> None:
        """Write every RAM entry not yet on disk, and wait for the writes: the model unloads."""
        if self._writer is None:
            return
        with self._lock:
            pending = [e for e in self._ram.values() if e.path is None]
        for entry in pending:
            self._queue(entry)
        self._writes.join()

    def close(self) -> None:
        """Spill, stop the writer, free the RAM tier."""
        self.spill()
        if self._writer is not None:
            self._queue(None)
            self._writer.join()
            self._writer = None
        with self._lock:
            self._ram.clear()

    def release_ram(self) -> int:
        """Evict the whole RAM tier (memory admission needs the room): entries on disk keep
        only their file, entries still queued for the writer are written, then freed. The
        bytes released."""
        with self._lock:
            held = sum(e.size for e in self._ram.values())
            self._trim_ram(budget=0)
        return held

    def forget_ram(self) -> None:
        """Empty the RAM tier (a cold start for benches); the disk tier keeps its entries."""
        with self._lock:
            for name, entry in self._ram.items():
                if entry.path is not None:
                    entry.payload = None
                elif name not in self._disk:
                    entry.dropped = True
                    self._forget_hashes(name, entry.hashes)
            self._ram.clear()

    def stats(self) -> dict[str, Any]:
        """Plain data for ``/api/ps`` and ``/metrics``."""
        with self._lock:
            ram = sum(e.size for e in self._ram.values())
            disk = sum(e.size for e in self._disk.values())
            return {
                "block_tokens": BLOCK_TOKENS,
                "misses": self.counters.misses,
                "rejected": self.counters.rejected,
                "prefill_tokens_per_s": round(self.prefill.per_s, 1),
                "live": self.counters.live.as_dict(),
                "ram": {
                    **self.counters.ram.as_dict(),
                    "entries": len(self._ram),
                    "bytes": ram,
                    "budget_bytes": self.ram_bytes,
                },
                "disk": {
                    **self.counters.disk.as_dict(),
                    "entries": len(self._disk),
                    "bytes": disk,
                    "budget_bytes": self.disk_bytes,
                    "skipped_slower": self.counters.slower,
                    "read_bytes_per_s": round(self.read.per_s),
                    "restore_bytes_per_s": round(self.restore.per_s),
                },
            }

    # -- internals (callers hold ``_lock`` where noted) --------------------------------------

    def _forget_hashes(self, name: str, hashes: list[bytes]) -> None:
        for h in hashes:
            if self._index.get(h) == name:
                del self._index[h]

    def _drop(self, name: str) -> None:
        """Under the lock: remove an entry from both tiers and the index."""
        entry = self._ram.pop(name, None)
        on_disk = self._disk.pop(name, None)
        for held in (entry, on_disk):
            if held is not None:
                held.dropped = True
                self._forget_hashes(name, held.hashes)
                if held.path is not None:
                    held.path.unlink(missing_ok=True)

    def _trim_ram(self, budget: int | None = None) -> None:
        """Under the lock: evict least recently used RAM entries over the budget, unmarked
        ones first (an entry not yet on disk is queued for the writer, which still holds it)."""
        budget = self.ram_bytes if budget is None else budget
        total = sum(e.size for e in self._ram.values())
        while total > budget and self._ram:
            name = next((n for n, e in self._ram.items() if not e.keep), next(iter(self._ram)))
            entry = self._ram.pop(name)
            total -= entry.size
            if entry.path is not None:
                entry.payload = None  # the disk holds it
            elif name not in self._disk and self._writer is None:
                entry.dropped = True
                self._forget_hashes(name, entry.hashes)

    def _scan(self) -> None:
        """Index this key's disk entries from their headers, once, at the first lookup; clear
        away partial writes left by killed processes."""
        with self._scan_lock:
            if not self._scanned and self.folder is not None and self.disk_bytes > 0:
                self._scan_folder()
            self._scanned = True

    def _scan_folder(self) -> None:
        assert self.root is not None and self.folder is not None
        now = time.time()
        for temp in (self.root / "tmp").glob("*"):
            with contextlib.suppress(OSError):
                if now - temp.stat().st_mtime > STALE_TEMP_S:
                    temp.unlink()
        if not self.folder.is_dir():
            return
        files = sorted(self.folder.glob(f"*{ENTRY_SUFFIX}"), key=_mtime)
        for path in files:
            try:
                size = path.stat().st_size
                with path.open("rb") as handle:
                    header = read_header(handle, size)
                if header.get("key") != self.key:
                    raise EntryError("written for another model or KV setting")
                tokens = header["tokens"]
                hashes = block_hashes(self.key_hex, tokens)
                if not hashes or hashes[-1].hex() != path.stem:
                    raise EntryError("its tokens do not match its name")
            except (OSError, EntryError) as exc:
                self._reject(path, exc)
                continue
            entry = Entry(tokens, hashes, size, None, path)
            with self._lock:
                if entry.name in self._ram:
                    self._ram[entry.name].path = path
                self._disk[entry.name] = entry
                for h in hashes:
                    self._index.setdefault(h, entry.name)

    def _read(self, entry: Entry) -> bytes | None:
        """A disk entry's payload, once its digest, key and tokens check out; else ``None``
        (the file is removed)."""
        assert entry.path is not None
        path = entry.path
        started = time.perf_counter()
        try:
            data = path.read_bytes()
            body = memoryview(data)[:-DIGEST_BYTES]  # a view: hashing a slice would copy it
            if len(data) < DIGEST_BYTES or hashlib.sha256(body).digest() != data[-DIGEST_BYTES:]:
                raise EntryError("its digest does not match (truncated or corrupt)")
            header = read_header(io.BytesIO(body), len(body))
            if header.get("key") != self.key:
                raise EntryError("written for another model or KV setting")
            if header["tokens"] != entry.tokens:
                raise EntryError("its tokens changed since it was indexed")
            payload = bytes(body[header["offset"] :])
            if len(payload) != header.get("payload_bytes"):
                raise EntryError("its payload has the wrong length")
            os.utime(path)
            with self._lock:
                self.read.note(len(data), time.perf_counter() - started)
        except (OSError, EntryError) as exc:
            self._reject(path, exc)
            with self._lock:
                self._disk.pop(entry.name, None)
                self._forget_hashes(entry.name, entry.hashes)
            return None
        return payload

    def _reject(self, path: Path, reason: Exception) -> None:
        log.warning("prompt cache: ignoring and removing %s: %s", path, reason)
        with self._lock:
            self.counters.rejected += 1
        path.unlink(missing_ok=True)

    def _write_loop(self) -> None:
        while True:
            _, _, entry = self._writes.get()
            try:
                if entry is None:
                    return
                self._write(entry)
            except Exception:  # a full disk must not end the writer
                log.exception("prompt cache: could not write an entry")
            finally:
                self._writes.task_done()

    def _write(self, entry: Entry) -> None:
        """Publish one entry: temp file, fsync, ``os.replace``; then hold the disk budget."""
        assert self.root is not None and self.folder is not None
        with self._lock:
            payload = entry.payload
        if entry.dropped or payload is None or entry.path is not None:
            return
        if entry.size > self.disk_bytes:
            return
        for folder in (self.root, self.root / "tmp", self.folder.parent, self.folder):
            folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        target = self.folder / f"{entry.name}{ENTRY_SUFFIX}"
        temp = self.root / "tmp" / f"{entry.name}.{os.getpid()}.{threading.get_ident()}"
        digest = hashlib.sha256()
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                for part in encode_entry(self.key, entry.tokens, payload):
                    digest.update(part)
                    handle.write(part)
                handle.write(digest.digest())
                handle.flush()
                os.fsync(handle.fileno())
            publish_file(temp, target, synced=True)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        size = target.stat().st_size
        with self._lock:
            if entry.dropped:
                target.unlink(missing_ok=True)  # superseded while it was written
                return
            entry.path = target
            self._disk[entry.name] = Entry(entry.tokens, entry.hashes, size, None, target)
            for h in entry.hashes:
                self._index[h] = entry.name
            if entry.name not in self._ram:
                entry.payload = None
        self._trim_disk()

    def _trim_disk(self) -> None:
        """Hold the disk budget over every model's entries (other processes write here too):
        the least recently used files go first."""
        assert self.root is not None
        files = []
        for path in self.root.glob(f"*/*/*{ENTRY_SUFFIX}"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.disk_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            with self._lock:
                name = path.stem
                held = self._disk.get(name)
                if held is not None and held.path == path:
                    del self._disk[name]
                    if name not in self._ram:
                        self._forget_hashes(name, held.hashes)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def entries(root: Path) -> list[dict[str, Any]]:
    """Every entry file under ``root``, as ``mlxctl cache`` lists them (headers not read)."""
    found = []
    for path in sorted(root.glob(f"*/*/*{ENTRY_SUFFIX}")):
        with contextlib.suppress(OSError):
            stat = path.stat()
            found.append(
                {
                    "weights": path.parent.parent.name,
                    "key": path.parent.name,
                    "entry": path.stem,
                    "bytes": stat.st_size,
                    "modified": stat.st_mtime,
                    "path": str(path),
                }
            )
    return found


def remove_entries(root: Path, keep: Callable[[str], bool] = lambda _: False) -> tuple[int, int]:
    """Remove the folders of every weights digest ``keep`` refuses; (files, bytes) removed."""
    files = freed = 0
    if not root.is_dir():
        return 0, 0
    for folder in root.iterdir():
        if folder.name == "tmp" or keep(folder.name):
            continue
        for path in folder.glob(f"*/*{ENTRY_SUFFIX}"):
            with contextlib.suppress(OSError):
                freed += path.stat().st_size
                files += 1
        shutil.rmtree(folder, ignore_errors=True)
    return files, freed
