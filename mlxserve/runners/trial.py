"""A model's trial load, before it is stored: a model that cannot load is refused at create
(``model_unloadable``, with the library's reason), not stored to fail on every chat.

``/api/create``, ``mlxctl create`` and ``mlxctl import`` give ``ModelStore.commit`` the
``check`` made here: once the model's blobs are in, and before its name points at them, the
runner the model would get (``select.choose_runner``) loads it with its plugin's trial for
its format (``registry.RunnerPlugin.trials``: the load made cheap, mmap and no real context) in a
throwaway process run as ``python -m mlxserve.runners.trial RUNNER``, within ``TRIAL_TIMEOUT_S``.
A library that aborts (llama.cpp's assertions on lying metadata) kills only that process; its
last words on stderr (the assertion) become the reason. A model no installed runner can run is
stored untried: it may be meant for another machine. So is an MLX folder: mlx-lm cannot abort
on a lying config (it raises), its load failure is already a clear 400 per chat
(``unsupported_architecture``), and a trial would cost importing mlx-lm and transformers.

The child reads the pickled ``LocalModel`` on stdin and writes its pickled outcome on the
stdout it started with; its own stdout is pointed at stderr, so nothing a library prints can
garble the outcome.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlxserve import platform
from mlxserve.errors import ModelUnloadableError, RunnerUnavailableError, UnsupportedFormatError
from mlxserve.runners.registry import plugins
from mlxserve.runners.select import choose_runner
from mlxserve.runners.worker import pack_error, unpack_error
from modelstore.model import LocalModel
from modelstore.runtime import open_stored
from modelstore.store import ModelStore, StoredModel

TRIAL_TIMEOUT_S = 120.0
"""A trial that takes longer is killed and the model stored untried (a slow disk is no reason to
refuse a model; a hung one meets its worker's deadlines). Far above a real trial (the library's
import and tens to hundreds of milliseconds, seconds on a busy machine; docs/PERFORMANCE.md).
The known hang, two llama.cpp threads asserting at once, cannot happen: the trial runs one."""
REASON_CHARS = 300
LIBRARY_WORDS = re.compile(r"GGML_ASSERT\(.*\) failed|error loading model: .*|error: .*")
"""The line of a library's stderr that says why: an assertion, or llama.cpp's load error."""
log = logging.getLogger("mlxserve.trial")


@dataclass(frozen=True)
class Trial:
    runner: str
    seconds: float


def trial_load(model: LocalModel, timeout_s: float = TRIAL_TIMEOUT_S) -> Trial | None:
    """Load ``model`` on trial; raise ``ModelUnloadableError`` with the reason if it cannot.
    ``None`` when there is nothing to try it with (no installed runner can run it, or its
    runner declares no trial for its format)."""
    try:
        runner = choose_runner(model)
    except (RunnerUnavailableError, UnsupportedFormatError) as exc:
        log.info("%s is stored untried: %s", model.name, exc.message)
        return None
    if model.format not in plugins()[runner].trials:
        return None
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mlxserve.runners.trial", runner],
            input=pickle.dumps(model),
            capture_output=True,
            timeout=timeout_s,
            env=platform.worker_environment(dict(os.environ)),
        )
    except subprocess.TimeoutExpired:  # run() has killed it
        # Slow is not broken (a large model read from a slow disk): stored untried, its
        # worker's own load and stall deadlines still guard every chat.
        log.warning("%s is stored untried: its trial took over %g s", model.name, timeout_s)
        return None
    stderr = done.stderr.decode("utf-8", "replace")
    if done.returncode == 0 and done.stdout:
        status, value = pickle.loads(done.stdout)
        if status == "error":
            raise _refused(model, runner, _with_words(str(unpack_error(value)), stderr))
    elif done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        why = f"its process was killed by {name}"  # SIGABRT: the library asserted
        raise _refused(model, runner, _with_words(why, stderr))
    else:
        why = f"its process exited with status {done.returncode}"
        raise _refused(model, runner, _with_words(why, stderr))
    return Trial(runner, time.perf_counter() - started)


def _refused(model: LocalModel, runner: str, why: str) -> ModelUnloadableError:
    return ModelUnloadableError(
        f"{model.name} cannot be loaded ({runner} runner): {why}", model=model.name, reason=why
    )


def _with_words(why: str, stderr: str) -> str:
    """``why``, with the library's own last line about it (``LIBRARY_WORDS``), if it left one."""
    found = [match.group(0) for match in LIBRARY_WORDS.finditer(stderr)]
    if not found:
        return why
    words = " ".join(found[-1].split())
    return f"{why}: {words[:REASON_CHARS]}"


def loads_check(store: ModelStore) -> Callable[[StoredModel], None]:
    """The ``check`` for ``ModelStore.commit``: the model as it will be stored, on trial."""

    def check(stored: StoredModel) -> None:
        model = open_stored(store, stored)
        trial = trial_load(model)
        if trial is not None:
            log.info(
                "%s passed its trial load on %s in %.2f s", model.name, trial.runner, trial.seconds
            )

    return check


def main() -> None:
    platform.die_with_parent()
    result = os.dup(1)
    os.dup2(2, 1)  # what a library prints goes to stderr, never into the outcome
    model = pickle.load(sys.stdin.buffer)
    try:
        plugins()[sys.argv[1]].run_trial(model)
    except BaseException as error:  # every failure is the outcome
        outcome = ("error", pack_error(error))
    else:
        outcome = ("ok", None)
    with os.fdopen(result, "wb") as out:
        pickle.dump(outcome, out)
    platform.exit_process(0)


if __name__ == "__main__":
    main()
