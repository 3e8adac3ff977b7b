"""make bench's own pieces that need no server: the sweep's settings are real config."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.serving import CPU_SWEEP, GPU_SWEEP, Setting
from wsss.config import ConfigError, load_config, with_overrides


@pytest.mark.parametrize("setting", CPU_SWEEP + GPU_SWEEP, ids=lambda s: s.label)
def test_every_sweep_setting_is_applied_to_the_served_networks(setting: Setting):
    cfg = with_overrides(load_config("configs/quick.yaml"), setting.overrides())
    expected = {
        "classifier": (setting.instances, setting.threads),
        "segmenter": (setting.instances, setting.threads),
        "refiner": (setting.refiner, setting.threads),
        "vit": (setting.vit, setting.vit_threads),
    }
    for name, (instances, threads) in expected.items():
        model = getattr(cfg.export, name)
        assert model.onnxruntime.intra_op_threads == threads
        assert model.max_queue_delay_us == setting.delay_us
        assert model.instances == instances
        gpu = setting.accelerator != "none"
        assert (model.kind == "KIND_GPU") == gpu
        assert model.onnxruntime.gpu_accelerator == setting.accelerator
    assert cfg.export.refine.method == "fixed"  # the rest of the config is kept


def test_with_overrides_checks_what_it_applies():
    cfg = load_config(None)
    assert with_overrides(cfg, ["export.classifier.instances=3"]).export.classifier.instances == 3
    assert cfg.export.classifier.instances == 2  # the original is untouched
    with pytest.raises(ConfigError):
        with_overrides(cfg, ["export.classifier.instancez=3"])


def test_perf_analyzer_input_takes_a_files_own_bytes():
    """The bytes ensemble gets an encoded file as it is (not decoded and re-encoded as PNG);
    a pixel ensemble gets it decoded and resized."""
    import base64
    import struct

    import cv2
    import numpy as np

    from serving.perf import input_data
    from wsss.tensors import PIPELINE, PIPELINE_BYTES, served_models

    specs = served_models(8, 2, 2)
    jpeg = cv2.imencode(".jpg", np.zeros((5, 7, 3), np.uint8))[1].tobytes()
    ((entry,),) = (e.values() for e in input_data(specs[PIPELINE_BYTES], [jpeg])["data"])
    assert base64.b64decode(entry["b64"]) == struct.pack("<I", len(jpeg)) + jpeg
    ((entry,),) = (e.values() for e in input_data(specs[PIPELINE], [jpeg])["data"])
    assert entry["shape"] == [8, 8, 3]


@pytest.mark.realdata
def test_a_profile_on_synthetic_data_is_benchmarked_on_real_photos(tmp_path, real_pets):
    from benchmarks.serving import SHARED_PETS, bench_photos, report_folder
    from wsss.config import load_config

    if real_pets.resolve() != SHARED_PETS.resolve():
        pytest.skip("the shared Pet photos are elsewhere")
    serve = load_config("configs/serve.yaml")
    assert serve.data.synth_count > 0
    photos, blobs, source = bench_photos(serve, [])
    assert len(photos) == len(blobs) == 8 and "oxford-pet-subset" in source
    assert photos.shape == (8, serve.data.image_size, serve.data.image_size, 3)
    assert blobs[0][:2] == b"\xff\xd8"  # the JPEG files as they are
    # Any folder instead.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(blobs[0])
    photos, blobs, source = bench_photos(serve, [str(folder)])
    assert len(photos) == 1 and str(folder) in source
    assert report_folder("configs/serve.yaml", None).name == "serve"
    assert report_folder("configs/quick.yaml", None) == report_folder(None, None)


def test_a_listed_test_photo_that_is_missing_is_one_line(tmp_path):
    """A profile on its own (real, synth_count 0) data whose test list names an absent
    image: a FileNotFoundError traceback from reading it, before."""
    from benchmarks.serving import bench_photos
    from training.data.synth import SynthOptions, write_synth

    root = write_synth(tmp_path / "voc", SynthOptions("voc", 10, 32))
    first = (root / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    (root / "JPEGImages" / f"{first}.jpg").unlink()
    cfg = load_config(None, [f"data.root={root}", "data.task=voc", "data.synth_count=0"])
    with pytest.raises(SystemExit, match=f"wsss bench: .*{first}.jpg: the image is missing"):
        bench_photos(cfg, [])


def test_each_profile_is_benchmarked_from_its_own_repository():
    """Every profile's export.repository defaults to make serve's: the bench gives the
    others <runs>/model_repository, so it neither times nor overwrites make serve's."""
    from benchmarks.serving import own_repository

    serve = load_config("configs/serve.yaml")
    assert own_repository(serve, "configs/serve.yaml", []).export.repository == "model_repository"
    quick = load_config("configs/quick.yaml")
    got = own_repository(quick, "configs/quick.yaml", []).export.repository
    assert got == "runs/quick/model_repository"
    mine = with_overrides(quick, ["export.repository=/tmp/mine"])
    assert (
        own_repository(mine, None, ["export.repository=/tmp/mine"]).export.repository == "/tmp/mine"
    )


