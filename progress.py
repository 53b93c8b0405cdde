"""
progress.py: one progress line for every long phase (loading a checkpoint, de-quantising a GGUF,
tokenising a data set, evaluating, scoring), in the style of train.py's step lines:

    tokenise arc-e,obqa 3072/7176 examples | 230.4 examples/s | eta 0m17s
    tokenise arc-e,obqa 7176/7176 examples | 231.0 examples/s | done in 0m31s

A phase stays silent for its first AFTER seconds (a short one prints nothing), then updates the line
every EVERY seconds: in place (carriage return) on a terminal, as a new line every LOG_EVERY seconds
when stderr goes to a file. The rate is the mean since the phase began and the ETA assumes it holds.
Progress goes to stderr, so the results on stdout stay clean. Checked by test_progress_* in
test_all.py (the lines of a phase on a fake clock, silence for a short phase).

    with Progress("load model", total=len(names), unit="tensors") as p:
        for name in names:
            ...; p.update()
    for e in track(examples, "tokenise", unit="examples"):   # the same, around an iterable
        ...
"""
import sys
import time

AFTER = 2.0       # seconds a phase runs before its first line
EVERY = 0.5       # seconds between updates on a terminal
LOG_EVERY = 10.0  # seconds between lines in a log file


def format_eta(seconds):
    """1m05s, the ETA format of every progress line (train.py's steps too)."""
    s = int(max(seconds, 0))
    return f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A counter that prints `what done/total unit | rate unit/s | eta` to `file` (stderr) while the phase
    runs longer than `after` seconds (None: AFTER), and a last `done in` line when it closes, if it printed anything.
    total None: the count and rate only. `clock` is time.monotonic (a test passes its own)."""

    def __init__(self, what, total=None, unit="", after=None, file=None, clock=time.monotonic):
        self.what, self.total, self.unit, self.clock = what, total, unit, clock
        self.after = AFTER if after is None else after
        self.file = file or sys.stderr
        tty = getattr(self.file, "isatty", lambda: False)()
        self.every, self.end = (EVERY, "\r") if tty else (LOG_EVERY, "\n")
        self.done, self.t0, self.shown, self.width = 0, clock(), None, 0

    def line(self, now, final=False):
        rate = self.done / max(now - self.t0, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        text = f"{self.what} {count}{unit} | {rate:.1f} {self.unit or 'items'}/s"
        if final:
            return text + f" | done in {format_eta(now - self.t0)}"
        if self.total is not None:
            text += f" | eta {format_eta((self.total - self.done) / rate if rate else 0)}"
        return text

    def show(self, text, end):
        # padded to the last line's width, so a shorter line fully overwrites it on a terminal
        print(text.ljust(self.width) if self.end == "\r" else text, end=end, file=self.file, flush=True)
        self.width = len(text)

    def update(self, n=1):
        self.done += n
        now = self.clock()
        if now - self.t0 >= self.after and (self.shown is None or now - self.shown >= self.every):
            self.shown = now
            self.show(self.line(now), self.end)

    def close(self):
        if self.shown is not None:
            self.show(self.line(self.clock(), final=True), "\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(items, what, total=None, unit="", **kw):
    """Yield the items of `items` with a Progress line (total: len(items) where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(what, total, unit, **kw) as p:
        for x in items:
            yield x
            p.update()
