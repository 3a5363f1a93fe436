"""The report's plots drawn in a Python process of their own, so that ``eval`` does not wait for them.

Why a process and not a thread: importing matplotlib (about 0.3 s of CPU, most of what the page
costs) runs Python code, which holds the interpreter's lock, and so does most of eval's own work
around it (importing torch, loading the checkpoint); a thread of eval's gets that lock only while
eval waits in C code, when torch's threads keep every core busy. A process has its own interpreter:
started before the command line imports torch (:func:`pyramidflow.cli.main`), it imports matplotlib
on the core that torch's single-threaded import leaves idle, and eval's interpreter never holds
matplotlib's 40,000 objects (no collector pass over them, nothing of them to free at exit).

This module imports only the standard library: the command line starts the worker before anything
heavy. The child imports :mod:`pyramidflow.inference.plots` and calls its functions by name; each
request and reply is one pickle on the child's stdin and stdout (between this process and a child it
started, so nothing untrusted is unpickled). Where no child can be started (no ``sys.executable``,
e.g. an embedded interpreter), the same functions run on the worker's thread in this process.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

__all__ = ["PlotWorker"]

# The child's program: this process's import path, then serve() below. Its arguments are sys.path.
_CHILD = "import sys; sys.path[:] = sys.argv[1:]; from pyramidflow.inference.plot_worker import _serve; _serve()"
# Plots need no BLAS threads; a thread pool numpy's BLAS would start costs the child about 0.05 s of CPU.
_ONE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


class PlotWorker:
    """Calls functions of :mod:`pyramidflow.inference.plots` in a child process, in the order submitted.

    The child starts at once and imports matplotlib while the caller goes on. :meth:`submit` returns a
    future of the function's result (the SVG's bytes); a function's error is raised by the future's
    ``result()``, as is the child's end. Use it as a context manager, or call :meth:`close`: it ends
    the child, whether or not its work was read.
    """

    def __init__(self) -> None:
        self._process: Optional[subprocess.Popen] = None
        # A session of its own: a Ctrl-C at the terminal stops eval, which ends the child (close), and no
        # traceback of the child's is printed beside eval's one line.
        session = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                   else {"start_new_session": True})
        try:
            if sys.executable:
                self._process = subprocess.Popen([sys.executable, "-c", _CHILD, *sys.path], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, env={**os.environ, **_ONE_THREAD}, **session)
        except OSError:  # no process to be had (a limit on processes): the plots are drawn in this one
            self._process = None
        # One thread that sends each request and waits for its reply (blocked on the pipe, it holds no lock):
        # the caller never waits on a pipe, and one request at a time never fills both pipes at once.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyramidflow-plots")

    def submit(self, function: str, *args: Any) -> Future:
        """Start ``plots.<function>(*args)``; the future holds its result."""
        return self._thread.submit(self._call, function, args)

    def _call(self, function: str, args: tuple) -> Any:
        if self._process is None:
            from . import plots

            return getattr(plots, function)(*args)
        try:
            self._process.stdin.write(pickle.dumps((function, args)))
            self._process.stdin.flush()
            ok, value = pickle.load(self._process.stdout)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
            raise RuntimeError(
                f"the report's plot process ended (exit status {self._process.poll()}) before drawing {function}: "
                f"{type(error).__name__}; its message, if any, is above. Rerun, or pass --no-report to skip the page."
            ) from error
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """End the child (at once: its work is read or no longer wanted) and the thread."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()  # a reply the thread waits for then ends in EOF, so the thread ends too
        self._thread.shutdown(wait=True, cancel_futures=True)
        if self._process is not None:
            self._process.wait()  # reaped: its CPU time counts in this process's children's
            for pipe in (self._process.stdin, self._process.stdout):
                pipe.close()

    def __enter__(self) -> "PlotWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve() -> None:
    """The child: import matplotlib, then answer requests until stdin ends."""
    import gc

    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a print in a library cannot garble the replies
    # No collector pass while matplotlib's import makes its objects, and none over them after: they live
    # as long as the process. The plots' own garbage is collected as usual.
    gc.disable()
    from . import plots

    plots.import_matplotlib()
    gc.freeze()
    gc.enable()
    while True:
        try:
            function, args = pickle.load(requests)
        except EOFError:
            break
        try:
            reply = pickle.dumps((True, getattr(plots, function)(*args)))
        except Exception as error:  # raised by the caller's future
            try:
                reply = pickle.dumps((False, error))
            except Exception:  # an error that does not pickle: its type and message
                reply = pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}")))
        replies.write(reply)
        replies.flush()
    replies.close()
    # Nothing is left to write or close: skip the interpreter's teardown, a tenth of a second of freeing objects.
    os._exit(0)
