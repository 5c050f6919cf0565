"""Long MLX computations that Ctrl-C and SIGTERM still stop at once.

Python runs signal handlers in the main thread only, between bytecodes, and MLX checks for no signal
inside ``mx.eval``: a large image's denoising step on a CPU held Ctrl-C for as long as the step ran
(95 s measured). The scripts therefore compute each step (and each decode) in a worker thread and
wait for it in short slices, so the handler runs within a fraction of a second. The facade may be
used from any thread (``pipeline``), so the worker needs nothing of its own.

A step that is still computing when the process stops cannot be cancelled, and letting the
interpreter shut down under it risks an abort from MLX's C++ side; ``exit_if_busy`` then ends the
process at once with the status the scripts report (130, 143), after the temporary files have been
removed by the unwinding. After an interrupt it does so whenever a worker has computed at all: an
interpreter shutdown with an interrupted generation still alive also aborted in MLX's teardown
(SIGABRT "terminate called without an active exception" or SIGSEGV, 3 of 8 Ctrl-C exits measured).
"""

import os
import sys
import threading

_POLL_S = 0.1
_workers: set = set()
_computed = False  # whether any worker has run in this process


def call(fn, *args):
    """``fn(*args)`` computed in a worker thread, waited for in slices the main thread's signals can interrupt."""
    outcome = {}

    def work():
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # handed to the caller, which raises it in its own thread
            outcome["error"] = e

    global _computed
    worker = threading.Thread(target=work, name="stable-diffusion-step", daemon=True)
    _workers.add(worker)
    _computed = True
    worker.start()
    while worker.is_alive():
        worker.join(_POLL_S)
    _workers.discard(worker)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


_END = object()


def steps(iterable):
    """The items of ``iterable`` (a generator of denoising steps), each computed by ``call``."""
    iterator = iter(iterable)
    while (item := call(next, iterator, _END)) is not _END:
        yield item


def exit_if_busy(code: int, interrupted: bool = False):
    """End the process now with ``code`` when a worker is still computing, or, ``interrupted`` (Ctrl-C,
    SIGTERM), when one has computed at all (see the module's docstring)."""
    if any(worker.is_alive() for worker in _workers) or (interrupted and _computed):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
