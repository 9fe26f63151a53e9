"""A stream whose consumer set ``engine.DIRECT`` (a worker's generation) has its chunks written
by the engine thread itself, every stream's chunks of one step in one write, and yields only its
end; without it the same chunks come through the event loop. On the real ``EngineThread``."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from mlxserve.runners.base import CancelToken
from mlxserve.runners.engine import DIRECT, END, Direct, EngineThread

STEPS = 3


async def two_streams(direct: bool) -> tuple[list[list[Any]], list[tuple[str, list[Any]]]]:
    engine = EngineThread("test-direct")
    writes: list[tuple[str, list[Any]]] = []
    emits: list[Any] = []
    done = 0

    def write(messages: list[Any]) -> None:
        writes.append((threading.current_thread().name, messages))

    def step() -> bool:
        nonlocal done
        done += 1
        for index, emit in enumerate(emits):
            emit(f"s{index}-t{done}")
        if done < STEPS:
            return True
        for emit in emits:
            emit(END)
        engine.unregister(step)
        return False

    def join(emit: Any) -> None:
        emits.append(emit)
        if len(emits) == 2:
            engine.register(step)

    async def consume(tag: int) -> list[Any]:
        if direct:
            DIRECT.set(Direct(write, lambda chunk: (tag, chunk)))
        return [chunk async for chunk in engine.stream(join, CancelToken())]

    try:
        got = await asyncio.wait_for(asyncio.gather(consume(0), consume(1)), 10)
    finally:
        engine.close()
    return got, writes


async def test_direct_chunks_leave_from_the_engine_thread_one_write_per_step():
    got, writes = await two_streams(direct=True)
    assert got == [[], []]
    assert [thread for thread, _ in writes] == ["test-direct"] * STEPS
    for number, (_, messages) in enumerate(writes, 1):
        assert sorted(chunk for _, chunk in messages) == [f"s0-t{number}", f"s1-t{number}"]
        assert sorted(tag for tag, _ in messages) == [0, 1]


async def test_without_direct_the_same_chunks_come_through_the_loop():
    got, writes = await two_streams(direct=False)
    assert writes == []
    assert sorted(got) == [[f"s{i}-t{n}" for n in range(1, STEPS + 1)] for i in range(2)]
