"""The segment job, the same for every executor (in process, Ray Data, torchrun): plan, work, record, summarize.

- **plan** (:func:`plan_segment`): find the images (files, folders searched recursively; special files and files
  without an image extension noted), refuse colliding outputs, read the manifest, and leave out what is finished:
  an input whose latest record is "ok", made with the same settings, with its outputs present; with
  ``skip_existing`` also one whose outputs are all present without a record (a run killed between writing and
  recording, or an older run). Inputs recorded as failed are left out unless ``retry_failed``. A resume (a
  manifest is there, or ``skip_existing``) removes the hidden temporaries an interrupted run left.
- **work** (:class:`SegmentWorker`): one engine, built once; a batch of items in, one record per image out. Images
  are decoded in the worker, the same-size ones segmented in one ``segment_images`` call, and each output written
  atomically (``outputs.write_outputs``). A file that cannot be decoded, segmented or written becomes a failed
  record; the batch goes on.
- **record** (:func:`record_results`): the one writer appends each record to the manifest as it arrives, prints its
  failure and warnings, and advances the progress bar.
- **summarize** (:class:`SegmentSummary`): the same lines for every executor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from segformer_fast.core.fileio import check_output_folder, find_images, load_image, remove_stale_temporaries
from segformer_fast.core.runtime import parse_dtype
from segformer_fast.inference.segment import segment_images
from segformer_fast.jobs.manifest import MANIFEST_NAME, ManifestWriter, read_manifest
from segformer_fast.jobs.outputs import OUTPUT_KINDS, describe_error, output_paths, output_stems, write_outputs
from segformer_fast.jobs.predictors import build_forward
from segformer_fast.jobs.progress import Interrupted, plural, progress_bar
from segformer_fast.jobs.settings import SegmentSettings
from segformer_fast.model.segformer import Segformer
from segformer_fast.render.palettes import palette_for

#: Most names shown in one summary line.
SHOWN_NAMES = 5


# -------------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class SegmentPlan:
    """A segment job: every input, the items still to do, what earlier runs finished or failed, what was left out.

    An item is ``{"input": absolute path, kind: output path for each output kind}``."""

    out_dir: Path
    images: list
    todo: list
    done_before: int
    failed_before: list  # records
    fingerprint: dict
    special: list = dataclasses.field(default_factory=list)  # (path, reason): not regular files
    ignored: list = dataclasses.field(default_factory=list)  # files without an image extension
    torn_lines: list = dataclasses.field(default_factory=list)  # manifest line numbers skipped
    removed: list = dataclasses.field(default_factory=list)  # stale temporaries removed
    redone: int = 0  # images done before with other settings, to do again
    changed: list = dataclasses.field(default_factory=list)  # the settings that changed for them
    other_outputs: list = dataclasses.field(default_factory=list)  # files of kinds this run does not write
    shown_as: dict = dataclasses.field(default_factory=dict)  # absolute input -> the path as found from the inputs

    def shown(self, source: str) -> str:
        """An input as the user's arguments name it (the manifest keeps absolute paths)."""
        return self.shown_as.get(source, source)

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    def warnings(self) -> list[str]:
        """What planning found that a user should look at (stderr): special files, torn manifest lines."""
        lines = [f"skipped {path}: it {reason}" for path, reason in self.special]
        if self.torn_lines:
            lines.append(f"{self.manifest}: skipped {plural(len(self.torn_lines), 'torn line')} (line "
                         f"{', '.join(map(str, self.torn_lines))}) that an interrupted run left unfinished")
        return lines

    def notes(self) -> list[str]:
        """What planning did (stdout): temporaries removed, images already done."""
        lines = []
        if self.removed:
            lines.append(f"removed {plural(len(self.removed), 'temporary file')} an interrupted run left in "
                         f"{self.out_dir}")
        if self.done_before:
            lines.append(f"skipped {self.done_before} of {plural(len(self.images), 'image')} whose outputs already "
                         f"exist in {self.out_dir}")
        if self.redone:
            lines.append(f"redoing {plural(self.redone, 'image')} done before with other settings "
                         f"({', '.join(self.changed)} changed)")
        if self.other_outputs:
            names = ", ".join(str(path.relative_to(self.out_dir)) for path in self.other_outputs[:SHOWN_NAMES])
            more = f" and {len(self.other_outputs) - SHOWN_NAMES} more" if len(self.other_outputs) > SHOWN_NAMES else ""
            lines.append(f"{plural(len(self.other_outputs), 'file')} in {self.out_dir} this run does not write "
                         f"(other --outputs or settings of an earlier run) stay as they are: {names}{more}")
        return lines


def _json_copy(value):
    return json.loads(json.dumps(value))


