"""`wsss infer` on folders, globs and file lists: mirrored outputs written whole, unreadable
files listed without stopping the run, --resume, and the same masks at any concurrency."""

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from serving.client import ClientError, PipelineClient
from serving.infer import (
    PREDICTIONS,
    InferOptions,
    InferReport,
    Item,
    Predictions,
    _stream,
    find_images,
    prediction,
    read_list,
    read_predictions,
    run,
)
from serving.perf import settled_statistics
from wsss.tensors import PIPELINE, PIPELINE_BYTES, PSEUDO_MASK_FULL, SEGMENTATION_FULL

MASKS = {PSEUDO_MASK_FULL: "pseudo_mask", SEGMENTATION_FULL: "segmentation"}
# In the order a folder walk finds them: a folder's files, then its subfolders, by name.
GOOD = ("top.png", "sub/one.png", "sub/deeper/three.JPEG", "sub/deeper/two.jpg")
BAD = ("bad/corrupt.jpg", "bad/not_an_image.png")


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- finding the images: no server --------------------------------------------------------


def test_folders_globs_and_named_files_mirror_from_their_roots(tmp_path, monkeypatch):
    for name in ("a/x.jpg", "a/b/y.PNG", "a/notes.txt", "a/.hidden.jpg", "a/.cache/z.jpg"):
        _touch(tmp_path / name)
    _touch(tmp_path / "a" / "masks" / "old_segmentation.png")  # the run's own --out
    monkeypatch.chdir(tmp_path)
    items, missing = find_images(["a"], exclude=Path("a/masks"))
    assert [(str(i.path), str(i.name)) for i in items] == [("a/x.jpg", "x"), ("a/b/y.PNG", "b/y")]
    items, _ = find_images(["a/**/*.*"], exclude=Path("a/masks"))  # from its fixed part
    assert sorted(str(i.name) for i in items) == ["b/y", "x"]
    items, _ = find_images(["a/**/*.png"])
    assert [str(i.name) for i in items] == ["masks/old_segmentation"]  # case: the glob's
    items, missing = find_images(["a/b/y.PNG", "a/x.jpg", "a/notes.txt", "nowhere.jpg"])
    assert sorted(str(i.name) for i in items) == ["b/y", "notes", "x"]  # named: sent as named
    assert [(str(f.path), f.reason) for f in missing] == [("nowhere.jpg", "no such file or folder")]
    items, _ = find_images(["a", "a/x.jpg"], exclude=Path("a/masks"))  # x.jpg: sent once
    assert [str(i.name) for i in items] == ["x", "b/y"]
    (tmp_path / "list.txt").write_text("# photos\n\na/x.jpg\n  a/b/y.PNG  \n")
    assert read_list("list.txt") == ["a/x.jpg", "a/b/y.PNG"]
    assert Item(Path("a/b/y.PNG"), Path("b/y")).output(Path("o"), "seg") == Path("o/b/y_seg.png")


def test_walks_leave_out_earlier_runs_outputs_and_an_out_that_is_the_root_is_refused(
    tmp_path, monkeypatch
):
    """A second run into another --out read the first run's masks back as photos; an --out
    above the folder read dropped its subfolders; one equal to it is refused up front."""
    for name in ("p/a.jpg", "p/sub/b.jpg", "p/old/a_pseudo_mask.png", "p/old/deeper/x.png"):
        _touch(tmp_path / name)
    _touch(tmp_path / "p" / "old" / PREDICTIONS, b"{}\n")  # an earlier run's --out
    monkeypatch.chdir(tmp_path)
    skipped = []
    items, _ = find_images(["p"], exclude=Path("elsewhere"), skipped=skipped)
    assert [str(i.name) for i in items] == ["a", "sub/b"] and skipped == [Path("p/old")]
    skipped = []
    items, _ = find_images(["p/**/*.*"], skipped=skipped)  # a glob leaves them out too
    assert sorted(str(i.name) for i in items) == ["a", "sub/b"] and skipped == [Path("p/old")]
    items, _ = find_images(["p"], exclude=Path("."))  # --out above what is read: nothing of it
    assert [str(i.name) for i in items] == ["a", "sub/b"]
    for out in ("p", "p/../p"):
        with pytest.raises(ClientError, match="is the folder p reads images from"):
            run(["p"], "127.0.0.1:1", "grpc", InferOptions(Path(out), progress=False))


def test_a_record_answers_its_file_as_it_was(tmp_path):
    """--resume skips a record's image only where the file is the one it answered: not
    another photo under the same name, nor the photo changed since."""
    from serving.infer import file_identity, same_file

    photo = _touch(tmp_path / "day1" / "IMG_1.jpg", b"first")
    record = {"image": str(photo), "source": file_identity(photo)}
    assert same_file(record, photo)
    other = _touch(tmp_path / "day2" / "IMG_1.jpg", b"first")
    assert not same_file(record, other)
    photo.write_bytes(b"edited")
    assert not same_file(record, photo)
    assert same_file({"image": str(photo)}, photo)  # a record from before: its path alone
    assert not same_file({"image": str(other)}, photo)
    assert not same_file(record, tmp_path / "gone.jpg")


