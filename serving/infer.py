"""``wsss infer``: image files, folders, globs or a list of files through the bytes ensemble.

Each image travels as its own encoded bytes to ``wsss_pipeline_bytes``: the server decodes
and resizes it, and sends the masks back at the image's size. ``concurrency`` requests are
in flight, one thread and one client each: one way for both protocols, within a few per
cent of tritonclient's gRPC ``async_infer`` (reports/bench/infer_folder.md). Every file
lands atomically (a temporary name in its folder, then ``os.replace``) under a path that
mirrors the image's subfolder, so an interrupted run leaves whole files only and ``resume``
carries on from it. Bytes the server cannot read as an image fail that image alone: it is
listed at the end and the run goes on. Class names and mask colours are the server's own
(its ensemble's config).

Every image's outcome is also a line of ``<out>/predictions.jsonl``, appended as it lands:
the classes the photo holds (at the server's own thresholds), every class's score, each
class's share of the masks' pixels and the files written, or why it failed. ``resume``
skips an image whose latest record says it was written, from the same file as now (its
path, size and modification time), by the model answering now, and whose files are all
there.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from serving.client import ClientError, PipelineClient, load_image, present_at, resize
from wsss.palette import VOC_PALETTE
from wsss.served.images import IMAGE_SUFFIXES, MAX_ENCODED_BYTES
from wsss.tensors import (
    CAMS,
    PIPELINE,
    PIPELINE_BYTES,
    PSEUDO_MASK,
    PSEUDO_MASK_FULL,
    SCORES,
    SEGMENTATION,
    SEGMENTATION_FULL,
    class_label,
)

# Each full-size mask and the file it is written as: <stem>_pseudo_mask.png, _segmentation.png
MASK_FILES = {PSEUDO_MASK_FULL: PSEUDO_MASK.lower(), SEGMENTATION_FULL: SEGMENTATION.lower()}
FIGURE = "overlay"  # <stem>_overlay.png, with figures on
FIGURE_SIDE = 448  # px, each panel's longer side: the masks' edges large enough to judge
PREDICTIONS = "predictions.jsonl"  # <out>/predictions.jsonl: one record per image
RETRY_FIRST, RETRY_MOST = 0.5, 8.0  # seconds between tries of a request the server failed
MIXED_VERSIONS = "MIXED_VERSIONS"  # scores of another export than the version that answered
_FIGURE_LOCK = threading.Lock()  # matplotlib's pyplot is not thread-safe


@dataclass(frozen=True)
class Item:
    """One image to send, and where its files go: ``name`` is its path relative to the root
    it was found under (the folder, a glob's fixed part, the named files' common folder),
    less its suffix."""

    path: Path
    name: Path

    def output(self, out: Path, what: str) -> Path:
        if self.name.is_absolute() or ".." in self.name.parts:  # never outside ``out``
            raise ClientError(f"{self.path}: output name {self.name} leaves the output folder")
        return out / self.name.parent / f"{self.name.name}_{what}.png"


@dataclass(frozen=True)
class Failure:
    path: Path
    reason: str


@dataclass
class InferOptions:
    out: Path = Path("out/infer")
    concurrency: int = 1  # requests in flight
    figures: bool = False  # also draw <stem>_overlay.png (one more request, and matplotlib)
    resume: bool = False  # skip images recorded as written whose files are all there
    progress: bool = True  # a progress bar on stderr, where stderr is a terminal
    # How long an image whose request failed on the server's side (not the image's: a stub
    # the watchdog is restarting, the server restarting) is tried again, backing off from
    # RETRY_FIRST to RETRY_MOST seconds between tries; 0 stops the run at the first failure.
    retry_seconds: float = 60.0


@dataclass
class InferReport:
    done: list[dict] = field(default_factory=list)  # in the order the images were found
    skipped: int = 0  # with resume: already written
    redone: int = 0  # with resume: written before, by another model than the one answering
    earlier: int = 0  # without resume: images recorded by earlier runs, appended to
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0  # from the first request sent to the last file written

    @property
    def images_per_s(self) -> float:
        return len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def summary(self, out: Path) -> str:
        total = len(self.done) + self.skipped + len(self.failed)
        again = f" ({self.redone} of them answered before by another model)" if self.redone else ""
        parts = [f"{len(self.done)} written{again}"]
        parts += [f"{self.skipped} already there"] if self.skipped else []
        parts += [f"{len(self.failed)} unreadable"] if self.failed else []
        rate = f" in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)" if self.done else ""
        line = f"{_images(total)} -> {out}: {', '.join(parts)}{rate}"
        if self.earlier:
            line += (
                f"\n{out / PREDICTIONS} already held records of {_images(self.earlier)} from "
                "earlier runs: each image's latest record is its answer, and each names the "
                "model that gave it"
            )
        return line

    def failures(self) -> str:
        lines = [f"{_images(len(self.failed))} could not be read:"]
        return "\n".join(lines + [f"  {f.path}: {f.reason}" for f in self.failed])


def run(sources: list[str], url: str, protocol: str, options: InferOptions) -> InferReport:
    """``wsss infer``: find the images ``sources`` name and send them; sources that name
    nothing are listed with the unreadable images."""
    skipped: list[Path] = []
    items, missing = find_images(sources, exclude=options.out, skipped=skipped)
    if skipped:
        shown = ", ".join(map(str, skipped[:3])) + (", ..." if len(skipped) > 3 else "")
        print(
            f"wsss: left out {len(skipped)} folder{'s' if len(skipped) > 1 else ''} that "
            f"`wsss infer` wrote (each holds {PREDICTIONS}): {shown}",
            file=sys.stderr,
        )
    if not items and not missing:
        raise ClientError(f"no images in {', '.join(sources)} (suffixes {_suffixes()})")
    report = infer_images(items, url, protocol, options) if items else InferReport()
    report.failed = missing + report.failed
    return report


def _images(n: int) -> str:
    return f"{n} image{'' if n == 1 else 's'}"


def _suffixes() -> str:
    return " ".join(sorted(IMAGE_SUFFIXES))


def find_images(
    sources: Iterable[str],
    exclude: Path | None = None,
    writes: bool = True,
    skipped: list[Path] | None = None,
):
    """Files, folders (walked recursively for image suffixes) and globs -> (items, failures:
    sources that name nothing). Walks and globs leave out hidden names, ``exclude`` and the
    folders below their root that an earlier ``wsss infer`` wrote (they hold its
    PREDICTIONS file: its masks are no photos), listed in ``skipped``. The same file found
    twice is sent once; with ``writes``, two that would write the same files (``cat.jpg``
    and ``cat.png``) are an error."""
    items, failures, named = [], [], []
    skipped = [] if skipped is None else skipped
    for source in sources:
        path = Path(source)
        if path.is_file():
            named.append(path)
            continue
        root = path if path.is_dir() else _fixed_part(source) if glob.has_magic(source) else None
        if root is None:
            failures.append(Failure(path, "no such file or folder"))
            continue
        # ``exclude`` (the output folder) is left out where it lies inside what is read; one
        # above it holds nothing of it; the folder read itself would read its masks back.
        if exclude is not None and root.resolve() == exclude.resolve():
            raise ClientError(
                f"--out {exclude} is the folder {source} reads images from: the masks "
                "written there would be read as photos by the next run. Choose another "
                "output folder (one inside it is left out of the walk)"
            )
        out = exclude if exclude is not None and _inside(exclude, root) else None
        if path.is_dir():
            items += _relative_to(path, _walk(path, out, skipped))
        else:
            matches = [Path(p) for p in sorted(glob.glob(source, recursive=True))]
            written: dict[Path, bool] = {}  # each folder's answer, asked once
            found = [
                p
                for p in matches
                if _is_image(p) and not _inside(p, out) and not _written(p, root, skipped, written)
            ]
            items += _relative_to(root, found)
    if named:
        root = os.path.commonpath([_absolute(p).parent for p in named])
        items += _relative_to(Path(root), named)
    return _unique(items, writes), failures


def _walk(folder: Path, exclude: Path | None, skipped: list[Path]) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(folder):
        kept = []
        for d in sorted(dirs):
            sub = Path(parent, d)
            if d.startswith(".") or _inside(sub, exclude):
                continue
            # An earlier run's output: masks, not photos (a linked folder os.walk never enters)
            if not sub.is_symlink() and (sub / PREDICTIONS).is_file():
                skipped.append(sub)
                continue
            kept.append(d)
        dirs[:] = kept
        found += [Path(parent, f) for f in sorted(files) if _is_image(Path(parent, f))]
    return found


def _written(path: Path, root: Path, skipped: list[Path], seen: dict[Path, bool]) -> bool:
    """Whether ``path`` lies in a folder below ``root`` that ``wsss infer`` wrote (noted in
    ``skipped`` once; ``seen`` keeps each folder's answer, so a glob of many photos in one
    folder looks once)."""
    top = _absolute(root)
    for folder in path.parents:
        if _absolute(folder) == top or not _absolute(folder).is_relative_to(top):
            return False
        if folder not in seen:
            seen[folder] = (folder / PREDICTIONS).is_file()
            if seen[folder]:
                skipped.append(folder)
        if seen[folder]:
            return True
    return False


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder.resolve())


def _is_image(path: Path) -> bool:
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )


def _fixed_part(pattern: str) -> Path:
    """A glob's folders before its first wildcard: the root its matches mirror from."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:first])