def plan_segment(inputs, out_dir, settings: SegmentSettings, *, retry_failed: bool = False,
                 skip_existing: bool = False) -> SegmentPlan:
    """Plan a segment job (see the module docstring). The output folder rules of ``segment``: one that is or holds
    an input folder is refused, one inside an input folder is never read as input, and inputs whose outputs would
    collide are refused before anything runs. ValueError when no images are found; FileNotFoundError for a missing
    input."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, inputs)
    special, ignored = [], []
    images = find_images(inputs, exclude=[out_dir], skipped=special, ignored=ignored)
    if not images:
        lines = [f"skipped {path}: it {reason}" for path, reason in special]
        raise ValueError("\n".join(["no images found in " + ", ".join(str(p) for p in inputs), *lines,
                                    *left_out_lines(special, ignored)]))
    roots = [Path(p) for p in inputs]
    output_stems(images, roots)
    torn = []
    previous = read_manifest(out_dir / MANIFEST_NAME, torn)
    removed = remove_stale_temporaries(out_dir) if (previous or torn or skip_existing) and out_dir.is_dir() else []
    fingerprint = _json_copy(settings.fingerprint())
    todo, done_before, failed_before, redone, changed, other_outputs, shown_as = [], 0, [], 0, set(), [], {}
    other_kinds = [kind for kind in OUTPUT_KINDS if kind not in settings.kinds]
    for image in images:
        source = str(image.resolve())
        shown_as[source] = str(image)
        paths = output_paths(out_dir, image, roots, settings.kinds)
        other_outputs += [path for path in output_paths(out_dir, image, roots, other_kinds).values() if path.is_file()]
        present = all(path.is_file() for path in paths.values())
        record = previous.get(source)
        same = record is not None and record.get("settings", fingerprint) == fingerprint
        if present and ((same and record["status"] == "ok") or (skip_existing and record is None)):
            done_before += 1
        elif same and record["status"] == "failed" and not retry_failed:
            failed_before.append(record)
        else:
            if record is not None and not same and record["status"] == "ok":
                redone += 1
                changed.update(key for key, value in fingerprint.items() if record["settings"].get(key) != value)
            todo.append({"input": source, **{kind: str(path.resolve()) for kind, path in paths.items()}})
    return SegmentPlan(out_dir, images, todo, done_before, failed_before, fingerprint, special, ignored, torn,
                       removed, redone, sorted(changed), other_outputs, shown_as)


# -------------------------------------------------------------------------------------------------------- work
class SegmentWorker:
    """One engine, built once; ``segment_files(items)`` segments a batch of items (see :class:`SegmentPlan`) and
    writes their outputs, returning one record per item, in order."""

    def __init__(self, settings: SegmentSettings, device, worker: str):
        self.settings = settings
        self.worker = worker
        self.device = torch.device(device)
        self.dtype = parse_dtype(settings.dtype)
        model = Segformer.from_pretrained(settings.model).to(device=self.device)
        self.num_labels = model.config.num_labels
        self.palette = palette_for(self.num_labels)
        self.forward, self.label_options = build_forward(model, settings.engine, self.dtype)

    def _labels(self, images: list, notes: list, progress=None) -> list:
        """(H, W) numpy label maps for decoded images, the same-size ones in one forward; warnings and the mode
        "auto" chose are appended to ``notes``."""

        def say_choice(mode: str, size: tuple) -> None:
            how = "whole image" if mode == "whole" else "sliding windows"
            notes.append(f"mode auto chose {how} at {size[0]}x{size[1]}")

        with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            labels = segment_images(images, self.forward, num_labels=self.num_labels, device=self.device,
                                    dtype=self.dtype, mode=self.settings.mode, crop=self.settings.crop,
                                    stride=self.settings.stride,
                                    progress=progress, on_auto_choice=say_choice, **self.label_options,
                                    **self.settings.resize())
        notes.extend(str(warning.message) for warning in caught)
        return [label.cpu().numpy() for label in labels]

    def segment_files(self, items: list, progress=None) -> list:
        """Records for ``items``; ``progress(done, total)`` gets the sliding windows of a one-image batch."""
        records = [{"input": item["input"], "output": item.get("labels") or next(
            value for key, value in item.items() if key != "input" and value), "status": "ok", "error": None,
                    "worker": self.worker, "seconds": 0.0, "notes": []} for item in items]
        decoded = []  # (index, image)
        for index, item in enumerate(items):
            start = time.perf_counter()
            try:
                decoded.append((index, load_image(item["input"])))
            except (ValueError, OSError) as error:
                records[index].update(status="failed", error=describe_error(error, item["input"]))
            records[index]["seconds"] += time.perf_counter() - start
        all_labels, notes = None, []
        if len(decoded) > 1 or (decoded and progress is None):
            start = time.perf_counter()
            try:
                all_labels = self._labels([image for _, image in decoded], notes)
            except Exception:  # a batch-level failure (say out of memory): try each image alone to find the bad one
                notes = []
            if all_labels is not None:
                for index, _ in decoded:
                    records[index]["seconds"] += (time.perf_counter() - start) / len(decoded)
                    records[index]["notes"] = list(notes)
        for position, (index, image) in enumerate(decoded):
            start = time.perf_counter()
            item = items[index]
            try:
                if all_labels is None:
                    labels = self._labels([image], records[index]["notes"], progress)[0]
                else:
                    labels = all_labels[position]
                paths = {kind: path for kind, path in item.items() if kind != "input" and path}
                write_outputs(image, labels, self.palette, paths, self.settings.alpha)
            except Exception as error:  # one bad image (out of memory, unwritable output, ...) must not stop the run
                records[index].update(status="failed", error=describe_error(error, item["input"]))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # frees what the failed image left cached
            records[index]["seconds"] += time.perf_counter() - start
        return records


# ------------------------------------------------------------------------------------------------------ record
def record_results(plan: SegmentPlan, records, *, progress: bool, workers: int, start: float) -> "SegmentSummary":
    """Append each record to the manifest as it arrives (with the plan's settings), print its failure and notes,
    advance the progress bar, and summarize. Ctrl-C ends in :class:`Interrupted` with how far the job got."""
    bar = progress_bar(len(plan.todo), progress, "segment")
    succeeded, failed = 0, []
    try:
        with ManifestWriter(plan.manifest) as writer:
            for record in records:
                notes = record.pop("notes", None) or []
                writer.write({**record, "settings": plan.fingerprint})
                for note in notes:
                    tqdm.write(f"{plan.shown(record['input'])}: {note}", file=sys.stderr)
                if record["status"] == "ok":
                    succeeded += 1
                else:
                    failed.append(record)
                    tqdm.write(f"failed {plan.shown(record['input'])}: {record['error']}", file=sys.stderr)
                bar.update(1)
    except KeyboardInterrupt:
        raise Interrupted(succeeded + len(failed), len(plan.todo), before=plan.done_before) from None
    finally:
        bar.close()
    return SegmentSummary(plan, succeeded, failed, time.perf_counter() - start, workers)


# --------------------------------------------------------------------------------------------------- summarize
def left_out_lines(special: list, ignored: list) -> list[str]:
    """Summary lines for the files of the input folders that were not images: special files (named on stderr as
    they were found) and files without an image extension."""
    lines = []
    if special:
        what = "is not a regular file" if len(special) == 1 else "are not regular files"
        lines.append(f"skipped {plural(len(special), 'file')} that {what} (named above)")
    if ignored:
        names = ", ".join(str(path) for path in ignored[:SHOWN_NAMES])
        more = f" and {len(ignored) - SHOWN_NAMES} more" if len(ignored) > SHOWN_NAMES else ""
        lines.append(f"ignored {plural(len(ignored), 'file')} without an image extension: {names}{more}")
    return lines


@dataclasses.dataclass
class SegmentSummary:
    """What a segment job did: ``failed`` holds this run's failure records; the plan holds the earlier ones a
    resume kept (``retry_failed`` tries them again)."""

    plan: SegmentPlan
    succeeded: int
    failed: list
    seconds: float
    workers: int
    report: bool = True  # False on torchrun ranks other than 0, which print nothing

    @property
    def out_dir(self) -> Path:
        return self.plan.out_dir

    @property
    def total(self) -> int:
        return len(self.plan.images)

    @property
    def done_before(self) -> int:
        return self.plan.done_before

    @property
    def failed_before(self) -> list:
        return self.plan.failed_before

    @property
    def processed(self) -> int:
        return self.succeeded + len(self.failed)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.failed_before else 0

    def format(self) -> str:
        """``segmented N of M images into OUT (K already done, F failed)``, the speed, the failures, what was
        left out of the input folders."""
        plan = self.plan
        notes = [f"{plan.done_before} already done" if plan.done_before else "",
                 f"{plan.redone} redone with these settings" if plan.redone else "",
                 f"{len(self.failed)} failed" if self.failed else "",
                 f"{len(plan.failed_before)} failed in an earlier run" if plan.failed_before else ""]
        notes = [note for note in notes if note]
        lines = [f"segmented {self.succeeded} of {plural(len(plan.images), 'image')} into {plan.out_dir}"
                 + (f" ({', '.join(notes)})" if notes else "")]
        if self.processed and self.seconds > 0:
            lines.append(f"{plural(self.processed, 'image')} in {self.seconds:.1f} s: "
                         f"{self.processed / self.seconds:.2f} images/s with {plural(self.workers, 'worker')}")
        return "\n".join(lines + left_out_lines(plan.special, plan.ignored))

    def failure_lines(self) -> list[str]:
        """The failures, for stderr: this run's and those an earlier run recorded."""
        lines = []
        if self.failed:
            lines.append(f"{plural(len(self.failed), 'image')} failed:")
            lines += [f"  {self.plan.shown(record['input'])}: {record['error']}" for record in self.failed]
        if self.failed_before:
            lines.append(f"{plural(len(self.failed_before), 'image')} failed in an earlier run (--retry-failed "
                         "tries them again):")
            lines += [f"  {self.plan.shown(record['input'])}: {record['error']}" for record in self.failed_before]
        return lines

