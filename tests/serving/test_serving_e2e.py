"""The walking skeleton on the real stack: tiny trained models, exported, served by tritonserver.

Tolerances between the ensemble (ONNX Runtime in Triton) and the in-process PyTorch pipeline:
float outputs within ATOL; class-index masks may differ on at most MISMATCH of pixels, where a
CAM or probability within float error of a threshold or a tie lands on the other side.
"""

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from serving.client import ClientError, PipelineClient, load_image
from serving.perf import (
    BenchError,
    PerfSettings,
    concurrency_levels,
    format_table,
    run_perf_analyzer,
    settled_statistics,
    statistics_delta,
)
from tests.conftest import free_port
from training.data import list_samples, read_image
from training.pipeline import pipeline_from_config
from wsss.served.images import resize_image, resize_mask
from wsss.tensors import (
    CLASSIFIER,
    PIPELINE,
    PIPELINE_BYTES,
    REFINER,
    SEGMENTATION,
    SEGMENTER,
)

pytestmark = [pytest.mark.slow, pytest.mark.triton]

ATOL = {"SCORES": 1e-4, "SEG_PROBS": 1e-4, "CAMS": 1e-3}
MISMATCH = 1e-3


@pytest.fixture(scope="module")
def images(exported):
    size = exported.data.image_size
    samples = list_samples(exported.data.root, "pets", "test")[:3]
    return np.stack([resize_image(read_image(s.image_path), (size, size)) for s in samples])


@pytest.fixture(scope="module")
def reference(exported, images):
    return pipeline_from_config(exported)(images)


