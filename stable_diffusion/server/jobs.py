"""One queue, one job at a time: A1111's ``queue_lock`` and its ``shared.state`` progress.

The HTTP handlers never compute: they put a job on the queue and wait for its future, so the
event loop keeps answering ``/progress`` and ``/interrupt`` while a worker thread runs the
library's generators. Jobs run one at a time, in the order they arrived. A job sees its own
``Progress``: it reports each step and asks, between steps, whether to stop (``/interrupt``,
``/skip``, or its client gone).
"""

import concurrent.futures
import datetime
import queue
import threading
import time
from typing import Callable, Optional


class Cancelled(Exception):
    """The job's client went away: nothing is answered."""


class Progress:
    """What ``/progress`` reports (A1111's ``State``), written by the worker, read by the handlers.

    One lock guards every field: a handler reads a consistent snapshot while the worker steps.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._clear()

    def _clear(self):
        self.job = ""
        self.job_count = 0  # A1111: the job's batches (n_iter); 0 when idle
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job_timestamp = "0"
        self.time_start = 0.0
        self.interrupted = False
        self.skipped = False
        self.preview = None  # the latest preview, a base64 PNG
        self.preview_step = -1
        self.textinfo = None

    def begin(self, job: str, job_count: int):
        with self._lock:
            self._clear()
            self.job, self.job_count = job, job_count
            self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
            self.time_start = time.time()

    def end(self):
        with self._lock:
            self._clear()

    def batch(self, job_no: int, sampling_steps: int):
        with self._lock:
            self.job_no, self.sampling_step, self.sampling_steps = job_no, 0, sampling_steps
            self.skipped = False

    def step(self, sampling_step: int):
        with self._lock:
            self.sampling_step = sampling_step

    def set_preview(self, image: str, step: int):
        with self._lock:
            self.preview, self.preview_step = image, step

    def interrupt(self):
        with self._lock:
            if self.job_count:
                self.interrupted = True

    def skip(self):
        with self._lock:
            if self.job_count:
                self.skipped = True

    def snapshot(self) -> dict:
        """A1111's /progress answer: progress and ETA from job_no/job_count and the sampling step, the state dict."""
        with self._lock:
            state = {
                "skipped": self.skipped,
                "interrupted": self.interrupted,
                "stopping_generation": False,
                "job": self.job,
                "job_count": self.job_count,
                "job_timestamp": self.job_timestamp,
                "job_no": self.job_no,
                "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps,
            }
            if self.job_count == 0:
                return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": self.textinfo}
            # A1111's check_progress_call: 0.01 so that the ETA never divides by zero.
            progress = 0.01 + self.job_no / self.job_count
            if self.sampling_steps > 0:
                progress += self.sampling_step / self.sampling_steps / self.job_count
            elapsed = time.time() - self.time_start
            eta_relative = elapsed / progress - elapsed
            return {
                "progress": min(progress, 1),
                "eta_relative": eta_relative,
                "state": state,
                "current_image": self.preview,
                "textinfo": self.textinfo,
            }


class Job:
    """One request's work: ``work(job)`` runs on the worker; its result or exception ends up in ``future``."""

    def __init__(self, name: str, work: Callable, progress: Progress):
        self.name = name
        self.work = work
        self.progress = progress
        self.future = concurrent.futures.Future()
        self.cancelled = threading.Event()

    def cancel(self):
        """The client is gone: the job stops at its next step (or never starts)."""
        self.cancelled.set()

    def should_stop(self) -> Optional[str]:
        """Between steps: "cancelled", "interrupted", "skipped" or None (go on)."""
        if self.cancelled.is_set():
            return "cancelled"
        if self.progress.interrupted:
            return "interrupted"
        if self.progress.skipped:
            return "skipped"
        return None


class Worker:
    """The queue and the one thread that runs its jobs in order."""

    def __init__(self):
        self.progress = Progress()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    def submit(self, name: str, work: Callable) -> Job:
        job = Job(name, work, self.progress)
        self._queue.put(job)
        return job

    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self):
        while True:
            job = self._queue.get()
            if job.cancelled.is_set():
                job.future.set_exception(Cancelled())
                continue
            try:
                job.future.set_result(job.work(job))
            except BaseException as e:  # handed to the handler, which answers it; the worker lives on
                job.future.set_exception(e)
            finally:
                self.progress.end()