def test_files_named_through_dotdot_write_inside_the_output_folder(tmp_path, monkeypatch):
    """``wsss infer ../src/a.jpg b.jpg --out out`` from cwd/: a's masks went to src/, out of
    the output folder (``Path.absolute`` keeps the ``..``); every name now stays inside."""
    _touch(tmp_path / "src" / "a.jpg")
    _touch(tmp_path / "cwd" / "b.jpg")
    _touch(tmp_path / "deep" / "er" / "c.jpg")
    monkeypatch.chdir(tmp_path / "cwd")
    items, _ = find_images(["../src/a.jpg", "b.jpg", "../deep/er/../er/c.jpg"])
    assert sorted(str(i.name) for i in items) == ["cwd/b", "deep/er/c", "src/a"]
    out = Path("out").absolute()
    for item in items:
        assert item.output(out, "seg").resolve().is_relative_to(out)
    with pytest.raises(ClientError, match="leaves the output folder"):
        Item(Path("x.jpg"), Path("../x")).output(out, "seg")
    (tmp_path / "cwd" / "d").mkdir()
    with pytest.raises(ClientError, match="is outside"):  # a glob that climbs above its root
        find_images(["*/../../src/a.jpg"])


def test_two_images_that_would_write_the_same_files_are_refused_up_front(tmp_path):
    _touch(tmp_path / "cat.jpg")
    _touch(tmp_path / "cat.png")
    with pytest.raises(ClientError, match="would write the same files"):
        find_images([str(tmp_path)])
    items, _ = find_images([str(tmp_path)], writes=False)  # `wsss bench` writes nothing
    assert sorted(i.path.name for i in items) == ["cat.jpg", "cat.png"]


def test_a_request_the_server_failed_is_tried_again_backing_off_until_the_deadline(
    monkeypatch,
):
    import time

    from serving.infer import RETRY_FIRST, RETRY_MOST, Retry

    def failing(n, status="StatusCode.INTERNAL", sent=True):
        calls = []

        def send():
            calls.append(1)
            if len(calls) <= n:
                raise ClientError("Stub 'postprocess_0_0' is not healthy", status, sent=sent)
            return "answer"

        return send, calls

    slept = []

    def waits(retry):  # the waits recorded, none slept
        monkeypatch.setattr(retry.stopped, "wait", lambda t: slept.append(t) or False)
        return retry

    said = []
    send, calls = failing(3)
    assert waits(Retry(60.0, said.append))(send) == "answer"
    assert len(calls) == 4 and len(said) == 1  # said once a run
    assert slept == [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST]
    slept.clear()
    send, calls = failing(20)
    assert waits(Retry(1e6))(send) == "answer"
    assert max(slept) == RETRY_MOST and slept[:2] == [RETRY_FIRST, 2 * RETRY_FIRST]
    send, calls = failing(1)  # 0: the run stops at the first failure, as before
    with pytest.raises(ClientError, match="not healthy"):
        Retry(0.0)(send)
    for status, sent in (("400", True), (None, False)):  # the input's fault; the client's own
        send, calls = failing(5, status, sent)
        with pytest.raises(ClientError):
            Retry(60.0)(send)
        assert len(calls) == 1
    # One outage clock for every thread: a second request failing later has what is left of
    # the first's time, and an answer in between starts the clock again.
    clock = iter([100.0, 109.0, 111.0])
    retry = waits(Retry(10.0, clock=lambda: next(clock)))
    send, calls = failing(1)
    slept.clear()
    retry(send)  # fails at 100: the outage begins
    assert retry.since is None and slept == [RETRY_FIRST]  # answered: over
    retry.since = 100.0  # another thread's failure at 100, not yet answered
    send, calls = failing(10)
    slept.clear()
    with pytest.raises(ClientError):  # 109: 1 s left, waited; 111: past, raised
        retry(send)
    assert slept == [RETRY_FIRST] and len(calls) == 2
    # stop() ends a wait at once: Ctrl-C or another image's error does not wait out the
    # outage's time.
    retry = Retry(60.0)
    send, calls = failing(10**6)
    import threading

    threading.Timer(0.2, retry.stop).start()
    began = time.monotonic()
    with pytest.raises(ClientError):
        retry(send)
    assert time.monotonic() - began < 5


class _CrashingStub:
    """A model that dies on one image: every request in flight with it fails, and it
    answers nothing until the watchdog has reloaded it (``down`` seconds)."""

    def __init__(self, poison: str, down: float, rng):
        self.poison, self.down, self.rng = poison, down, rng
        self.lock = threading.Lock()
        self.up_at, self.life, self.crashes = 0.0, 0, 0

    def request(self, image: str) -> str:
        import time

        crash = ClientError("Stub 'refiner_0_0' is not healthy", "StatusCode.INTERNAL", sent=True)
        with self.lock:
            if time.monotonic() < self.up_at:
                raise crash
            life = self.life
        time.sleep(self.rng.uniform(0.001, 0.004))  # the model at work
        with self.lock:
            if image == self.poison and self.life == life:
                self.life, self.crashes = self.life + 1, self.crashes + 1
                self.up_at = time.monotonic() + self.down
            if self.life != life:  # died while this request was in it
                raise crash
        return f"mask of {image}"