def _assert_close(got, want, mismatch: dict[str, float] | None = None):
    """Float outputs within ATOL; masks differing on at most MISMATCH of their pixels, or
    ``mismatch[name]``."""
    mismatch = mismatch or {}
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        if name in ATOL:
            np.testing.assert_allclose(got[name], value, atol=ATOL[name], err_msg=name)
        else:
            assert (got[name] != value).mean() <= mismatch.get(name, MISMATCH), name


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_matches_in_process_pipeline(server, images, reference, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = PipelineClient(url, protocol)
    assert client.image_size == images.shape[1:3]
    _assert_close(client.infer(images), reference)
    one = client.infer(images[1:2])  # batch of one, and the ensemble batches independently
    _assert_close(one, {k: v[1:2] for k, v in reference.items()})
    client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_subset_of_outputs_is_answered(server, images, reference, protocol):
    """Any outputs a client asks for come back, and only those, asked through the project's
    client and through plain tritonclient alike: each ensemble is one step, its chain
    (wsss.tensors.CHAINS), so Triton 2.51's pruning, which fails 22 of the 31 subsets of a
    chain by itself (see wsss.pruning), never runs on it. Every subset is tried."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = PipelineClient(url, protocol)
    module = client.module
    raw = module.InferenceServerClient(url)
    pixels = module.InferInput("IMAGE", list(images[:1].shape), "UINT8")
    pixels.set_data_from_numpy(np.ascontiguousarray(images[:1]))
    names = [t.name for t in client.specs.outputs]
    for k in range(1, len(names) + 1):
        for outputs in itertools.combinations(names, k):
            got = client.infer(images[:1], outputs=outputs)
            _assert_close(got, {n: reference[n][:1] for n in outputs})
            asked = [module.InferRequestedOutput(n) for n in outputs]
            answer = raw.infer(PIPELINE, [pixels], outputs=asked)
            _assert_close({n: answer.as_numpy(n) for n in outputs}, got)
    # Triton's classification extension: top-k by name, SCORES alone.
    top = raw.infer(
        PIPELINE, [pixels], outputs=[module.InferRequestedOutput("SCORES", class_count=2)]
    )
    best = int(reference["SCORES"][0].argmax())
    assert top.as_numpy("SCORES")[0][0].decode().split(":")[1] == str(best)
    raw.close()
    # Each request runs the whole chain, once.
    before = settled_statistics(server.grpc_url)
    client.infer(images, outputs=[SEGMENTATION])
    ran = statistics_delta(before, settled_statistics(server.grpc_url))
    assert {CLASSIFIER, REFINER, SEGMENTER, PIPELINE} <= set(ran), sorted(ran)
    assert all(ran[m].requests == 1 for m in (CLASSIFIER, REFINER, SEGMENTER)), ran
    bytes_client = PipelineClient(url, protocol, model=PIPELINE_BYTES)
    full = bytes_client.infer(images[:1])
    for k in (1, 2):
        for outputs in itertools.combinations(list(full), k):
            got = bytes_client.infer(images[:1], outputs=outputs)
            assert set(got) == set(outputs)
            for name in outputs:
                np.testing.assert_allclose(got[name], full[name], atol=1e-4, err_msg=name)
    with pytest.raises(ClientError, match="asked for CAMS_TYPO"):
        client.infer(images, outputs=["CAMS_TYPO"])
    client.close()
    bytes_client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_input_is_refused_and_server_keeps_serving(server, images, reference, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = PipelineClient(url, protocol)
    wrong_shape = np.zeros((1, 17, 23, 3), np.uint8)
    wrong_dtype = images.astype(np.float32)
    with pytest.raises(ClientError, match="shape"):
        client.infer(wrong_shape)
    with pytest.raises(ClientError, match="dtype"):
        client.infer(wrong_dtype)
    # The same mistakes sent past the client checks: the server itself says no.
    with pytest.raises(ClientError, match="server refused"):
        client.infer_raw({"IMAGE": wrong_shape})
    with pytest.raises(ClientError, match="server refused"):
        client.infer_raw({"IMAGE": wrong_dtype})
    with pytest.raises(ClientError, match="server refused"):
        client.infer_raw({"NOT_AN_INPUT": images})
    with pytest.raises(ClientError, match="cannot decode"):
        load_image(b"\x89PNG but not really")
    assert client.client.is_server_live() and client.client.is_model_ready(PIPELINE)
    _assert_close(client.infer(images), reference)


@pytest.mark.parametrize("model", ["wsss_pipeline", "wsss_pipeline_bytes"])
def test_perf_analyzer_completes(server, tmp_path, model):
    spec = PipelineClient(server.grpc_url, "grpc").all_specs[model]
    # Count windows and a wide stability band: this checks that perf_analyzer runs against
    # the ensemble on a shared, noisy machine, not how fast it is.
    batch = 1 if model == "wsss_pipeline_bytes" else 2
    settings = PerfSettings(
        batch=batch, concurrency="1:2", stability_percent=200, max_trials=4, request_count=8
    )
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        results = run_perf_analyzer(spec, url, protocol, settings, workdir=tmp_path)
        # Every level is reported; on a busy machine a level may be flagged unstable.
        assert [r.concurrency for r in results] == [1, 2]
        assert all(r.throughput > 0 for r in results)
        assert all(r.p99_ms >= r.p50_ms > 0 for r in results if r.stable)
        assert all(r.mean_ms > 0 for r in results if not r.stable)


def test_wsss_bench_sends_the_files_and_refuses_a_batch_over_the_models(
    server, exported, tmp_path, capsys
):
    """`wsss bench --images DIR` sends each file's own bytes to the bytes ensemble (as
    `wsss infer` does) and its table says what it sent; a --batch over the ensemble's
    max_batch_size is one line, not perf_analyzer's usage."""
    from cli.main import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for k, sample in enumerate(list_samples(exported.data.root, "pets", "test")[:2]):
        (photos / f"{k}.png").write_bytes(_png(read_image(sample.image_path)))
    url = ["--url", server.grpc_url]
    main(["bench", *url, "--model", PIPELINE_BYTES, "--images", str(photos), "--concurrency",
          "1", "--request-count", "4", "--stability", "200"])  # fmt: skip
    assert f"### {PIPELINE_BYTES} over grpc, batch 1: 2 files" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--batch 9 is over wsss_pipeline's max_batch_size 8"):
        main(["bench", *url, "--batch", "9"])


def test_perf_analyzer_reports_unstable_levels_flagged(server, tmp_path):
    """A stability band no window can meet: every level is still reported, flagged."""
    spec = PipelineClient(server.grpc_url, "grpc").all_specs["wsss_pipeline"]
    settings = PerfSettings(
        concurrency="1:2", stability_percent=0.001, max_trials=3, request_count=4
    )
    results = run_perf_analyzer(spec, server.grpc_url, "grpc", settings, workdir=tmp_path)
    assert [r.concurrency for r in results] == [1, 2]
    assert not any(r.stable for r in results)
    assert all(r.throughput > 0 and r.mean_ms > 0 for r in results)
    assert "(unstable)" in format_table(results, "t")


