"""``serve_chat``: the one path of every chat, the daemon's routes and ``mlxctl run`` in its own
process alike: admission through the model's queue, the lease, the chat core, and one account
of each finished generation (``mlxserve/server/scheduler.py``).

Driven here through ``HeldModel`` (what ``mlxctl run`` leases) on the tiny GGUF with llama.cpp;
the daemon's side (429s, metrics, access-log fields) is tested through real daemons in
``test_daemon_behaviour.py``.
"""

from __future__ import annotations

import contextlib

import pytest

from mlxserve.chat.core import collect
from mlxserve.chat.events import Done
from mlxserve.chat.model import LoadedModel
from mlxserve.chat.types import ChatRequest, Message
from mlxserve.errors import InvalidRequestError, QueueFullError
from mlxserve.server.scheduler import HeldModel, serve_chat

NO_SPECIALS = {0: -100.0, 1: -100.0, 2: -100.0}
"""Keeps the random model from ending early or emitting control tokens."""


@pytest.fixture(scope="module")
async def loaded(tiny_store):
    model = await LoadedModel.load(tiny_store, "tiny:gguf", "llamacpp")
    yield model
    await model.unload()


def ask(loaded: LoadedModel, max_tokens: int = 4, **fields) -> ChatRequest:
    return ChatRequest(
        loaded.model.name,
        messages=[Message("user", "The capital of France is")],
        sampling={"temperature": 0.0, "max_tokens": max_tokens, "logit_bias": NO_SPECIALS},
        **fields,
    )


class Accounts:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Done]] = []

    def __call__(self, model: str, done: Done) -> None:
        self.seen.append((model, done))


async def test_a_finished_generation_is_accounted_once_under_the_leased_name(loaded):
    held, accounts = HeldModel(loaded), Accounts()
    async with serve_chat(held, ask(loaded), accounts) as run:
        collected = await collect(run)
    assert accounts.seen == [(held.name, collected.done)]
    assert collected.done.stats.eval_count == 4
    assert held.queue.active == 0


async def test_a_request_beyond_the_slots_and_the_queue_is_refused_before_it_runs(loaded):
    held, accounts = HeldModel(loaded, max_queue=0), Accounts()
    async with contextlib.AsyncExitStack() as slots:
        for _ in range(held.queue.parallel):
            await slots.enter_async_context(held.use(held.name))
        with pytest.raises(QueueFullError):
            async with serve_chat(held, ask(loaded), accounts):
                pytest.fail("a full queue admitted a request")
    assert accounts.seen == []
    assert (held.queue.active, held.queue.waiting) == (0, 0)


async def test_a_run_left_unfinished_is_cancelled_unaccounted_and_frees_its_slot(loaded):
    held, accounts = HeldModel(loaded), Accounts()
    async with serve_chat(held, ask(loaded, max_tokens=64), accounts) as run:
        await run.first()
        request = run.prepared.request
    assert request.cancel.cancelled
    assert accounts.seen == []
    assert held.queue.active == 0


async def test_a_bad_request_fails_before_the_first_event_and_frees_its_slot(loaded):
    held, accounts = HeldModel(loaded), Accounts()
    with pytest.raises(InvalidRequestError):
        async with serve_chat(held, ask(loaded, tool_choice="required"), accounts):
            pytest.fail("a request with tool_choice and no tools ran")
    assert accounts.seen == []
    assert held.queue.active == 0


async def test_load_duration_is_the_given_one_or_the_wait_for_the_lease(loaded):
    held = HeldModel(loaded)
    async with serve_chat(held, ask(loaded), Accounts(), load_ns=123_456) as run:
        given = (await collect(run)).done
    async with serve_chat(held, ask(loaded), Accounts()) as run:
        waited = (await collect(run)).done
    assert given.stats.load_duration == 123_456
    assert 0 < waited.stats.load_duration < 123_456_000