@pytest.mark.parametrize("seed", range(4))
def test_an_image_a_model_crashes_on_is_listed_and_no_other_is(monkeypatch, seed):
    """An image that crashes a model (the watchdog reloads it) was sent again until
    --retry-seconds ran out, crashing the server anew every few seconds for as long as the
    other images kept its outage clock at zero. Failing again after the server answered
    others, it is sent alone; failing alone, it is the image's. The images in flight with
    it fail with it each time, and are not blamed: alone, they are answered."""
    import random

    import serving.infer
    from serving.infer import FailedOnInput, Retry, mid_reload

    monkeypatch.setattr(serving.infer, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(serving.infer, "RETRY_MOST", 0.08)  # the watchdog's 3 s to 8 s
    stub = _CrashingStub("photo_07", down=0.03, rng=random.Random(seed))
    retry = Retry(60.0, transient=mid_reload)
    images = [f"photo_{k:02d}" for k in range(40)]
    with ThreadPoolExecutor(4) as pool:
        futures = {pool.submit(retry, lambda i=i: stub.request(i)): i for i in images}
    failed = {i for f, i in futures.items() if f.exception() is not None}
    assert failed == {"photo_07"}
    (error,) = [f.exception() for f, i in futures.items() if i in failed]
    assert isinstance(error, FailedOnInput) and "failed on this image" in str(error)
    assert stub.crashes < len(images)  # 3-14 in 24 runs here; before: until the run ended


def test_an_outage_or_an_export_loading_blames_no_image(monkeypatch, tmp_path):
    """Nothing answered between its tries (the server down), or an export's passing state
    (scores of another version), is tried until it ends; a suspect failing in a run is
    listed with the unreadable images, the run going on."""
    from types import SimpleNamespace

    from serving.infer import FailedOnInput, Item, Retry, _Run, _Unreadable, mid_reload

    crash = ClientError("Stub 'postprocess_0_0' is not healthy", "StatusCode.INTERNAL", sent=True)
    retry = Retry(60.0, transient=mid_reload)
    monkeypatch.setattr(retry.stopped, "wait", lambda t: False)
    outage, calls = iter([crash] * 12), []

    def down_then_up():
        calls.append(1)
        error = next(outage, None)
        if error is not None:
            raise error
        return "answer"

    assert retry(down_then_up) == "answer" and len(calls) == 13
    mixed = ClientError("2 class scores", "MIXED_VERSIONS", sent=True)  # an export loading
    calls.clear()
    tries = iter([mixed] * 5)

    def swapping():
        calls.append(1)
        retry.answers += 1  # other images answered meanwhile
        error = next(tries, None)
        if error is not None:
            raise error
        return "answer"

    assert retry(swapping) == "answer" and len(calls) == 6

    def others_answered_meanwhile(seconds):
        retry.answers, retry.up = retry.answers + 1, True
        return False

    monkeypatch.setattr(retry.stopped, "wait", others_answered_meanwhile)
    calls.clear()

    def crashing():  # a suspect after its second failure, then failing alone
        calls.append(1)
        raise crash

    with pytest.raises(FailedOnInput, match="failed on this image 3 times while it answered"):
        retry(crashing)
    assert len(calls) == 3
    run = object.__new__(_Run)
    run.retry, run.answer = retry, lambda data: crashing()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg")
    run.options = SimpleNamespace(out=tmp_path / "out")
    with pytest.raises(_Unreadable, match="a model may crash on it: see the server's log"):
        run.one(Item(photo, Path("photo")))
    retry.stop()  # Ctrl-C: the images in flight are not listed as failures
    with pytest.raises(ClientError) as raised:
        retry(crashing)
    assert not isinstance(raised.value, FailedOnInput)


def test_answers_mixing_two_exports_are_sent_again_not_labelled_or_listed():
    """While an export of other classes or tensors loads, model by model: scores of the new
    classifier came back under the old ensemble version, labelled with the old names (15
    records of a 10-class export holding 2 scores), and a composing model's shape refusal
    listed good photos as unreadable. Both are tried again as the server's passing state."""
    import threading
    from types import SimpleNamespace

    from serving.infer import Retry, _Run, mid_reload

    run = object.__new__(_Run)
    run.local = threading.local()
    names = [f"class{i}" for i in range(10)]
    run.answered_by = lambda version: (SimpleNamespace(class_names=names), {"version": version})
    scores = np.zeros((1, 2), np.float32)

    def send(data):
        run.answered = 11
        return {"SCORES": scores}, None

    run.send = send
    with pytest.raises(ClientError, match="2 class scores came back under an export of 10"):
        run.answer(b"photo")
    try:
        run.answer(b"photo")
    except ClientError as exc:
        assert exc.sent and not exc.invalid_input  # tried again, never the image's
    scores = np.zeros((1, 10), np.float32)
    assert run.answer(b"photo")[3] == {"version": 11}
    shape = ClientError(
        "x",
        "StatusCode.INVALID_ARGUMENT",
        "unexpected shape for input 'IMAGE' for model 'segmenter'. Expected "
        "[-1,160,160,3], got [1,128,128,3]",
        sent=True,
    )
    image = ClientError("x", "400", "preprocess: item 0: cannot decode the bytes", sent=True)
    assert mid_reload(shape) and not mid_reload(image)
    calls = []

    def failing_then_answered():
        calls.append(1)
        if len(calls) == 1:
            raise shape
        return "answer"

    retry = Retry(60.0, transient=mid_reload)
    retry.stopped.wait = lambda t: False
    assert retry(failing_then_answered) == "answer" and len(calls) == 2
    with pytest.raises(ClientError, match="x"):
        retry(lambda: (_ for _ in ()).throw(image))


def test_a_prediction_names_the_classes_present_at_the_served_thresholds():
    scores = np.array([0.9, 0.35, 0.2], np.float32)
    names = ["cat", "dog", "person"]
    mask = np.array([[0, 1, 1, 2], [0, 0, 2, 3]], np.uint8)
    masks = {"pseudo_mask": mask, "segmentation": np.zeros_like(mask)}
    # Per-class thresholds (a multi-label classifier's, chosen by cross-validation).
    presence = {"multi_label": True, "threshold": [0.95, 0.3, 0.1], "min_score": 0.0}
    record = prediction(scores, masks, names, presence)
    assert record["classes"] == [
        {"class": "dog", "score": pytest.approx(0.35)},
        {"class": "person", "score": pytest.approx(0.2)},
    ]  # cat's 0.9 is below its own 0.95
    assert record["scores"] == {
        n: pytest.approx(float(v)) for n, v in zip(names, scores, strict=True)
    }
    assert record["mask_share"]["pseudo_mask"] == {
        "background": 0.375,
        "cat": 0.25,
        "dog": 0.25,
        "person": 0.125,
    }
    assert record["mask_share"]["segmentation"] == {"background": 1.0}
    # One threshold; single-label: the top class; binary masks name the foreground by it.
    one = {"multi_label": True, "threshold": 0.5, "min_score": 0.0}
    assert [c["class"] for c in prediction(scores, masks, names, one)["classes"]] == ["cat"]
    single = {"multi_label": False, "threshold": 0.5, "min_score": 0.0}
    binary = {"pseudo_mask": (mask > 0).astype(np.uint8)}
    record = prediction(scores, binary, names, single, binary=True)
    assert record["mask_share"]["pseudo_mask"] == {"background": 0.375, "cat": 0.625}
    # A value that is no class (255, which no served refiner writes) is named by its value,
    # not given the foreground's name over the foreground's own share.
    odd = (mask > 0).astype(np.uint8)
    odd[0, 0] = 255
    shares = prediction(scores, {"pseudo_mask": odd}, names, single, binary=True)["mask_share"]
    assert shares["pseudo_mask"] == {"background": 0.25, "cat": 0.625, "value 255": 0.125}
    # An export without the served thresholds: the classes the pseudo-mask holds.
    record = prediction(scores, {"pseudo_mask": mask[:, :3]}, names, None)
    assert [c["class"] for c in record["classes"]] == ["cat", "dog"]


def test_predictions_file_keeps_each_images_latest_record(tmp_path):
    path = tmp_path / PREDICTIONS
    path.write_text(
        '{"name": "a", "status": "failed", "error": "x"}\n'
        '{"name": "b", "status": "ok", "files": {}}\n'
        '{"name": "a", "status": "ok", "files": {}}\n'
        '{"name": "c", "stat'  # cut short by a crash
    )
    records = read_predictions(path)
    assert sorted(records) == ["a", "b"] and records["a"]["status"] == "ok"
    assert read_predictions(tmp_path / "absent.jsonl") == {}
    # The next run appends on a line of its own, not onto the one the crash cut short.
    item = Item(Path("photos/c.jpg"), Path("c"))
    with Predictions(path, {"classifier": 1}, "h:1") as records:
        records.failure(item, "gone")
    assert read_predictions(path)["c"] == {
        "image": "photos/c.jpg",
        "name": "c",
        "server": "h:1",
        "model": {"classifier": 1},
        "status": "failed",
        "error": "gone",
    }


def test_images_in_flight_when_the_server_fails_are_still_recorded(tmp_path):
    """The server's error lands first, an image sent before it lands after: the run raises
    the error, and the image that came back is in the report and the predictions file."""
    failed = threading.Event()
    items = [Item(Path(f"{n}.png"), Path(n)) for n in ("slow", "bad", "never")]

    def one(item):
        if item.name.name == "bad":
            failed.set()
            raise ClientError("the server went away", status="503")
        if item.name.name == "never":
            raise AssertionError("sent after the server failed")
        assert failed.wait(30)
        return {"image": str(item.path), "name": item.name.as_posix(), "status": "ok"}

    report = InferReport()
    with (
        ThreadPoolExecutor(2) as pool,
        Predictions(tmp_path / PREDICTIONS) as records,
        pytest.raises(ClientError, match="went away"),
    ):
        _stream(pool, one, items, report, lambda: None, 2, records)
    assert [r["name"] for r in report.done] == ["slow"]
    assert list(read_predictions(tmp_path / PREDICTIONS)) == ["slow"]


def test_the_overlay_is_drawn_at_the_photos_aspect(tmp_path, monkeypatch):
    """A 60 x 120 photo's masks come back at its size and its CAMs at the model's 32 x 32
    square; its figure shows every panel at the photo's aspect (its longer side
    FIGURE_SIDE), not squashed into the square: the right half the server marked is the
    right half drawn, and the masks drawn are the masks written."""
    import types

    import wsss.figures
    from serving.infer import FIGURE_SIDE, _Run
    from wsss.served.images import encode_png
    from wsss.tensors import SCORES

    mask = np.zeros((1, 60, 120), np.uint8)
    mask[:, :, 60:] = 1
    outputs = {
        SCORES: np.array([[0.2, 0.8]], np.float32),
        PSEUDO_MASK_FULL: mask,
        SEGMENTATION_FULL: mask,
    }
    cams = np.zeros((2, 32, 32), np.float32)
    drawn, drawn_at, legends = {}, [], []

    def panels(rows, titles, path, legend=None, panel_inches=2.2):
        drawn.update(rows[0])
        drawn_at.append(panel_inches * 110)  # px a panel, at panel_figure's 110 dpi
        legends.append(legend)
        return Path(path).write_bytes(b"png") and path

    monkeypatch.setattr(wsss.figures, "panel_figure", panels)
    run = _Run.__new__(_Run)
    base = types.SimpleNamespace(
        class_names=["cat", "dog"], presence=None, palette=None, image_size=(32, 32), mask_classes=2
    )
    photo = encode_png(np.full((60, 120, 3), 100, np.uint8))
    run.figure(photo, outputs, cams, base, tmp_path / "photo_overlay.png")
    half = FIGURE_SIDE // 2
    assert [v.shape[:2] for v in drawn.values()] == [(half, FIGURE_SIDE)] * 4
    assert drawn_at == [pytest.approx(FIGURE_SIDE)]  # drawn as large as it is
    tinted = drawn["segmentation"] != drawn["image"]
    assert tinted[:, half + 8 :].any(axis=-1).all() and not tinted[:, : half - 8].any()
    assert "CAM: dog (0.80)" in drawn
    # The legend names what the masks hold by the server's names (a binary mask: its 1 is
    # the top class's foreground, dog here), in the colour the overlays tint it with (VOC's
    # palette where the server sends none: value 1's is dark red; else the server's own).
    assert legends == [[("dog", (128 / 255, 0.0, 0.0))]]
    base.class_names, base.palette = ["fox", "owl"], [0, 0, 0, 10, 20, 30] + [0] * 762
    run.figure(photo, outputs, cams, base, tmp_path / "photo_overlay.png")
    assert legends[-1] == [("owl", (10 / 255, 20 / 255, 30 / 255))]
    base.class_names, base.palette = ["cat", "dog"], None
    # The CAM drawn is of a class the masks hold at the server's thresholds (a multi-label
    # profile's own per class), not the top score's when that one is below its threshold.
    drawn.clear()
    base.presence = {"multi_label": True, "threshold": [0.1, 0.9], "min_score": 0.0}
    run.figure(photo, outputs, cams, base, tmp_path / "photo_overlay.png")
    assert "CAM: cat (0.20)" in drawn


# -- through the server -------------------------------------------------------------------


def _wsss(*args):
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def photos(exported, tmp_path_factory):
    """A folder with subfolders, images of several sizes, a corrupt JPEG, a text file named
    like a PNG, and a file that is not an image by name (left alone)."""
    from training.data import list_samples, read_image

    root = tmp_path_factory.mktemp("photos")
    samples = list_samples(exported.data.root, "pets", "test")
    sizes = ((64, 64), (50, 90), (77, 41), (64, 100))
    for name, sample, (h, w) in zip(GOOD, samples, sizes, strict=False):
        image = cv2.resize(read_image(sample.image_path), (w, h))[..., ::-1]
        _touch(root / name, cv2.imencode(Path(name).suffix.lower(), image)[1].tobytes())
    _touch(root / BAD[0], (root / GOOD[3]).read_bytes()[:20] + b"\0" * 200)
    _touch(root / BAD[1], b"these are notes, not pixels\n")
    _touch(root / "readme.txt", b"not sent: no image suffix")
    return root


def _outputs(out: Path, name: str) -> dict[str, Path]:
    stem = Path(name).with_suffix("")
    return {key: out / stem.parent / f"{stem.name}_{what}.png" for key, what in MASKS.items()}


@pytest.mark.slow
@pytest.mark.triton
def test_a_folder_is_mirrored_and_unreadable_files_listed_without_stopping(
    server, photos, tmp_path
):
    out = tmp_path / "out"
    proc = _wsss("infer", str(photos), "--url", server.grpc_url, "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    listed = proc.stderr.split("could not be read:")[1]
    for name in BAD:
        assert f"{photos / name}: " in listed and "cannot decode" in listed, proc.stderr
    assert "readme" not in proc.stderr and proc.stdout == ""  # no figures for a folder
    assert f"{len(GOOD) + len(BAD)} images -> {out}: {len(GOOD)} written, 2 unreadable" in (
        proc.stderr
    )
    client = PipelineClient(server.grpc_url, model=PIPELINE_BYTES)
    for name in GOOD:
        want = client.infer_encoded([(photos / name).read_bytes()])
        for key, path in _outputs(out, name).items():
            png = Image.open(path)
            assert png.getpalette() == client.palette
            np.testing.assert_array_equal(np.asarray(png), want[key][0], err_msg=str(path))
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    expected = {p.relative_to(out).as_posix() for n in GOOD for p in _outputs(out, n).values()}
    expected.add(PREDICTIONS)
    assert set(written) - {"sub", "sub/deeper"} == expected  # nothing for BAD, no temp files
    # One record per image, failures too, by the server's class names and thresholds.
    assert client.presence == {"multi_label": False, "threshold": 0.5, "min_score": 0.0}
    records = read_predictions(out / PREDICTIONS)
    assert len((out / PREDICTIONS).read_text().splitlines()) == len(GOOD) + len(BAD)
    assert sorted(records) == sorted(str(Path(n).with_suffix("")) for n in GOOD + BAD)
    for name in BAD:
        record = records[str(Path(name).with_suffix(""))]
        assert record["status"] == "failed" and "cannot decode" in record["error"]
    for name in GOOD:
        record = records[str(Path(name).with_suffix(""))]
        want = client.infer_encoded([(photos / name).read_bytes()])
        assert record["status"] == "ok" and record["image"] == str(photos / name)
        assert list(record["scores"]) == client.class_names
        top = client.class_names[int(want["SCORES"][0].argmax())]
        assert [c["class"] for c in record["classes"]] == [top]  # pets: one class per photo
        for what, share in record["mask_share"].items():
            assert sum(share.values()) == pytest.approx(1.0, abs=1e-5)
            assert set(share) <= {"background", top}
            mask = np.asarray(Image.open(record["files"][what]))
            assert share.get("background", 0.0) == pytest.approx((mask == 0).mean(), abs=1e-6)
    client.close()


@pytest.mark.slow
@pytest.mark.triton
def test_a_file_over_the_servers_limit_is_listed_unread(server, photos, tmp_path):
    """A multi-gigabyte file in a folder was read whole into memory, to be refused by the
    server: its size alone now lists it."""
    from wsss.served.images import MAX_ENCODED_BYTES

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / GOOD[0], folder / "good.png")
    with (folder / "huge.tif").open("wb") as f:  # sparse: no disk taken
        f.truncate(MAX_ENCODED_BYTES + 1)
    before = settled_statistics(server.grpc_url)[PIPELINE_BYTES]["requests"]
    options = InferOptions(tmp_path / "out", progress=False)
    report = run([str(folder)], server.grpc_url, "grpc", options)
    sent = settled_statistics(server.grpc_url)[PIPELINE_BYTES]["requests"] - before
    assert len(report.done) == 1 and sent == 1
    (failure,) = report.failed
    assert failure.path.name == "huge.tif" and "at most 67,108,864" in failure.reason


@pytest.mark.slow
@pytest.mark.triton
def test_resume_sends_only_the_images_not_yet_written(server, photos, tmp_path):
    options = InferOptions(tmp_path / "out", concurrency=2, progress=False)
    first = run([str(photos / "sub")], server.grpc_url, "grpc", options)
    assert len(first.done) == 3 and not first.failed
    redo, *kept = (_outputs(options.out, n.removeprefix("sub/")) for n in GOOD[1:])
    mtimes = {p: p.stat().st_mtime_ns for files in kept for p in files.values()}
    redo[SEGMENTATION_FULL].unlink()  # as a run stopped between an image's two files leaves it
    before = settled_statistics(server.grpc_url)[PIPELINE_BYTES]["requests"]
    options.resume = True
    again = run([str(photos / "sub")], server.grpc_url, "grpc", options)
    sent = settled_statistics(server.grpc_url)[PIPELINE_BYTES]["requests"] - before
    assert (again.skipped, len(again.done), sent) == (2, 1, 1)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert all(p.exists() for p in redo.values())
    # Another photo under the same name (a second day's IMG_0001.jpg) is sent, not skipped.
    swapped = photos.parent / f"{photos.name}_swapped"
    shutil.copytree(photos / "sub", swapped)
    (swapped / "one.png").write_bytes((photos / GOOD[0]).read_bytes())
    before = settled_statistics(server.grpc_url)[PIPELINE_BYTES]["requests"]
    third = run([str(swapped)], server.grpc_url, "grpc", options)
    sent = settled_statistics(server.grpc_url)[PIPELINE_BYTES]["requests"] - before
    assert (third.skipped, len(third.done), sent) == (0, 3, 3)  # a new path for the other two
    record = read_predictions(options.out / PREDICTIONS)["one"]
    assert record["source"]["path"] == str((swapped / "one.png").resolve())


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_run_rides_out_a_stub_the_watchdog_restarts(exported, photos, tmp_path, capsys, protocol):
    """A stub killed under a run: with --retry-seconds 0 the run stops at the failed
    request (as it did always); with the default it tries again while the watchdog reloads
    the model, and every image is written. A server of its own, on a copy of the
    repository: the session's stays whole."""
    import os
    import signal

    from serving.server import TritonServer, on_free_ports
    from tests.conftest import wait_for

    def kill_postprocess(server):
        stubs = server.stub_processes()
        (pid,) = [p.pid for p in stubs if p.stub_of(server.repository)[0] == "postprocess"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pid not in {p.pid for p in server.stub_processes()}, what="gone")

    # A copy: the watchdog reloads by touching the version folders, which the session's
    # server, polling the exported repository, would reload too.
    repository = tmp_path / "repository"
    shutil.copytree(exported.export.repository, repository)
    serve = on_free_ports(exported.serve)  # beside the session's server
    with TritonServer(repository, serve, tmp_path / "server") as server:
        kill_postprocess(server)
        stopped = InferOptions(tmp_path / "stopped", progress=False, retry_seconds=0)
        url = server.grpc_url if protocol == "grpc" else server.http_url
        with pytest.raises(ClientError, match="not healthy"):
            run([str(photos / "sub")], url, protocol, stopped)
        server.watch(0.2)
        options = InferOptions(tmp_path / "out", concurrency=2, progress=False)
        report = run([str(photos / "sub")], url, protocol, options)
        assert len(report.done) == 3 and not report.failed
        assert "trying again for up to 60 s" in capsys.readouterr().err
        records = read_predictions(options.out / PREDICTIONS)
        assert sorted(r["status"] for r in records.values()) == ["ok"] * 3


@pytest.mark.slow
@pytest.mark.triton
def test_answers_of_an_export_loading_model_by_model_are_sent_again(
    server, photos, tmp_path, monkeypatch, capsys
):
    """The server's first answers hold another export's scores (fewer classes) under this
    export's version, then a composing model refuses the tensors (a shape change swapping
    in): both are tried again, and every record holds one score per class it names."""
    real = PipelineClient.infer_raw
    answers = []
    lock = threading.Lock()

    def loading(self, *args, **kwargs):
        with lock:
            answers.append(1)
            n = len(answers)
        if n == 2:
            raise ClientError(
                "refused",
                "StatusCode.INVALID_ARGUMENT",
                "unexpected shape for input 'IMAGE' for model 'segmenter'. Expected "
                "[-1,160,160,3], got [1,64,64,3]",
                sent=True,
            )
        outputs = real(self, *args, **kwargs)
        if n == 1:
            outputs["SCORES"] = outputs["SCORES"][:, :1]  # the other export's classifier
        return outputs

    monkeypatch.setattr(PipelineClient, "infer_raw", loading)
    options = InferOptions(tmp_path / "out", concurrency=1, progress=False)
    report = run([str(photos / "sub")], server.grpc_url, "grpc", options)
    assert len(report.done) == 3 and not report.failed and len(answers) == 5
    assert "an export of other classes" in capsys.readouterr().err
    names = PipelineClient(server.grpc_url, "grpc", PIPELINE_BYTES).class_names
    for record in report.done:
        assert list(record["scores"]) == names


@pytest.mark.slow
@pytest.mark.triton
def test_records_name_what_answered_and_resume_redoes_another_models(server, photos, tmp_path):
    """A folder's records from two servers or two exports tell themselves apart: each names
    the server, the ensemble and the version that answered; --resume redoes an image another
    model answered, and a run without it says the file holds earlier runs' records."""
    options = InferOptions(tmp_path / "out", concurrency=1, progress=False)
    run([str(photos / "sub")], server.grpc_url, "grpc", options)
    path = options.out / PREDICTIONS
    records = read_predictions(path)
    model = records["one"]["model"]
    assert records["one"]["server"] == server.grpc_url and model["ensemble"] == PIPELINE_BYTES
    assert model["version"] >= 1 and len(model["classes"]) == 12 and len(model["export"]) == 16
    assert all(r["model"] == model for r in records.values())
    other = {**records["one"], "model": {**model, "version": model["version"] + 1}}
    # Another repository's export of the same version and classes (a new repository starts
    # at version 1 again): only the name the export gave itself differs.
    twin = {**records["deeper/two"], "model": {**model, "export": "0" * 16}}
    with path.open("a") as f:  # as runs against other exports append them
        f.write(json.dumps(other) + "\n" + json.dumps(twin) + "\n")
    options.resume = True
    again = run([str(photos / "sub")], server.grpc_url, "grpc", options)
    assert (again.skipped, sorted(r["name"] for r in again.done)) == (1, ["deeper/two", "one"])
    assert again.redone == 2
    summary = again.summary(options.out)
    assert "2 written (2 of them answered before by another model), 1 already there" in summary
    options.resume = False
    third = run([str(photos / "sub")], server.grpc_url, "grpc", options)
    assert third.earlier == 3
    assert "already held records of 3 images from earlier runs" in third.summary(options.out)
    # The same model reached at another address, or over HTTP, is the same model.
    options.resume = True
    fourth = run([str(photos / "sub")], server.http_url, "http", options)
    assert (fourth.skipped, len(fourth.done)) == (3, 0)


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("concurrency", [1, 3])
def test_an_export_landing_mid_run_shows_in_the_records_and_no_figure_mixes_two(
    server, photos, tmp_path, monkeypatch, concurrency
):
    """After the run's first request the server answers with the next version, as when an
    export lands mid-run: the first image's masks (old) and CAMs (new) disagree, so both are
    sent again, and every record names the version that answered it."""
    real = PipelineClient.infer_raw
    sent = []

    lock = threading.Lock()

    def next_export_after_the_first(self, *args, **kwargs):
        outputs = real(self, *args, **kwargs)
        with lock:
            sent.append(self.model)
            self.answered += len(sent) > 1  # the server's answer after the export landed
        return outputs

    monkeypatch.setattr(PipelineClient, "infer_raw", next_export_after_the_first)
    options = InferOptions(tmp_path / "out", concurrency, progress=False, figures=True)
    report = run([str(photos / "sub")], server.grpc_url, "grpc", options)
    served = PipelineClient(server.grpc_url, "grpc", PIPELINE_BYTES).version
    if concurrency == 1:
        assert sent[:4] == [PIPELINE_BYTES, PIPELINE, PIPELINE_BYTES, PIPELINE]
    assert len(sent) == 2 * len(report.done) + 2  # the first image's two, sent again
    assert [r["model"]["version"] for r in report.done] == [served + 1] * len(report.done)
    assert all(Path(r["files"]["overlay"]).is_file() for r in report.done)


@pytest.mark.slow
@pytest.mark.triton
def test_ensembles_of_two_exports_stop_figures_naming_both_versions(
    server, photos, tmp_path, monkeypatch
):
    """The tensor ensemble stays on another version (its new one failed to load): the
    figures cannot be of one export, and the run says which versions answered."""
    real = PipelineClient.infer_raw

    def tensors_behind(self, *args, **kwargs):
        outputs = real(self, *args, **kwargs)
        self.answered -= self.model == PIPELINE
        return outputs

    monkeypatch.setattr(PipelineClient, "infer_raw", tensors_behind)
    options = InferOptions(tmp_path / "out", concurrency=1, progress=False, figures=True)
    served = PipelineClient(server.grpc_url, "grpc", PIPELINE_BYTES).version
    with pytest.raises(
        ClientError, match=f"answers with version {served} and {PIPELINE} with {served - 1}"
    ):
        run([str(photos / "sub")], server.grpc_url, "grpc", options)


def test_an_answer_from_an_export_before_the_newest_keeps_its_own_version():
    """An answer in flight when the run read a newer export: named by its own version."""
    import types

    from serving.infer import _Run

    run = _Run.__new__(_Run)
    run.lock = threading.Lock()
    run.base = types.SimpleNamespace(version=4)
    newest = {"ensemble": PIPELINE_BYTES, "version": 4, "export": "e4", "classes": "c"}
    run.exports = {4: (run.base, newest)}
    base, model = run.answered_by(3)
    # The newest export's name is not the older one's: left out, not borrowed.
    assert base is run.base and model == {"ensemble": PIPELINE_BYTES, "version": 3, "classes": "c"}
    assert run.answered_by(4)[1] == newest and run.model == newest


def _third_request_raises(monkeypatch, error: BaseException) -> list:
    """The client's third request raises ``error`` (the server gone, a Ctrl-C); the list
    returned grows by one for each request sent."""
    sent = []
    real = PipelineClient.infer_encoded

    def third_fails(self, blobs):
        sent.append(1)
        if len(sent) == 3:
            raise error
        return real(self, blobs)

    monkeypatch.setattr(PipelineClient, "infer_encoded", third_fails)
    return sent


@pytest.mark.slow
@pytest.mark.triton
def test_an_interrupted_run_resumes_from_its_predictions(server, photos, tmp_path, monkeypatch):
    """The server fails midway: the run stops with the records of the images that landed;
    --resume sends only the others, and the file ends with one written record per image."""
    options = InferOptions(tmp_path / "out", concurrency=1, progress=False, retry_seconds=0)
    sent = _third_request_raises(monkeypatch, ClientError("the server went away", status="503"))
    with pytest.raises(ClientError, match="went away"):
        run([str(photos / "sub")], server.grpc_url, "grpc", options)
    first = read_predictions(options.out / PREDICTIONS)
    assert len(first) == 2 and all(r["status"] == "ok" for r in first.values())
    sent.clear()
    options.resume = True
    again = run([str(photos / "sub")], server.grpc_url, "grpc", options)
    assert (again.skipped, len(again.done), len(sent)) == (2, 1, 1)
    records = read_predictions(options.out / PREDICTIONS)
    assert sorted(records) == ["deeper/three", "deeper/two", "one"]
    assert all(r["status"] == "ok" for r in records.values())
    assert {k: records[k] for k in first} == first  # the landed records are kept as they were


@pytest.mark.slow
@pytest.mark.triton
def test_ctrl_c_says_how_far_it_got_and_how_to_carry_on(server, photos, tmp_path, monkeypatch):
    options = InferOptions(tmp_path / "out", concurrency=1, progress=False)
    _third_request_raises(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt, match=r"2 of 3 images written to .*--resume carries on"):
        run([str(photos / "sub")], server.grpc_url, "grpc", options)
    assert len(read_predictions(options.out / PREDICTIONS)) == 2


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_many_in_flight_write_the_same_masks_as_one_at_a_time(server, photos, tmp_path, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    masks = {}
    for concurrency in (1, 4):
        options = InferOptions(tmp_path / str(concurrency), concurrency, progress=False)
        report = run([str(photos)], url, protocol, options)
        assert len(report.done) == len(GOOD) and len(report.failed) == len(BAD)
        assert [r["image"] for r in report.done] == [str(photos / n) for n in GOOD]
        masks[concurrency] = {
            (n, k): np.asarray(Image.open(p))
            for n in GOOD
            for k, p in _outputs(options.out, n).items()
        }
    assert masks[1].keys() == masks[4].keys()
    for key, mask in masks[1].items():
        np.testing.assert_array_equal(masks[4][key], mask, err_msg=str(key))
