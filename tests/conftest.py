"""Shared fixtures: one tiny trained + exported pipeline per session, and free ports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from serving.server import free_ports
from wsss.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]  # the project: tests/ mirrors its packages

# `make test` runs three pytest-xdist workers on a 2-core machine: each, and what it starts,
# gets one torch/OpenMP thread (read when torch is first imported, after this), so that
# they do not oversubscribe the cores. Set OMP_NUM_THREADS to choose otherwise.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# One instance of each served network in tests (the default is two): each instance of a
# Python-backend model is a stub process, and Triton 2.51's Python backend can abort at start
# (boost::interprocess::lock_exception, triton-inference-server/server#8882) when many stubs
# start on a machine that is very busy. Tests check behaviour, not throughput; `make bench`
# measures the default.
ONE_INSTANCE = [f"export.{m}.instances=1" for m in ("classifier", "segmenter", "refiner")]


@pytest.fixture(autouse=True)
def _opencv_threads():
    """A served model initialized in process (its tests) sets OpenCV to one thread for the
    whole process (``wsss.served.threads``): each test gets back the count it started with."""
    import cv2

    threads = cv2.getNumThreads()
    yield
    if cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)


TINY = [
    *ONE_INSTANCE,
    "data.image_size=64",
    "train.epochs=1",
    "train.batch_size=16",
    "data.val_fraction=0.2",
    "segmenter.base_channels=4",
    "segmenter.depth=2",
]


# The real Oxford-IIIT Pet photos the `realdata` tests train and score on: the shared subset
# beside the project (CI has it), or wherever WSSS_PET_DATA points.
REAL_PETS = Path(
    os.environ.get("WSSS_PET_DATA") or ROOT.parent / "shared" / "data" / "oxford-pet-subset"
)


@pytest.fixture(scope="session")
def real_pets() -> Path:
    if not (REAL_PETS / "annotations" / "trainval.txt").is_file():
        pytest.skip(f"no Oxford-IIIT Pet photos at {REAL_PETS} (set WSSS_PET_DATA to a Pet folder)")
    return REAL_PETS


# Real multi-object photos (COCO photos with VOC's 20 classes, VOC layout): the shared
# subset beside the project, or wherever WSSS_COCO_VOC_DATA points.
REAL_SCENES = Path(
    os.environ.get("WSSS_COCO_VOC_DATA") or ROOT.parent / "shared" / "data" / "coco-voc-subset"
)


@pytest.fixture(scope="session")
def real_scenes() -> Path:
    if not (REAL_SCENES / "ImageSets" / "Segmentation" / "val.txt").is_file():
        pytest.skip(
            f"no multi-object photos at {REAL_SCENES} (set WSSS_COCO_VOC_DATA to a VOC folder)"
        )
    return REAL_SCENES


# The longest modules, longest first (measured: `make test PYTEST_ARGS=--durations=0`). Under
# `make test` each worker takes a module at a time, so a long module handed out last
# leaves the other workers idle to the end; these go first, then every other module
# with slow, triton or docker tests, then the fast ones, which fill the gaps. Only the order
# changes: a module missing from the list runs all the same.
LONGEST_FIRST = (
    "training/test_quality.py",
    "training/test_real_pets.py",
    "training/test_real_scenes.py",
    "training/test_distributed.py",
    "serving/test_versions_live.py",
    "cli/test_main.py",
    "serving/test_serving_e2e.py",
    "serving/test_reload.py",
    "serving/test_lifecycle.py",
    "deploy/test_docker.py",
    "training/levelset/test_pipeline.py",
    "export/test_lock.py",
    "training/test_reproduce.py",
)
HEAVY = ("slow", "triton", "docker")


def pytest_collection_modifyitems(items):
    heavy = {i.path for i in items if any(i.get_closest_marker(m) for m in HEAVY)}

    def rank(item) -> int:
        name = item.path.relative_to(ROOT / "tests").as_posix()
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (item.path not in heavy)

    items.sort(key=rank)  # stable: a module's tests stay together and in their order


def pytest_terminal_summary(terminalreporter):
    """Say how many real-photo tests ran, so a skip is never silent in CI."""
    counts = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        counts[outcome] = sum(
            1
            for r in terminalreporter.stats.get(outcome, [])
            if "realdata" in getattr(r, "keywords", ())
        )
    if any(counts.values()):
        ran = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        terminalreporter.write_line(f"real-photo tests ({REAL_PETS}, {REAL_SCENES}): {ran}")


def free_port() -> int:
    return free_ports(1)[0]


def port_settings() -> list[str]:
    """``--set`` entries putting serve on three distinct free loopback ports."""
    http, grpc, metrics = free_ports(3)
    return [f"serve.http_port={http}", f"serve.grpc_port={grpc}", f"serve.metrics_port={metrics}"]


@pytest.fixture(scope="session")
def pets_root(tmp_path_factory):
    from training.data.synth import SynthOptions, write_synth

    return write_synth(tmp_path_factory.mktemp("pets"), SynthOptions("pets", 40, 64, seed=1))


@pytest.fixture(scope="session")
def tiny_cfg(pets_root, tmp_path_factory) -> Config:
    work = tmp_path_factory.mktemp("work")
    return load_config(
        None,
        TINY
        + [
            f"data.root={pets_root}",
            f"runs={work / 'runs'}",
            f"export.repository={work / 'model_repository'}",
            *port_settings(),
        ],
    )


@pytest.fixture(scope="session")
def trained(tiny_cfg) -> Config:
    from training import stages

    stages.run(tiny_cfg)
    return tiny_cfg


@pytest.fixture(scope="session")
def exported(trained) -> Config:
    from export.repository import export_repository

    export_repository(trained)
    return trained


def passthrough_export(trained: Config, work: Path, *overrides: str) -> Config:
    """The tiny trained classifier copied under ``work``, the pass-through segmenter (its
    served SEGMENTATION is the refined mask), ``overrides`` (the refiner), exported there on
    free ports."""
    import shutil

    from export.repository import export_repository
    from training import stages
    from wsss.config import PASSTHROUGH, with_overrides

    shutil.copytree(Path(trained.runs) / "classifier", work / "runs" / "classifier")
    cfg = with_overrides(
        trained,
        [
            f"runs={work / 'runs'}",
            f"export.repository={work / 'model_repository'}",
            f"segmenter.arch={PASSTHROUGH}",
            *overrides,
            *port_settings(),
        ],
    )
    stages.run(cfg, ("segmenter",))
    export_repository(cfg)
    return cfg


@pytest.fixture(scope="session")
def server(exported, tmp_path_factory):
    from pathlib import Path

    from serving.server import TritonServer

    srv = TritonServer(
        Path(exported.export.repository),
        exported.serve,
        tmp_path_factory.mktemp("server"),
        open_apis=("shared-memory",),  # the bench test's perf_analyzer run with system shm
    )
    with srv:
        yield srv


def write_random_checkpoints(
    runs,
    class_names=("bear", "cat", "dog"),
    seg_classes=2,
    task="pets",
    segmenter=("unet", {"base_channels": 4, "depth": 2}),
):
    """Untrained classifier + segmenter checkpoints: enough for export and serving tests."""
    from pathlib import Path

    from training.loop import save_checkpoint
    from training.models import build_classifier, build_segmenter

    runs = Path(runs)
    ckw = {"num_classes": len(class_names), "output_stride": 16, "weights": None}
    seg_arch, skw = segmenter[0], {"num_classes": seg_classes} | segmenter[1]
    for family, arch, model, kwargs, extra in (
        (
            "classifier",
            "resnet18",
            build_classifier("resnet18", **ckw),
            ckw,
            {"class_names": list(class_names)},
        ),
        ("segmenter", seg_arch, build_segmenter(seg_arch, **skw), skw, {}),
    ):
        (runs / family).mkdir(parents=True, exist_ok=True)
        meta = {"family": family, "arch": arch, "task": task, "kwargs": kwargs} | extra
        save_checkpoint(
            {"state_dict": model.eval().state_dict(), "meta": meta}, runs / family / "best.pt"
        )
    return runs


def random_export_cfg(tmp_path, *overrides, segmenter=None, class_names=None) -> Config:
    runs = write_random_checkpoints(
        tmp_path / "runs",
        **({"segmenter": segmenter} if segmenter else {}),
        **({"class_names": class_names} if class_names else {}),
    )
    return load_config(
        None,
        [
            "data.image_size=48",
            f"runs={runs}",
            f"export.repository={tmp_path / 'repo'}",
            *port_settings(),
            "serve.poll_seconds=1",
            *ONE_INSTANCE,
            *overrides,
        ],
    )


def wait_for(predicate, timeout: float = 90.0, what: str = "the condition") -> None:
    """Return once ``predicate()`` is true; fail the test, naming ``what``, after
    ``timeout`` seconds. Tests wait on conditions, never on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
