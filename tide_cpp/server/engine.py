"""The engine queue: one worker thread owns the model and runs jobs one at a time.

The native context is single-caller, so every request becomes a `Job` in a bounded FIFO; the
worker runs it and posts its events to the request's asyncio queue (thread-safe, through the
event loop). A full queue refuses new jobs at once (503) instead of letting latency grow without
bound.

The model stays open for the life of the server and every job hands the engine token ids, so a
prefix cache inside the engine (reusing the KV of blocks a previous request already committed,
e.g. the system prompt and earlier turns of a conversation) serves every client without any
change here; the server never resets or reopens the model between requests.

Cancellation: `Job.cancel()` sets a flag that the job's work checks after every denoising step
(the `on_step` hook of tide_cpp.generation) and raises `Cancelled`; a job cancelled while it
waits never starts.
"""

import collections
import threading
import time

from .errors import overloaded


class Cancelled(Exception):
    """Raised inside a job's work when its client went away or the server is stopping."""


class Job:
    """One request's work. `work(model, job)` runs on the worker thread and reports through
    `job.emit(kind, payload)`; the request reads `job.events` (an asyncio.Queue) on the loop."""

    def __init__(self, work, loop, events):
        self.work = work
        self.loop = loop
        self.events = events
        self._cancelled = threading.Event()
        self.state = "queued"         # queued | running | done | cancelled | failed
        self.submitted = time.monotonic()

    def emit(self, kind, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:
            pass   # the loop is closed: the server is gone, nobody reads this any more

    def cancel(self):
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def check(self):
        """Called by the work between steps: stop here when cancelled."""
        if self._cancelled.is_set():
            raise Cancelled()


class Engine:
    """A model and the single worker that uses it. max_queue: jobs that may wait behind the
    running one."""

    def __init__(self, model, max_queue=16):
        if max_queue < 0:
            raise ValueError(f"max_queue: {max_queue} is negative")
        self.model = model
        self.max_queue = int(max_queue)
        self._lock = threading.Condition()
        self._waiting = collections.deque()
        self._running = None
        self._accepting = True
        self._stopped = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "refused": 0}
        self._thread = threading.Thread(target=self._loop, name="tide-engine", daemon=True)
        self._thread.start()

    # ---- the request side -----------------------------------------------------------------
    def submit(self, work, loop, events):
        """Queue `work`; returns its Job, or raises APIError 503 when the queue is full or the
        server is stopping."""
        job = Job(work, loop, events)
        with self._lock:
            if not self._accepting:
                self.counts["refused"] += 1
                raise overloaded("the server is shutting down")
            if len(self._waiting) >= self.max_queue and self._running is not None:
                self.counts["refused"] += 1
                raise overloaded(f"the queue is full ({self.max_queue} requests waiting); "
                                 "retry later")
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def status(self):
        with self._lock:
            return {"running": 1 if self._running is not None else 0,
                    "queued": len(self._waiting), "max_queue": self.max_queue,
                    "accepting": self._accepting, **self.counts}

    # ---- the worker -----------------------------------------------------------------------
    def _loop(self):
        while True:
            with self._lock:
                while not self._waiting and not self._stopped:
                    self._lock.wait()
                if not self._waiting:
                    return   # stopped and drained
                job = self._waiting.popleft()
                self._running = job
            self._run(job)
            with self._lock:
                self._running = None
                self._lock.notify_all()

    def _run(self, job):
        try:
            job.check()
            job.state = "running"
            job.emit("start")
            job.work(self.model, job)
            job.state = "done"
            self.counts["completed"] += 1
        except Cancelled:
            job.state = "cancelled"
            self.counts["cancelled"] += 1
            job.emit("cancelled")
        except Exception as e:   # a failed job must never take the worker down
            job.state = "failed"
            self.counts["failed"] += 1
            job.emit("error", e)
        finally:
            job.emit("end")

    # ---- shutdown -------------------------------------------------------------------------
    def stop_accepting(self):
        with self._lock:
            self._accepting = False

    def close(self, grace=0.0):
        """Stop: refuse new jobs, let queued and running ones finish for up to `grace` seconds,
        cancel what is left (the running job stops at its next step), join the worker."""
        deadline = time.monotonic() + max(0.0, grace)
        with self._lock:
            self._accepting = False
            while (self._waiting or self._running is not None) and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
            for job in self._waiting:
                job.cancel()
            if self._running is not None:
                self._running.cancel()
            self._stopped = True
            self._lock.notify_all()
        self._thread.join()