def _absolute(path: Path) -> Path:
    """``path`` from the root, its ``..`` folded in (``Path.absolute`` keeps them, and a
    name relative to a root with ``..`` in it would climb out of the output folder);
    symbolic links are kept, as found."""
    return Path(os.path.abspath(path))


def _relative_to(root: Path, paths: list[Path]) -> list[Item]:
    root = _absolute(root)
    items = []
    for path in paths:
        full = _absolute(path)
        if not full.is_relative_to(root):  # a glob climbing above its fixed part ('*/../x')
            raise ClientError(f"{path} is outside {root}: name it, or its folder, instead")
        items.append(Item(path, full.relative_to(root).with_suffix("")))
    return items


def _unique(items: list[Item], writes: bool = True) -> list[Item]:
    seen, by_name, unique = set(), {}, []
    for item in items:
        real = os.path.realpath(item.path)
        if real in seen:
            continue
        seen.add(real)
        by_name.setdefault(item.name, []).append(item.path)
        unique.append(item)
    clashes = [paths for paths in by_name.values() if len(paths) > 1]
    if clashes and writes:
        shown = "; ".join(" and ".join(map(str, paths)) for paths in clashes[:5])
        raise ClientError(
            f"{len(clashes)} set{'s' if len(clashes) > 1 else ''} of images would write the "
            f"same files ({shown}): "
            "rename them or send them in separate runs"
        )
    return unique


