"""The `wsss` command line, as a user runs it, on a tiny profile."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def wsss(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_data_train_evaluate_export(tmp_path):
    sets = [
        x
        for o in TINY
        + [
            f"data.root={tmp_path / 'data'}",
            f"runs={tmp_path / 'runs'}",
            f"export.repository={tmp_path / 'repo'}",
        ]
        for x in ("--set", o)
    ]
    out = wsss("data", "synth", "--count", "30", *sets).stdout
    assert "wrote 30 pets images (64x64, standard)" in out
    # What the trainer container runs first: the same benchmark is not written again.
    out = wsss("data", "synth", "--count", "30", "--if-missing", *sets).stdout
    assert "left as it is" in out
    wsss("train", *sets)
    for stage in ("classifier", "segmenter"):
        assert (tmp_path / "runs" / stage / "best.pt").exists()
        assert (tmp_path / "runs" / stage / "config.yaml").exists()
        lines = (tmp_path / "runs" / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["epoch"] == 1
    # The rows name the networks as trained, whatever the config now says.
    table = wsss("evaluate", *sets, "--set", "classifier.arch=mobilenet_v2").stdout
    assert "| pseudo-masks (resnet18 cam + otsu) |" in table
    assert "| segmenter (unet, trained on the pseudo-masks) |" in table
    assert "arch: resnet18" in (tmp_path / "runs" / "eval" / "config.yaml").read_text()
    results = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())
    pseudo, seg = results["rows"]
    assert results["images"] == 8 and {"accuracy", "pseudo_iou", "refine_ms"} <= set(pseudo)
    assert {"seg_iou", "seg_dice", "seg_image_iou"} == set(seg) - {"output"}
    assert (tmp_path / "runs" / "eval" / "results.png").stat().st_size > 1000
    wsss("export", *sets)
    repo = tmp_path / "repo"
    for model in ("classifier", "segmenter", "refiner", "wsss_pipeline"):
        assert (repo / model / "config.pbtxt").exists()
    assert (repo / "classifier" / "1" / "model.onnx").exists()
    # --repository is where it exports (it was read only with --check, and the profile's
    # repository, perhaps the one a server polls, took the export instead).
    out = wsss("export", *sets, "--repository", str(tmp_path / "other")).stdout
    assert f"exported version 1 to {tmp_path / 'other'}" in out
    assert not (repo / "classifier" / "2").exists()


@pytest.mark.parametrize("flag", [["--merge", "a", "b"], ["--url", "127.0.0.1:8001"], ["--reuse"]])
def test_a_study_option_without_its_study_is_refused(flag, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", *flag])
    assert stopped.value.code == 2  # a usage error, as argparse's own
    err = capsys.readouterr().err
    assert err.startswith("usage: wsss evaluate ") and "a study's, not wsss evaluate's" in err


def test_bad_config_is_a_clear_error():
    proc = wsss("train", "--set", "train.epochs=many", check=False)
    assert proc.returncode != 0 and "train.epochs: expected int" in proc.stderr


def test_a_missing_config_or_profile_is_named_in_one_line(tmp_path):
    """Not `[Errno 2] No such file or directory: '...'`: the path, then what is wrong; a
    profile's name that is none lists the names there are (in process, as test_main's
    other refusals)."""
    from cli.main import main

    absent = tmp_path / "nope.yaml"
    names = ", ".join(sorted(p.stem for p in (ROOT / "configs" / "reproduce").glob("*.yaml")))
    for command, message in (
        (["export", "--check", "--config", str(absent)], f"{absent}: No such file or directory"),
        (
            ["reproduce", "--profile", "nope"],
            f"no profile 'nope' (one of {names}): name a profile file",
        ),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(command)
        assert str(stopped.value.code) == f"wsss {command[0]}: {message}"


@pytest.mark.parametrize("variable", ["HTTP_PORT", "GRPC_PORT"])
def test_a_bad_port_in_the_environment_is_named_as_set(variable, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv(variable, "abc")
    for command in (["evaluate"], ["infer", "--protocol", variable[:-5].lower(), "x.jpg"]):
        with pytest.raises(SystemExit, match=f"{variable}='abc' in the environment"):
            main(command)


def test_a_profile_that_cannot_train_stops_before_it_starts_in_one_line(tmp_path, capsys):
    """A misspelt network, a device torch has not, a file where the runs go: one line and
    a non-zero status, before any stage trains (in process: the same main() as `wsss`)."""
    from cli.main import main

    (tmp_path / "notes.txt").write_text("mine")
    data = [f"data.root={tmp_path / 'data'}", "data.image_size=32", "train.epochs=1"]
    main(["data", "synth", "--count", "10", "--size", "32", "--set", data[0]])
    for change, message in (
        ("segmenter.arch=unte", "segmenter.arch 'unte': one of deeplabv3, passthrough, unet"),
        ("classifier.arch=resnet1", "classifier.arch 'resnet1': one of"),
        ("train.device=tpu", "train.device 'tpu': auto, cpu, cuda or cuda:N"),
        (f"runs={tmp_path / 'notes.txt'}", "Not a directory"),
    ):
        sets = [x for o in (*data, f"runs={tmp_path / 'runs'}", change) for x in ("--set", o)]
        with pytest.raises(SystemExit) as stopped:
            main(["train", *sets])
        assert str(stopped.value.code).startswith("wsss train: ")
        assert message in str(stopped.value.code)
        assert not (tmp_path / "runs" / "classifier").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("url", ["https://127.0.0.1:8000", "127.0.0.1:abc", "127.0.0.1", "h:99999"])
def test_a_url_that_is_not_host_port_is_one_line(url, tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(b"not read: the url is refused first")
    proc = wsss("infer", str(photo), "--url", url, "--protocol", "http", check=False)
    assert proc.returncode == 1
    assert "takes HOST:PORT" in proc.stderr and "Traceback" not in proc.stderr


def test_server_address_drops_a_scheme_the_protocols_use():
    from serving.client import server_address

    assert server_address("http://127.0.0.1:8000/") == "127.0.0.1:8000"
    assert server_address("grpc://localhost:8001") == "localhost:8001"
    assert server_address("[::1]:8001") == "[::1]:8001"


def test_a_url_scheme_picks_the_protocol_and_a_contrary_one_is_refused():
    """``--url http://...`` sent gRPC to the HTTP port (the scheme was dropped, --protocol
    kept at its default): the scheme now says the protocol, and one contrary to
    ``--protocol`` is refused rather than one of them dropped."""
    import argparse

    from cli.main import _url
    from wsss.errors import UsageError

    args = argparse.Namespace(url="http://127.0.0.1:18000", protocol=None)
    assert _url(args) == "127.0.0.1:18000" and args.protocol == "http"
    args = argparse.Namespace(url="127.0.0.1:18001", protocol=None)
    assert _url(args) == "127.0.0.1:18001" and args.protocol == "grpc"
    args = argparse.Namespace(url="GRPC://127.0.0.1:18001", protocol="grpc")
    assert _url(args) == "127.0.0.1:18001" and args.protocol == "grpc"
    with pytest.raises(UsageError, match="says http:// and --protocol says grpc"):
        _url(argparse.Namespace(url="http://127.0.0.1:18000", protocol="grpc"))


def test_a_flag_the_command_does_not_take_is_said_by_that_command(capsys):
    """Said with the command's own usage and the flag it comes closest to (argparse said
    it with the top-level usage, the command's flags nowhere in it); status 2."""
    from cli.main import main

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--stagse", "classifier"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: wsss train ")
    assert "wsss train: error: unrecognized arguments: --stagse classifier" in err
    assert "(did you mean --stages?)" in err
    with pytest.raises(SystemExit):  # nothing close: no guess (it was `--out`, by the dashes)
        main(["data", "synth", "--bogus"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "did you mean" not in err
    with pytest.raises(SystemExit):  # a flag typed without its dashes
        main(["export", "check"])
    assert "(did you mean --check?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith("wsss ")


def test_a_sigterm_during_an_import_is_raised_after_it_not_lost(tmp_path, monkeypatch):
    """A C extension's import turns the exception a signal's handler raises into its
    ImportError, which a library's `try: import x / except ImportError` takes as "not
    installed" and goes on: a SIGTERM to `wsss bench` was once lost so. The handler waits
    for the import to end and raises after it."""
    import os
    import signal
    import threading
    import time

    from cli import main as cli

    (tmp_path / "slow_extension.py").write_text(
        "import time\n"
        "try:\n"
        "    time.sleep(1.0)\n"
        "except BaseException as exc:  # as a C extension's failed init comes back\n"
        "    raise ImportError('slow_extension failed to initialise') from exc\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = signal.signal(signal.SIGTERM, cli._terminate)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(cli._Terminated):
            try:
                import slow_extension  # noqa: F401
            except ImportError:
                pytest.fail("the SIGTERM came back as the import's ImportError")
            time.sleep(10)  # the library goes on: the signal is raised here
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, before)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        sys.modules.pop("slow_extension", None)


def test_a_signal_held_back_through_an_import_goes_to_the_handler_in_place_after_it(
    tmp_path, monkeypatch
):
    """Sent again, not raised by the timer itself: an export's commit that began meanwhile
    (its handler notes signals until its renames end) gets it as a note, not an exception
    in the middle of its renames; and nothing is left pending past main()."""
    import os
    import signal
    import threading

    from cli import main as cli

    got = []
    (tmp_path / "commit_begins.py").write_text(
        "import signal, time\n"
        "time.sleep(0.6)  # the SIGTERM lands here, in the import: held back\n"
        "import sys\n"
        f"got = sys.modules['{__name__}']._GOT\n"
        "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # a commit's recorder\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "_GOT", got, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = signal.signal(signal.SIGTERM, cli._terminate)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        import commit_begins  # noqa: F401

        for _ in range(100):
            if got:
                break
            threading.Event().wait(0.02)
        assert got == [signal.SIGTERM]
        cli._forget_pending()
        assert not cli._PENDING and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, before)
        cli._forget_pending()
        sys.modules.pop("commit_begins", None)


def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    import serving.infer
    from cli.main import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("2 of 3 images written to out; --resume carries on")

    monkeypatch.setattr(serving.infer, "run", interrupted)
    with pytest.raises(SystemExit) as stopped:
        main(["infer", str(tmp_path)])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert err == "wsss infer: interrupted: 2 of 3 images written to out; --resume carries on\n"

    def interrupted_import(*args, **kwargs):  # Ctrl-C inside onnxruntime's C import
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise ImportError("initialization of onnxruntime_pybind11_state raised") from exc

    monkeypatch.setattr(serving.infer, "run", interrupted_import)
    with pytest.raises(SystemExit) as stopped:
        main(["infer", str(tmp_path)])
    assert stopped.value.code == 130 and capsys.readouterr().err == "wsss infer: interrupted\n"

    def broken(*args, **kwargs):  # an ImportError of its own stays one, traceback and all
        raise ImportError("no module named onnxruntime")

    monkeypatch.setattr(serving.infer, "run", broken)
    with pytest.raises(ImportError, match="no module named"):
        main(["infer", str(tmp_path)])


def test_bench_and_soak_refuse_bad_flags_in_one_line_before_any_server(tmp_path):
    """Each said at once, in one line: nothing is exported, started or measured first."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.png").write_bytes(b"not pixels")
    cases = {
        ("bench", "--sweep"): "--sweep go with --report",
        ("bench", "--refiners", "--seconds", "2"): "--seconds go with --report",
        ("bench", "--images", str(tmp_path / "photos" / "*.jpg")): "no images in",
        ("bench", "--images", str(tmp_path / "nowhere")): "no such file or folder",
        ("bench", "--images", str(tmp_path / "photos")): "notes.png",  # a folder is walked
        ("bench", "--report", "--batches", "x"): "expected whole numbers like 4,8",
        ("soak", "--requests", "100"): "--requests (100) must be more than --warmup (2000",
        ("soak", "--concurrency", "0"): "at least 1: not 0",
        ("soak", "--images", str(tmp_path / "nowhere")): "no such folder, or no photos in it",
    }
    usage = {  # options that do not go together, or out of range: the usage, status 2
        ("bench", "--sweep"),
        ("bench", "--refiners", "--seconds", "2"),
        ("soak", "--requests", "100"),
        ("soak", "--concurrency", "0"),
    }
    for args, said in cases.items():
        proc = wsss(*args, check=False)
        assert proc.returncode != 0 and said in proc.stderr, (args, proc.stderr)
        if args in usage:
            assert proc.returncode == 2, (args, proc.stderr)
            assert proc.stderr.startswith(f"usage: wsss {args[0]} "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "exported" not in proc.stdout


def test_bench_reaches_the_ports_set_for_the_profile():
    """`--set serve.grpc_port=...` is where bench looks for the server, as serve binds it."""
    proc = wsss("bench", "--set", "serve.grpc_port=1", check=False)
    assert proc.returncode == 1 and "at 127.0.0.1:1 (grpc)" in proc.stderr
    proc = wsss("bench", "--protocol", "http", "--set", "serve.http_port=2", check=False)
    assert proc.returncode == 1 and "at 127.0.0.1:2 (http)" in proc.stderr


def test_sigterm_unwinds_a_command_that_owns_a_server(monkeypatch, capsys):
    """SIGTERM to `wsss bench --report` / soak / infer-bench unwinds as Ctrl-C does (their
    own tritonserver is stopped by the `with` it runs in), status 143; the handler goes."""
    import os
    import signal
    import time

    import benchmarks.soak
    from cli.main import main

    stopped = []

    def report(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, at once
        finally:
            stopped.append(True)  # as a `with TritonServer(...)` stops it

    monkeypatch.setattr(benchmarks.soak, "soak_report", report)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ended:
        main(["soak"])
    assert ended.value.code == 143 and stopped == [True]
    assert "wsss soak: terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_infer_prints_a_small_score_without_hiding_it():
    """A multi-label profile's thresholds can hold a class present at 0.0012: shown as it
    is, not as 0.00."""
    from cli.main import _score

    assert [_score(s) for s in (0.8013, 0.0123, 0.0099, 0.0012)] == [
        "0.80",
        "0.01",
        "0.0099",
        "0.0012",
    ]


def test_usage_errors_found_after_parsing_are_said_with_the_usage_and_status_2(capsys):
    """As argparse says its own: the command's usage line, `wsss <command>: error: ...`,
    status 2, before anything is read (study served's photos: a data root not there)."""
    from cli.main import main

    cases = {
        ("infer",): "wsss infer: error: name image files, folders or globs",
        ("infer", "a.jpg", "--retry-seconds", "nan"): "--retry-seconds is 0 or more, finite",
        ("infer", "a.jpg", "--concurrency", "0"): "--concurrency is the requests in flight",
        ("bench", "--batch", "0"): "wsss bench: error: batch 0: at least 1",
        (  # before the images are read (none there)
            "bench",
            "--url",
            "http://127.0.0.1:1",
            "--protocol",
            "grpc",
            "--images",
            "/nonexistent/photos",
        ): "says http:// and --protocol says grpc",
        (
            "study",
            "served",
            "--url",
            "http://127.0.0.1:1",
            "--protocol",
            "grpc",
            "--set",
            "data.root=/nonexistent/photos",
        ): "wsss study served: error: --url http://127.0.0.1:1 says http:// and --protocol",
    }
    for argv, said in cases.items():
        with pytest.raises(SystemExit) as stopped:
            main(list(argv))
        err = capsys.readouterr().err
        assert stopped.value.code == 2, (argv, err)
        assert err.startswith(f"usage: wsss {argv[0]} ") and said in err, (argv, err)