def test_an_untrained_profile_is_exported_aside_with_its_level_set(tmp_path, monkeypatch):
    """``wsss bench --report --untrained``: a profile that serves a level set gets random
    networks and a random level set, exported into a folder of its own, so its speed is
    measured with nothing trained and the profile's own runs are never touched."""
    from benchmarks.serving import untrained
    from wsss.tensors import REFINER

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "mine"
    cfg = load_config(
        None,
        [
            "data.image_size=48",
            "refine.method=levelset",
            "levelset.hidden=4",
            "levelset.modes=4",
            f"runs={runs}",
        ],
    )
    got = untrained(cfg, "configs/levelset_profile.yaml")
    work = Path(".cache/bench/untrained/levelset_profile")  # under tmp_path, the cwd
    assert Path(got.runs) == work / "runs" and Path(got.export.repository) == work / "repo"
    assert (work / "runs" / "levelset" / "best.pt").exists()
    assert (work / "repo" / REFINER / "1" / "model.onnx").exists()  # the level set's graph
    assert not runs.exists()


def _rows(before: float, after: float, sent: float) -> list:
    from benchmarks.serving import AFTER, EAGER, FROM_FILES, ORT, PAIR, Row

    pair = f"{ORT}, 2 {PAIR}"
    return [
        Row(EAGER, 1, 1, 5.0, 200.0, 210.0),
        Row(f"{ORT}, 1 thread)", 1, 1, 10.0, 100.0, 105.0),
        Row(f"{pair})", 1, 2, before, 100.0, 110.0),
        Row(f"{pair}{FROM_FILES})", 1, 2, before - 1, 100.0, 110.0),
        Row("served wsss_pipeline, gRPC", 1, 1, 12.0, 80.0, 90.0),
        Row("served wsss_pipeline_bytes (real images), gRPC", 1, 3, sent, 150.0, 190.0),
        Row(f"{pair}{AFTER})", 1, 2, after, 100.0, 110.0),
        Row(f"{pair}{FROM_FILES}{AFTER})", 1, 2, after - 1, 100.0, 110.0),
    ]


def test_the_in_process_pair_measured_again_bounds_the_served_rows_and_shows_drift():
    """The pairs run before the server starts and again after it stops: each limit is the
    faster of the two, and their ratio (the machine's speed over the run; of the two pairs,
    the one that moved most) is reported, with a line under the ratios where it moved by
    more than 5%."""
    from benchmarks.serving import HOST_SPEED, _drift_note, ratios

    steady = ratios(_rows(20.0, 19.6, 17.0))
    assert steady[HOST_SPEED] == pytest.approx(18.6 / 19.0)  # the files' pair moved more
    assert _drift_note(steady) == []
    best = "served bytes ensemble (the files) best throughput / the best in-process row"
    assert steady[f"{best} (target >= 0.9)"] == pytest.approx(17.0 / 20.0)

    slowed = ratios(_rows(20.0, 25.0, 17.0))  # the second measurement ran faster
    assert slowed[HOST_SPEED] == pytest.approx(24.0 / 19.0)
    assert slowed[f"{best} (target >= 0.9)"] == pytest.approx(17.0 / 25.0)  # the faster one
    twin = "served bytes ensemble best throughput / one in-process pipeline per core decoding"
    assert slowed[f"{twin} the same files"] == pytest.approx(17.0 / 24.0)
    (note,) = [line for line in _drift_note(slowed) if line]
    assert "1.26x its first rate" in note and "Measure again" in note
