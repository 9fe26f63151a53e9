"""The engine thread prefills a burst together: a request that says others are on their way
(``GenerateRequest.arriving``) holds the next step for them, up to ``GATHER_S``; a lone one
holds nothing. On the real ``EngineThread``, with jobs sent from another thread a few
milliseconds apart, as a burst of clients reaches it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mlxserve.chat.core import collect, run_chat
from mlxserve.chat.model import LoadedModel
from mlxserve.chat.types import ChatRequest, Message
from mlxserve.runners import engine as engine_module
from mlxserve.runners.engine import GATHER_S, EngineThread


class Batch:
    """A stepper that records which joins each step saw."""

    def __init__(self, engine: EngineThread) -> None:
        self.engine = engine
        self.joined: list[str] = []
        self.steps: list[tuple[float, list[str]]] = []
        self.done = threading.Event()

    def join(self, name: str, others: int) -> None:
        self.joined.append(name)
        self.engine.arrived(others)

    def step(self) -> bool:
        if self.joined:  # as a runner's batch: a step with work in it
            self.steps.append((time.monotonic(), list(self.joined)))
            self.done.set()
        return False


def burst(arriving: list[int], gap_s: float, engine: EngineThread) -> Batch:
    batch = Batch(engine)
    engine.submit(lambda: engine.register(batch.step)).result()
    for index, others in enumerate(arriving):
        engine.submit(lambda name=f"r{index}", n=others: batch.join(name, n))
        time.sleep(gap_s)
    assert batch.done.wait(5)
    time.sleep(GATHER_S * 2)
    return batch


def test_a_burst_that_says_it_is_coming_is_one_step():
    engine = EngineThread("test-gather")
    try:
        batch = burst([3, 2, 1, 0], 0.003, engine)
    finally:
        engine.close()
    assert batch.steps[0][1] == ["r0", "r1", "r2", "r3"]


def test_a_burst_that_joins_in_another_order_than_it_counted_steps_once_all_came(monkeypatch):
    """Each request counts the others when its rendering ends, but joins when its work before
    the join ends (a prompt-cache lookup in a thread): the step goes as soon as the burst is
    whole, not at the wait's end."""
    monkeypatch.setattr(engine_module, "GATHER_S", 5.0)
    engine = EngineThread("test-gather")
    started = time.monotonic()
    try:
        batch = burst([2, 0, 3, 1], 0.003, engine)
    finally:
        engine.close()
    assert batch.steps[0][1] == ["r0", "r1", "r2", "r3"]
    assert batch.steps[0][0] - started < 2.5


def test_a_lone_request_holds_no_step():
    engine = EngineThread("test-gather")
    try:
        batch = burst([0, 0], 0.01, engine)
    finally:
        engine.close()
    assert batch.steps[0][1] == ["r0"]


def test_requests_that_never_come_hold_the_step_only_so_long():
    engine = EngineThread("test-gather")
    started = time.monotonic()
    try:
        batch = burst([5], 0.0, engine)
    finally:
        engine.close()
    waited = batch.steps[0][0] - started
    assert batch.steps[0][1] == ["r0"]
    assert GATHER_S * 0.8 <= waited < GATHER_S + 0.5


# -- the chat core: what each request of a burst tells the runner ------------------------------


@pytest.fixture(scope="module")
async def loaded(tiny_store):
    model = await LoadedModel.load(tiny_store, "tiny:gguf", "llamacpp")
    yield model
    await model.unload()


async def arriving(loaded: LoadedModel, clients: int) -> list[int]:
    """Each of ``clients`` concurrent chats' ``arriving``, and every chat answered."""

    async def one(index: int) -> int:
        chat = ChatRequest(
            loaded.model.name,
            messages=[Message("user", f"Count to {index + 3}.")],
            sampling={"temperature": 0.0, "max_tokens": 3},
        )
        async with run_chat(loaded, chat) as run:
            said = run.prepared.request.arriving
            assert (await collect(run)).done is not None
        return said

    return sorted(await asyncio.gather(*(one(index) for index in range(clients))))


async def test_each_request_of_a_burst_says_how_many_are_being_prepared_after_it(loaded):
    assert await arriving(loaded, 1) == [0]
    assert await arriving(loaded, 4) == [0, 1, 2, 3]
    assert loaded.preparing == 0
