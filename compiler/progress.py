"""Stage timing and progress bars for long compile steps.

Compiler stages report to the *current* reporter (a context variable), so code deep inside the
compiler (the pass pipeline, codegen's NVRTC compile) needs no extra parameters to show progress:

    from nnc.progress import current

    with current().stage("nvrtc", total=len(programs)) as task:   # timed as stage "nvrtc"
        for fut in as_completed(futures):
            task.advance()                                         # one program done

or, inside a stage someone else opened (codegen.emit opens "nvrtc" around the CUDA compile):

    task = current().task          # the innermost open stage's task (a no-op one if none)
    task.set_total(len(programs))
    ...; task.advance()

`Reporter` records stage times (`times`, seconds per stage name) and, when `verbose`, prints `log()`
lines to stderr. `RichReporter` also draws a transient rich progress bar on stderr; `make_reporter`
picks it only when stderr is a terminal, so pipes and CI logs get no escape codes. Outside any
`use(reporter)` block, `current()` is a reporter that does nothing (library calls stay silent).
All rich-specific code lives in this module.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from typing import Iterator, Optional, TextIO

SHOW_AFTER_S = 0.5  # a bar appears only for a step still running after this long (no flicker)


class Task:
    """Progress of one open stage. The base class is what a non-drawing reporter hands out."""

    def set_total(self, total: Optional[int]) -> None:
        """How many units the stage has (None: unknown, the bar pulses)."""

    def advance(self, n: int = 1) -> None:
        """n more units done."""

    def describe(self, text: str) -> None:
        """What the stage is doing now (e.g. the pass that is running)."""


class Reporter:
    """Times stages; prints `log` lines to `stream` when verbose. Draws nothing."""

    def __init__(self, verbose: bool = False, stream: Optional[TextIO] = None):
        self.verbose = verbose
        self.stream = stream
        self.times: dict[str, float] = {}
        self._open: list[Task] = []

    @property
    def task(self) -> Task:
        return self._open[-1] if self._open else Task()

    @contextlib.contextmanager
    def stage(self, name: str, total: Optional[int] = None) -> Iterator[Task]:
        t0 = time.perf_counter()
        task = self._start(name, total)
        self._open.append(task)
        try:
            yield task
        finally:
            self._open.pop()
            self._finish(task)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=self.stream or sys.stderr, flush=True)

    # display hooks (RichReporter)
    def _start(self, name: str, total: Optional[int]) -> Task:
        return Task()

    def _finish(self, task: Task) -> None:
        pass


class _Silent(Reporter):
    """current() outside any use(): records nothing, so a long-lived process accumulates nothing."""

    @contextlib.contextmanager
    def stage(self, name: str, total: Optional[int] = None) -> Iterator[Task]:
        yield Task()


class _RichTask(Task):
    def __init__(self, rep: "RichReporter", task_id, name: str):
        self._rep, self._id, self._name = rep, task_id, name

    def set_total(self, total):
        self._rep._bar.update(self._id, total=total)

    def advance(self, n=1):
        self._rep._bar.advance(self._id, n)

    def describe(self, text):
        self._rep._bar.update(self._id, description=f"{self._name}: {text}")


class RichReporter(Reporter):
    """A Reporter that also shows a transient rich progress bar (on stderr) for every open stage
    that lasts longer than SHOW_AFTER_S."""

    def __init__(self, verbose: bool = False, stream: Optional[TextIO] = None):
        super().__init__(verbose, stream)
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)
        self._console = Console(file=stream or sys.stderr, stderr=stream is None)
        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), console=self._console,
                             transient=True, redirect_stdout=False)  # stdout (IR, tables) stays stdout
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None
        self._shown = False

    def _show(self):
        with self._lock:
            if self._timer is not None and not self._shown:
                self._bar.start()
                self._shown = True

    def _start(self, name, total):
        with self._lock:
            if not self._open and self._timer is None:  # outermost stage: arm the delayed display
                self._timer = threading.Timer(SHOW_AFTER_S, self._show)
                self._timer.daemon = True
                self._timer.start()
        return _RichTask(self, self._bar.add_task(name, total=total), name)

    def _finish(self, task):
        self._bar.remove_task(task._id)
        if not self._open:
            with self._lock:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if self._shown:
                    self._bar.stop()
                    self._shown = False

    def log(self, msg):
        if self.verbose:
            if self._shown:  # above the live bar, not through it
                self._console.print(msg, markup=False, highlight=False)
            else:
                super().log(msg)


def make_reporter(verbose: bool = False, stream: Optional[TextIO] = None) -> Reporter:
    """A RichReporter when `stream` (default stderr) is a terminal, else a plain Reporter."""
    s = stream or sys.stderr
    try:
        tty = s.isatty()
    except (AttributeError, ValueError):
        tty = False
    return RichReporter(verbose, stream) if tty else Reporter(verbose, stream)


_SILENT = _Silent()
_CURRENT: contextvars.ContextVar[Reporter] = contextvars.ContextVar("nnc_progress", default=_SILENT)


def current() -> Reporter:
    """The reporter compile stages report to (a silent one outside `use`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(reporter: Reporter) -> Iterator[Reporter]:
    """Makes `reporter` current for the block."""
    token = _CURRENT.set(reporter)
    try:
        yield reporter
    finally:
        _CURRENT.reset(token)


def stage(name: str, total: Optional[int] = None):
    """`current().stage(name, total)`: times a compile stage (and shows it when drawing)."""
    return current().stage(name, total)