def test_bench_measures_baselines_and_server_side_by_side(server, exported, tmp_path):
    from benchmarks.serving import (
        HOST_SPEED,
        OrtPipeline,
        cpu_per_image,
        eager_rows,
        ort_rows,
        output_rows,
        parallel_rows,
        ratios,
        report,
        served_rows,
        write,
    )
    from training.evaluate import load_test_set

    photos = [np.asarray(p) for p in load_test_set(exported).images[:3]]
    size = (exported.data.image_size, exported.data.image_size)
    images = np.stack([resize_image(p, size) for p in photos])
    rows = eager_rows(exported, images, 0.3) + ort_rows(exported, images, 0.3)
    # a trained segmenter: the bytes chain steps through it, and so does the in-process twin
    assert OrtPipeline(exported, 1).bytes_reads == SEGMENTATION
    files = [cv2.imencode(".png", np.ascontiguousarray(p[..., ::-1]))[1].tobytes() for p in photos]
    parallel, decoding = parallel_rows(exported, images, 0.3, batches=(1,), blobs=files)
    assert parallel.concurrency == decoding.concurrency == os.cpu_count()
    assert "from the photos' files" in decoding.what and "files" not in parallel.what
    assert decoding.images_per_s > 0
    rows += [parallel, decoding]
    settings = PerfSettings(concurrency="1:2", stability_percent=200, max_trials=3, request_count=8)
    rows += served_rows(server, images, photos, settings, batches=(2,))
    served = {(r.what, r.concurrency, r.batch) for r in rows if r.what.startswith("served")}
    asked = output_rows(server, images, 0.3)
    assert [r.what.rsplit(" for ", 1)[1] for r in asked] == [
        "every output",
        "SCORES + SEGMENTATION",
        "SEGMENTATION only",
    ]
    rows += asked
    # The pair again after the served rows (as make bench runs it, the server stopped there):
    # the machine's own speed over the run becomes one more ratio.
    again = parallel_rows(exported, images, 0.3, batches=(1,), blobs=files, after=True)
    assert [r.what for r in again] == [
        r.what.replace(")", ", again after the served rows)") for r in (parallel, decoding)
    ]
    rows += again
    # gRPC, HTTP, shared memory, bytes: concurrency 1 and 2 each; gRPC at batch 2
    assert len(served) == 9 and ("served wsss_pipeline, gRPC", 1, 2) in served
    in_process = {(r.what, r.batch) for r in rows if r.what.startswith("ONNX")}
    assert {b for _, b in in_process} == {1, 4, 8} and len(in_process) == 10  # 2 thread settings
    assert all(r.images_per_s > 0 for r in rows)
    # Triton's per-model statistics of each served row: every step of the ensemble served
    # the requests perf_analyzer sent, and its model time is measured.
    grpc_c1 = next(r for r in rows if r.what == "served wsss_pipeline, gRPC" and r.batch == 1)
    models = grpc_c1.extra["models"]
    assert {"wsss_pipeline", "classifier", "refiner", "segmenter"} <= set(models)
    assert models["classifier"]["requests"] == models["wsss_pipeline"]["requests"] > 0
    assert models["classifier"]["compute_infer_us"] > 0
    batched = next(r for r in rows if r.batch == 2 and r.what.startswith("served"))
    assert batched.extra["models"]["classifier"]["mean_batch"] >= 2
    found = ratios(rows)
    assert len(found) == 7 and all(v > 0 for v in found.values())
    assert HOST_SPEED in found
    bytes_best = max(r.images_per_s for r in rows if "bytes" in r.what)
    twin = found[
        "served bytes ensemble best throughput / one in-process pipeline per core "
        "decoding the same files"
    ]
    # against the faster of the two measurements of the pair decoding the files
    limit = max(decoding.images_per_s, again[1].images_per_s)
    assert twin == pytest.approx(bytes_best / limit)
    one = PerfSettings(concurrency="2", stability_percent=200, max_trials=3, request_count=8)
    cpu = cpu_per_image(server, images, one)
    for process in ("tritonserver", "perf_analyzer", "classifier (Python stub)"):
        assert cpu.per_image[process] > 0, cpu
    # The window's own rate and load: no more CPU than the machine has (other tests' too).
    assert cpu.images_per_s > 0 and 0 < cpu.cores_busy <= 1.1 * (os.cpu_count() or 1)
    text = report(rows, found, exported, "test", None, cpu)
    assert "| classifier (Python stub) |" in text and "Over that window (" in text
    assert "target >= 0.9" in text and "| gRPC, concurrency 1 | classifier |" in text
    write(rows, found, tmp_path, text, None)
    assert (tmp_path / "throughput_latency.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["ratios"] == found
    assert len((tmp_path / "results.csv").read_text().splitlines()) == len(rows) + 1


def test_concurrency_levels():
    assert concurrency_levels("1:4:1") == [1, 2, 3, 4]
    assert concurrency_levels("1:5:2") == [1, 3, 5]
    assert concurrency_levels("1:2") == [1, 2] and concurrency_levels("3") == [3]
    with pytest.raises(BenchError):
        concurrency_levels("4:1")
    with pytest.raises(BenchError, match="whole numbers"):
        concurrency_levels("abc")
    # Refused up front in one line, not by perf_analyzer printing its whole usage.
    with pytest.raises(BenchError, match="batch 0: at least 1"):
        PerfSettings(batch=0)
    with pytest.raises(BenchError, match="whole numbers"):
        PerfSettings(concurrency="1:x")


def _png(image):
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bytes_ensemble_matches_tensor_ensemble(server, exported, protocol):
    """Encoded bytes of any size in, masks at that size out, equal to resizing client-side."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = PipelineClient(url, protocol)
    sample = list_samples(exported.data.root, "pets", "test")[0]
    big = cv2.resize(read_image(sample.image_path), (150, 110))  # not square, not model size
    reference = client.infer(resize_image(big, client.image_size)[None])
    for blob in (_png(big),):
        got = client.infer_encoded([blob, blob])
        np.testing.assert_allclose(got["SCORES"][0], reference["SCORES"][0], atol=ATOL["SCORES"])
        for full, small in (
            ("PSEUDO_MASK_FULL", "PSEUDO_MASK"),
            ("SEGMENTATION_FULL", "SEGMENTATION"),
        ):
            assert got[full].shape == (2, 110, 150) and got[full].dtype == np.uint8
            want = resize_mask(reference[small][0], (110, 150))
            assert (got[full][1] != want).mean() <= MISMATCH, full
    jpeg = cv2.imencode(".jpg", big)[1].tobytes()
    assert client.infer_encoded([jpeg])["SEGMENTATION_FULL"].shape == (1, 110, 150)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_of_the_bytes_ensemble(server, images, protocol):
    """PipelineClient(model=wsss_pipeline_bytes) sends pixels as PNG: the same masks back."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    tensor = PipelineClient(url, protocol).infer(images[:2])
    client = PipelineClient(url, protocol, model="wsss_pipeline_bytes")
    got = client.infer(images[:2])
    np.testing.assert_allclose(got["SCORES"], tensor["SCORES"], atol=ATOL["SCORES"])
    assert (got["SEGMENTATION_FULL"] != tensor["SEGMENTATION"]).mean() <= MISMATCH
    with pytest.raises(ClientError, match="must be wsss_pipeline or wsss_pipeline_bytes"):
        PipelineClient(url, protocol, model="classifier")


def test_bytes_ensemble_refuses_bad_bytes_and_keeps_serving(server, images):
    client = PipelineClient(server.grpc_url, "grpc")
    with pytest.raises(ClientError, match="item 1: cannot decode") as refused:
        client.infer_encoded([_png(images[0]), b"definitely not an image"])
    # The step that refused, without the two ensembles Triton names on the way.
    assert refused.value.reason.startswith("preprocess: item 1: cannot decode")
    assert "in ensemble" not in str(refused.value)
    with pytest.raises(ClientError, match="share a size"):
        client.infer_encoded([_png(images[0]), _png(images[0][:40])])
    with pytest.raises(ClientError, match="empty image bytes"):
        client.infer_encoded([b""])
    assert client.infer_encoded([_png(images[0])])["SEGMENTATION_FULL"].shape[0] == 1


def _gif(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="GIF")
    return buf.getvalue()


def _huge_png() -> bytes:
    """12,000 x 12,000 pixels in a few hundred KB: a one-bit PNG."""
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, format="PNG")
    return buf.getvalue()


