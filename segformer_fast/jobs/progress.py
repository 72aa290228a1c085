"""How a job reports while it runs, whichever executor runs it: the progress bar, the counted words (``plural``),
and :class:`Interrupted`, how far a job got when Ctrl-C stopped it."""

from __future__ import annotations

import sys

from tqdm import tqdm


def plural(count: int, noun: str) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def progress_bar(total: int, enabled: bool, desc: str):
    """A bar of ``total`` images on stderr (an inert one when not ``enabled``)."""
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr)


class Interrupted(Exception):
    """Ctrl-C during a job: how far it got, counted as its progress bar counts (``done`` of the ``total`` images
    this run had to do; ``before``: images an earlier run finished, not counted). The manifest holds every finished
    image, so a re-run resumes."""

    def __init__(self, done: int, total: int, resumable: bool = True, before: int = 0):
        self.done, self.total = done, total
        earlier = f" ({before} done before)" if before else ""
        again = "; run the same command again to resume" if resumable else ""
        super().__init__(f"interrupted after {done} of {plural(total, 'image')}{earlier}{again}")