def read_list(source: str) -> list[str]:
    """A file list: one path (or folder, or glob) per line, relative to the current folder;
    blank lines and # comments skipped; ``-`` reads standard input."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


class _Unreadable(Exception):
    """This image alone failed: a file that cannot be read, or bytes the server refused."""


class _Run:
    """One run's clients (one per thread, sharing what the first read from the server) and
    the work on one image."""

    def __init__(self, url: str, protocol: str, options: InferOptions):
        self.options = options
        self.lock = threading.Lock()
        self.local = threading.local()
        self.base = PipelineClient(url, protocol, PIPELINE_BYTES)
        self.clients: list[PipelineClient] = [self.base]
        self.server = self.base.url
        # Each export that answered, by version: the client that read it (class names,
        # colours, thresholds, shapes) and its identity. The newest is the run's.
        self.exports = {self.base.version: (self.base, self.identity(self.base, self.base.version))}
        self.retry = Retry(options.retry_seconds, self.said_retrying, transient=mid_reload)

    @property
    def model(self) -> dict:
        """The identity of the newest export this run has read."""
        return self.exports[self.base.version][1]

    @staticmethod
    def identity(base: PipelineClient, version: int | None) -> dict:
        """What answered, in every record: a folder's records from two servers or two exports
        tell themselves apart, and --resume redoes what another model answered. The export's
        version (the ensemble's: an export writes every model at one version), the name the
        export gave itself (two repositories' version 1 differ) and the classes it names, not
        the address it was reached at."""
        names = json.dumps(base.class_names).encode()
        model = {"ensemble": PIPELINE_BYTES, "version": version}
        if base.export_id is not None:  # an export from before it has none
            model["export"] = base.export_id
        return {**model, "classes": hashlib.sha256(names).hexdigest()[:12]}

    def answered_by(self, version: int | None) -> tuple[PipelineClient, dict]:
        """The client that read the export which answered with ``version`` and its identity:
        one this run has read, or, where the server loaded a newer export mid-run, that one,
        read from the server once (the threads' clients are forked from it anew). An older
        one never read (an answer in flight when the run began) is named by its version."""
        with self.lock:
            if version in self.exports:
                return self.exports[version]
            newest = self.base.version
            if version is None or (newest is not None and version < newest):
                base, model = self.exports[newest]
                # What the older export called itself is in no config the server still holds.
                model = {k: v for k, v in model.items() if k != "export"}
                return base, {**model, "version": version}
            fresh = PipelineClient(self.base.url, self.base.protocol, PIPELINE_BYTES)
            self.clients.append(fresh)
            fresh.version = version  # what answered; its metadata may name a newer one yet
            self.exports[version] = (fresh, self.identity(fresh, version))
            self.base = fresh
            return self.exports[version]

    def client(self, model: str = PIPELINE_BYTES) -> PipelineClient:
        """This thread's client of ``model``, forked from the newest export's."""
        clients = self.local.__dict__.setdefault("clients", {})
        if model not in clients or clients[model][0] is not self.base:
            fork = self.base.fork(model)
            clients[model] = (self.base, fork)
            with self.lock:
                self.clients.append(fork)
        return clients[model][1]

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def said_retrying(self, error: ClientError) -> None:
        """The server failed a request, and it is being tried again (``Retry``: once)."""
        print(
            f"wsss infer: the server failed a request ({error}); trying again for up to "
            f"{self.options.retry_seconds:g} s (--retry-seconds)",
            file=sys.stderr,
            flush=True,
        )

    def one(self, item: Item) -> dict:
        try:
            source = file_identity(item.path)
            if source["bytes"] > MAX_ENCODED_BYTES:  # not read whole only to be refused
                raise _Unreadable(
                    f"a file of {source['bytes']:,} bytes: the server reads images of at most "
                    f"{MAX_ENCODED_BYTES:,}"
                )
            data = item.path.read_bytes()
        except OSError as exc:
            raise _Unreadable(exc.strerror or str(exc)) from exc
        try:
            outputs, cams, base, model = self.retry(lambda: self.answer(data))
        except FailedOnInput as exc:  # listed, not sent again to crash the server anew
            raise _Unreadable(str(exc)) from exc
        except ClientError as exc:
            if not exc.invalid_input or mid_reload(exc):  # the server's, tried again: stop
                raise
            raise _Unreadable(exc.reason) from exc
        palette = base.palette or VOC_PALETTE
        files = {
            what: write_mask(outputs[key][0], palette, item.output(self.options.out, what))
            for key, what in MASK_FILES.items()
        }
        if cams is not None:
            files[FIGURE] = self.figure(
                data, outputs, cams, base, item.output(self.options.out, FIGURE)
            )
        masks = {what: outputs[key][0] for key, what in MASK_FILES.items()}
        binary = base.mask_classes == 2
        record = prediction(outputs[SCORES][0], masks, base.class_names, base.presence, binary)
        label, score = top_class(outputs[SCORES][0], base.class_names)
        return {
            "image": str(item.path),
            "name": item.name.as_posix(),
            "source": source,
            "server": self.server,
            "model": model,
            "status": "ok",
            "top_class": label,
            "score": score,
            **record,
            "files": {what: str(path) for what, path in files.items()},
        }

    def answer(self, data: bytes) -> tuple[dict, np.ndarray | None, PipelineClient, dict]:
        """``send``'s outputs and CAMs, and the client and identity of the export that
        answered. While an export with other classes loads, a composing model of the new one
        may answer under the ensemble's old version (Triton swaps models one at a time, over
        seconds): scores that the version's class names do not cover are not labelled with
        them but sent again (a swap of as many classes cannot be told apart)."""
        outputs, cams = self.send(data)
        base, model = self.answered_by(self.answered)
        names, count = base.class_names, outputs[SCORES].shape[-1]
        if names is not None and count != len(names):
            raise ClientError(
                f"{count} class scores came back under an export of {len(names)} classes "
                f"(version {self.answered}): the server is loading an export of other classes",
                status=MIXED_VERSIONS,
                sent=True,
            )
        return outputs, cams, base, model

    def send(self, data: bytes) -> tuple[dict, np.ndarray | None]:
        """The bytes ensemble's outputs for one encoded image and, with figures, the CAMs
        (which only the tensor ensemble returns) from the same export: where an export
        lands between the two requests, both are sent again. ``self.answered`` (this
        thread's): the version that answered."""
        for _ in range(3):
            images = self.client()
            outputs = images.infer_encoded([data])
            self.answered = images.answered
            if not self.options.figures:
                return outputs, None
            if images.answered is not None and images.answered != self.base.version:
                self.answered_by(images.answered)  # a new export: the CAMs at its shapes
            tensors = self.client(PIPELINE)
            image = load_image(data, tensors.image_size)[None]
            cams = tensors.infer(image, [CAMS])[CAMS][0]
            if tensors.answered == images.answered:
                return outputs, cams
        raise ClientError(
            f"{PIPELINE_BYTES} answers with version {images.answered} and {PIPELINE} with "
            f"{tensors.answered} (3 tries): for --figures both must serve one export (did "
            "one fail to load?); run without --figures, or once both serve the same version"
        )

    @property
    def answered(self) -> int | None:
        return getattr(self.local, "answered", None)

    @answered.setter
    def answered(self, version: int | None) -> None:
        self.local.answered = version

    def figure(
        self, data: bytes, outputs: dict, cams: np.ndarray, base: PipelineClient, path: Path
    ) -> Path:
        """Image, CAM of the top class the masks hold (at the server's thresholds),
        pseudo-mask and segmentation: the masks written (the bytes ensemble's, at the photo's
        size) and the CAM the tensor ensemble gives for the image at the model size, drawn at
        the photo's own aspect (its longer side FIGURE_SIDE, or the model's where larger)."""
        from wsss.figures import legend_entries, overlay, panel_figure  # matplotlib: when drawing

        photo = load_image(data)
        scores = outputs[SCORES][0]
        top = int(scores.argmax())
        label, score = top_class(scores, base.class_names)
        cam = f"CAM: {label} ({score:.2f})"
        presence = base.presence
        if presence is not None:  # the CAM of a class the masks hold, as the legend says
            present = present_at(scores, presence)
            if present:
                top = max(present, key=lambda c: scores[c])
                cam = f"CAM: {class_label(base.class_names, top)} ({scores[top]:.2f})"
            else:
                cam += ", below the thresholds"
        h, w = photo.shape[:2]
        side = max(FIGURE_SIDE, *base.image_size) / max(h, w)
        shape = (max(1, round(h * side)), max(1, round(w * side)))
        shown = resize(photo, shape)
        masks = [resize(outputs[k][0], shape, nearest=True) for k in MASK_FILES]
        palette = base.palette or VOC_PALETTE
        panels = {
            "image": shown,
            cam: resize(cams[top], shape),
            "pseudo-mask": overlay(shown, masks[0], palette=palette),
            "segmentation": overlay(shown, masks[1], palette=palette),
        }
        # The classes the masks hold, named and coloured as the server says (binary masks:
        # the foreground, named by the top class).
        names = [label] if base.mask_classes == 2 else base.class_names or []
        legend = legend_entries(masks, names, palette)
        with _FIGURE_LOCK:
            return atomic_write(
                path,
                lambda tmp: panel_figure(
                    [panels], list(panels), tmp, legend=legend, panel_inches=FIGURE_SIDE / 110
                ),
            )


# What a composing model says of a tensor another model of the same ensemble made: with the
# bytes ensemble (one input, built by the client) never the image's fault, but an export of
# other tensors loading model by model (the segmenter's "unexpected shape for input ...
# Expected [-1,160,160,3], got [1,128,128,3]", for the seconds the swap takes).
_MID_RELOAD = re.compile(
    r"unexpected shape for input|unexpected datatype|expects? \d+ inputs?|unexpected inference"
)


def mid_reload(exc: ClientError) -> bool:
    """Whether a failure is one model's tensors meeting another export's (``_MID_RELOAD``,
    ``MIXED_VERSIONS``): the server's passing state while an export loads."""
    if exc.status == MIXED_VERSIONS:
        return True
    return exc.invalid_input and bool(_MID_RELOAD.search(exc.reason or str(exc)))


class Retry:
    """One run's retries of requests the server failed on its side (``ClientError.sent``
    and not the input's fault: a stub the watchdog is reloading, the server restarting),
    RETRY_FIRST seconds after a failure and twice as long each time after, at most
    RETRY_MOST, while the outage (one clock for every thread: from the first failure to the
    next answer) is shorter than ``seconds``; ``said(error)`` at the first failure tried
    again.
    ``stop()`` ends every wait at once (Ctrl-C, another image's error): the last error is
    raised.

    A request that fails again after the server has answered others in between is a
    suspect: a model may crash on its image (the watchdog reloading it each time), or it
    only shared the crash of another image in flight with it. Its next tries are sent
    alone, the other threads holding theirs; failing alone where the request that landed
    last was answered (the server was up, and nothing else was in flight), it is the
    image's: ``FailedOnInput``, and no other image is sent again to crash the model anew
    or blamed for it."""

    def __init__(
        self,
        seconds: float,
        said: Callable | None = None,
        clock=time.monotonic,
        transient: Callable[[ClientError], bool] = lambda exc: False,
    ):
        """``transient(error)``: a refusal (400) that is the server's passing state, not
        the input's (``mid_reload``), tried again too."""
        self.seconds, self.said, self.clock, self.transient = seconds, said, clock, transient
        self.stopped = threading.Event()
        # One lock for what follows: the outage clock, what has landed, whose turn it is to
        # send (every thread's, ``sending`` in flight, or one suspect's ``alone``).
        self.turns = threading.Condition()
        self.since: float | None = None  # when the server last began failing
        self.said_once = False
        self.answers = 0  # requests answered by this run so far, every thread's
        self.up = True  # the request that landed last was not failed by the server
        self.sending, self.alone = 0, False

    def stop(self) -> None:
        self.stopped.set()
        with self.turns:
            self.turns.notify_all()

    @contextmanager
    def _turn(self, alone: bool):
        """A turn to send: beside the other threads, or ``alone`` once those in flight
        have landed (new ones wait)."""
        with self.turns:
            self.turns.wait_for(lambda: not self.alone or self.stopped.is_set())
            if alone:
                self.alone = True
                self.turns.wait_for(lambda: self.sending == 0 or self.stopped.is_set())
            else:
                self.sending += 1
        try:
            yield
        finally:
            with self.turns:
                if alone:
                    self.alone = False
                else:
                    self.sending -= 1
                self.turns.notify_all()

    def __call__(self, send: Callable):
        delay = RETRY_FIRST
        tries, answers_then, suspect = 0, None, False
        while True:
            with self._turn(alone=suspect):  # what lands is recorded before the turn ends
                up = self.up  # alone: how the server was when this was sent
                try:
                    result, error = send(), None
                except ClientError as exc:
                    error = exc
                with self.turns:
                    self.up = error is None or not error.sent or error.invalid_input
                    if error is None:
                        self.since = None  # the server answers again
                        self.answers += 1
            if error is None:
                return result
            if not error.sent or (error.invalid_input and not self.transient(error)):
                raise error  # the client's own error, or the input's
            now = self.clock()
            tries += 1
            with self.turns:
                self.since = now if self.since is None else self.since
                left = self.since + self.seconds - now
                first, self.said_once = not self.said_once, True
                answered = answers_then is not None and self.answers > answers_then
                answers_then = self.answers
            if left <= 0 or self.stopped.is_set():
                raise error
            if not self.transient(error):
                if suspect and up:  # alone, the server up when sent: the image's
                    raise FailedOnInput(tries, error) from error
                suspect = suspect or answered
            if first and self.said is not None:
                self.said(error)
            if self.stopped.wait(min(delay, left)):
                raise error
            delay = min(2 * delay, RETRY_MOST)


class FailedOnInput(ClientError):
    """The server failed one request again and again while it answered others (``Retry``)."""

    def __init__(self, tries: int, error: ClientError):
        super().__init__(
            f"the server failed on this image {tries} times while it answered others (a model "
            f"may crash on it: see the server's log); last: {error}",
            error.status,
            sent=True,
        )


def infer_images(items: list[Item], url: str, protocol: str, options: InferOptions) -> InferReport:
    """Send every image not already done (``options.resume``), ``options.concurrency`` at a
    time. Unreadable images are reported, not raised; any other error (the server gone, or
    failing) stops the run once the requests in flight have landed."""
    if options.concurrency < 1:
        raise ClientError(
            f"concurrency is the requests in flight, at least 1: not {options.concurrency}"
        )
    report = InferReport()
    wanted = [*MASK_FILES.values(), *([FIGURE] if options.figures else [])]
    earlier = read_predictions(options.out / PREDICTIONS)
    run = _Run(url, protocol, options)
    kept = earlier if options.resume else {}

    def written(item: Item) -> bool:
        record = kept.get(item.name.as_posix())
        return (
            record is not None
            and record.get("status") == "ok"
            and record.get("model") == run.model  # another model's answer is redone
            and same_file(record, item.path)  # as is another photo under the same name
            and all(item.output(options.out, w).is_file() for w in wanted)
        )

    todo = [item for item in items if not written(item)]
    report.skipped = len(items) - len(todo)
    report.redone = sum(  # recorded as written, but by another model than this one
        (r := kept.get(i.name.as_posix(), {})).get("status") == "ok" and r.get("model") != run.model
        for i in todo
    )
    report.earlier = 0 if options.resume else len(earlier)  # images recorded before
    if not todo:
        run.close()
        return report
    order = {item.path: k for k, item in enumerate(items)}
    bar = tqdm(
        total=len(items),
        initial=report.skipped,
        unit="image",
        disable=not options.progress or len(items) < 2 or None,  # None: only on a terminal
    )
    start = time.monotonic()
    try:
        with (
            ThreadPoolExecutor(options.concurrency, thread_name_prefix="infer") as pool,
            Predictions(options.out / PREDICTIONS, lambda: run.model, run.server) as records,
        ):
            _stream(
                pool, run.one, todo, report, bar.update, 2 * options.concurrency, records, run.retry
            )
        report.seconds = time.monotonic() - start
    except KeyboardInterrupt:  # what landed is recorded: say so, and how to carry on
        raise KeyboardInterrupt(
            f"{len(report.done) + report.skipped} of {_images(len(items))} written to "
            f"{options.out} (their records in {PREDICTIONS}); --resume carries on"
        ) from None
    finally:
        bar.close()
        run.close()
    report.done.sort(key=lambda r: order[Path(r["image"])])
    report.failed.sort(key=lambda f: order[f.path])
    return report


def _stream(
    pool,
    one: Callable,
    todo: list[Item],
    report: InferReport,
    tick: Callable,
    window: int,
    records: Predictions,
    retry: Retry | None = None,
):
    """``window`` images submitted at a time (twice the threads: a thread never waits for
    work, and a stopped run has little to cancel), results as they land, each recorded in
    ``records``. On an error that is not one image's, drop what has not started, record the
    requests in flight as they land, then raise it: no image that came back is lost."""
    queued = iter(todo)
    pending = {pool.submit(one, item): item for item in islice(queued, window)}
    try:
        _drain(pending, queued, pool, one, report, tick, records, retry)
    except BaseException:  # e.g. Ctrl-C while waiting
        if retry is not None:  # the requests in flight stop waiting to be tried again
            retry.stop()
        for future in pending:
            future.cancel()
        raise


def _drain(pending, queued, pool, one, report, tick, records, retry=None):
    error = None
    while pending:
        landed, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in landed:  # every landed image is recorded, even after another's error
            item = pending.pop(future)
            try:
                report.done.append(future.result())
                records.write(report.done[-1])
            except _Unreadable as exc:
                report.failed.append(Failure(item.path, str(exc)))
                records.failure(item, str(exc))
            except BaseException as exc:
                error = error or exc
                if retry is not None:  # the run stops: nothing in flight is tried again
                    retry.stop()
            tick()
        if error is None:
            pending |= {pool.submit(one, item): item for item in islice(queued, len(landed))}
        else:  # what has not started is dropped; what is in flight lands and is recorded
            for future in [f for f in pending if f.cancel()]:
                del pending[future]
    if error is not None:
        raise error


class Predictions:
    """``predictions.jsonl``: one JSON record per line, appended and flushed as each image
    lands (a run stopped midway keeps every record up to it; a line cut short by a crash is
    skipped on reading)."""

    def __init__(
        self, path: Path, model: dict | Callable[[], dict] | None = None, server: str | None = None
    ):
        """``model``: what answers (a failure's record names it), or a function giving it
        as it is when the failure lands (a run's newest export, _Run.model)."""
        self.path, self.server = path, server
        self.model = model if callable(model) else lambda: model

    def __enter__(self) -> Predictions:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = False
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
        self.file = self.path.open("a", encoding="utf-8")
        if cut:  # a crash cut the last line short: this run's records start on their own
            self.file.write("\n")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def failure(self, item: Item, reason: str) -> None:
        name = item.name.as_posix()
        self.write(
            {
                "image": str(item.path),
                "name": name,
                "server": self.server,
                "model": self.model(),
                "status": "failed",
                "error": reason,
            }
        )


def file_identity(path: Path) -> dict:
    """What tells a photo from another under the same name (``day2/IMG_0001.jpg`` after
    ``day1/IMG_0001.jpg``, or the photo edited since): its resolved path, size and
    modification time, as make and rsync tell them."""
    stat = path.stat()
    return {"path": os.path.realpath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def same_file(record: dict, path: Path) -> bool:
    """Whether ``record`` answered the file at ``path`` as it is now (a record from before
    records named their source compares its image path alone)."""
    try:
        now = file_identity(path)
    except OSError:
        return False
    if "source" in record:
        return record["source"] == now
    return os.path.realpath(record.get("image", "")) == now["path"]


def read_predictions(path: Path) -> dict[str, dict]:
    """The latest record of each image (by its name under the output folder) in a
    predictions file; empty where there is none."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a crash cut short
            continue
        if isinstance(record, dict) and "name" in record:
            records[record["name"]] = record
    return records


def prediction(
    scores: np.ndarray,
    masks: dict[str, np.ndarray],
    class_names: list[str] | None,
    presence: dict | None,
    binary: bool = False,
) -> dict:
    """What one image's answer says, by class name: the classes present (at the served
    refiner's thresholds; from an export that does not serve them, the classes the
    pseudo-mask holds), every class's score, and each class's share of every mask's pixels.
    Binary masks (one foreground) name their foreground by the top present class."""
    k = len(scores)
    names = [class_label(class_names, c) for c in range(k)]
    if presence is not None:
        present = present_at(scores, presence)
    else:
        held = np.unique(masks[MASK_FILES[PSEUDO_MASK_FULL]])
        present = [int(scores.argmax())]
        if not binary:
            present = [int(v) - 1 for v in held if 1 <= v <= k] or present
    present = sorted(present, key=lambda c: -scores[c])
    shares = {}
    for what, mask in masks.items():
        counts = np.bincount(mask.ravel(), minlength=1)  # one pass; masks are uint8
        values = np.flatnonzero(counts)
        share = {}
        for value, count in zip(values.tolist(), counts[values].tolist(), strict=True):
            if value == 0:
                label = "background"
            elif binary and value == 1:
                label = names[present[0]] if present else names[int(scores.argmax())]
            elif not binary and value - 1 < k:
                label = names[value - 1]
            else:  # not a class (no served refiner writes one): named by its value
                label = f"value {value}"
            share[label] = share.get(label, 0) + count
        shares[what] = {label: round(n / mask.size, 6) for label, n in share.items()}
    return {
        "classes": [{"class": names[c], "score": float(scores[c])} for c in present],
        "scores": {names[c]: float(scores[c]) for c in range(k)},
        "mask_share": shares,
    }


def top_class(scores: np.ndarray, class_names: list[str] | None) -> tuple[str, float]:
    """The top class by name (``class N`` where the server names none) and its score."""
    top = int(scores.argmax())
    return class_label(class_names, top), float(scores[top])


def write_mask(mask: np.ndarray, palette: list[int], path: Path) -> Path:
    """A class-index map as a palette PNG in the data's colours, written atomically."""
    png = Image.fromarray(mask, mode="P")
    png.putpalette(palette)
    # zlib level 1: a fifth of the default's time (0.5 ms vs 2.7 ms for a 500x375 mask, on
    # a CPU the server shares) for files a fifth larger; masks are mostly runs of one value.
    # Encoded in memory and written at once: a quarter faster than Pillow's chunked writes.
    buffer = io.BytesIO()
    png.save(buffer, format="PNG", compress_level=1)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a hidden name beside ``path``, then rename it in: a reader (or a
    resumed run) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