def _malformed_tiff() -> bytes:
    """A TIFF whose StripOffsets tag says ASCII: Pillow raises TypeError reading it (the
    server answered 500 then, and `wsss infer` stopped at the file)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    first = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[first : first + 2], "little")):
        entry = first + 2 + 12 * k
        if int.from_bytes(data[entry : entry + 2], "little") == 273:
            data[entry + 2 : entry + 4] = (2).to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_bytes_are_a_client_error_through_the_ensemble(server, images, protocol):
    """HTTP 400 / gRPC INVALID_ARGUMENT with a message that says what is wrong; the server
    goes on serving."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = PipelineClient(url, protocol)
    jpeg = cv2.imencode(".jpg", images[0])[1].tobytes()
    cases = {
        "not an image": ([b"definitely not an image"], "cannot decode"),
        "empty": ([b""], "empty image bytes"),
        "truncated JPEG": ([jpeg[: len(jpeg) // 3]], "cannot decode"),
        "TIFF whose strips Pillow trips on": ([_malformed_tiff()], "cannot decode"),
        "too many pixels": ([_huge_png()], "exceeds the limit"),
        "sizes differ": ([_png(images[0]), _png(images[0][:40])], "share a size"),
    }
    for name, (blobs, message) in cases.items():
        with pytest.raises(ClientError, match=message) as info:
            client.infer_encoded(blobs)
        status = info.value.__cause__.status()
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (name, status)
    assert client.infer_encoded([_png(images[0])])["SEGMENTATION_FULL"].shape[0] == 1
    # A GIF is an image: read as training reads it (its first frame), the same answer as
    # the PNG of those pixels.
    gif = _gif(images[0])
    pixels = np.asarray(Image.open(io.BytesIO(gif)).convert("RGB"))
    got, want = client.infer_encoded([gif]), client.infer_encoded([_png(pixels)])
    np.testing.assert_array_equal(got["SEGMENTATION_FULL"], want["SEGMENTATION_FULL"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_client_at_another_protocols_port_is_told_so(server, protocol):
    """An HTTP client given the gRPC port read "('Expected HTTP/', 8)"; a gRPC one given
    the HTTP port "Socket closed": both now say which port serves their protocol."""
    url = server.http_url if protocol == "grpc" else server.grpc_url
    with pytest.raises(ClientError, match="not as Triton's (gRPC|HTTP) endpoint") as info:
        PipelineClient(url, protocol)
    assert ("GRPC_PORT" if protocol == "grpc" else "HTTP_PORT") in str(info.value)
    with pytest.raises(ClientError) as info:  # nothing there at all: no such hint
        PipelineClient(f"127.0.0.1:{free_port()}", protocol)
    assert "endpoint" not in str(info.value)


def _wsss(*args):
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_infer_writes_masks_and_figure(server, exported, tmp_path):
    sample = list_samples(exported.data.root, "pets", "test")[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        out = tmp_path / protocol
        proc = _wsss(
            "infer",
            str(sample.image_path),
            "--url",
            url,
            "--protocol",
            protocol,
            "--out",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr
        stem = sample.image_path.stem
        original = read_image(sample.image_path).shape[:2]
        for kind in ("pseudo_mask", "segmentation"):
            assert load_image(out / f"{stem}_{kind}.png").shape[:2] == original
        assert (out / f"{stem}_overlay.png").stat().st_size > 1000
    proc = _wsss("infer", str(bad), "--url", server.grpc_url, "--out", str(tmp_path / "bad"))
    assert proc.returncode != 0 and "cannot decode" in proc.stderr
    # A file name that is not UTF-8 (bytes a camera or an old archive wrote): its line on
    # a UTF-8 terminal was a UnicodeEncodeError after the files were written.
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg"))
    odd.write_bytes(sample.image_path.read_bytes())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "infer",
            str(odd),
            "--url",
            server.grpc_url,
            "--out",
            str(tmp_path / "odd"),
        ],
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"caf\\udce9.jpg: " in proc.stdout and b"Traceback" not in proc.stderr
