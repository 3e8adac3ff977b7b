"""The container files, checked without an engine: hadolint on the Dockerfile, `docker compose
config` on every compose file and profile, the Kubernetes manifests against Kubernetes'
schemas, and the serve-gpu stage (its base image cannot be pulled here) against what the
served repository and the bundled server need: its entrypoint, run with a stand-in
tritonserver, binds loopback and restricts the admin APIs as `wsss serve` does, and the
bundled binary takes the last of a repeated address, as compose and the manifests rely on.
The tools come with the test extra."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpc
import yaml

import serving.server as triton
from serving.server import ADMIN_KEY_ENV, restriction_flags
from tests.conftest import ROOT
from tests.serving.conftest import echo_repository
from wsss.config import ServeConfig

COMPOSE_CPU = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
# serve-gpu's health check: serving/health.py, copied alone into the image.
GPU_HEALTH = "/opt/wsss/health.py"
# The Python-backend regions `wsss serve` takes where /dev/shm is large.
SHM_FLAGS = (
    "--backend-config=python,shm-default-byte-size=16777216",
    "--backend-config=python,shm-growth-byte-size=16777216",
)
# The NGC release of the tritonserver in each nvidia-pytriton wheel (2.51.0 in 0.7.0).
NGC_RELEASE = {"0.7.0": "24.10"}


def tool(name: str) -> str:
    """The tool from this environment's bin (the test extra installs it there), else PATH."""
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "WSSS_"))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_hadolint_passes_the_dockerfile():
    run(tool("hadolint"), "--no-color", "Dockerfile")


def _kept_by_dockerignore(path: str, patterns: list[str]) -> bool:
    """Whether the build context holds ``path``: the last of ``.dockerignore``'s patterns
    that matches it or a folder above it decides (``!`` keeps), as Docker reads the file."""
    parts = path.strip("/").split("/")
    kept = True
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if (
                pattern == "**"
                or fnmatch.fnmatchcase(prefix, pattern)
                or (
                    pattern.startswith("**/") and fnmatch.fnmatchcase(parts[depth - 1], pattern[3:])
                )
            ):
                kept = keep
                break
    return kept


def test_every_copy_source_is_in_the_build_context():
    """A COPY of a folder .dockerignore leaves out fails the build (experiments/ did, in the
    train image, which image-gpu builds too); the docker test builds serve-cpu only."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert len(sources) > 10
    missing = [s for s in sources if not _kept_by_dockerignore(s, patterns)]
    assert not missing, f"COPY sources .dockerignore leaves out: {missing}"
    assert not _kept_by_dockerignore("runs/quick/best.pt", patterns)  # the check can fail
    assert not _kept_by_dockerignore("wsss/__pycache__/x.pyc", patterns)


@pytest.mark.parametrize("files", [[], COMPOSE_CPU], ids=["gpu", "cpu"])
def test_compose_files_are_valid_and_bind_loopback(files):
    compose = tool("docker-compose")
    profiles = ["--profile", "retrain", "--profile", "bench"]
    config = json.loads(run(compose, *files, *profiles, "config", "--format", "json").stdout)
    services = config["services"]
    assert set(services) == {"triton", "trainer", "bench"}
    triton = services["triton"]
    assert triton["network_mode"] == "host" and triton["healthcheck"]["test"]
    assert {v["target"] for v in triton["volumes"]} == {"/var/lib/wsss"}
    trainer = services["trainer"]
    if files:  # the CPU variant: serve-cpu, no GPU asked for, `wsss serve` on loopback
        assert triton["image"].endswith(":serve-cpu") and "deploy" not in triton
        assert "deploy" not in trainer
        assert triton["command"] == ["--set", "serve.host=127.0.0.1"]
    else:
        assert triton["image"].endswith(":serve-gpu")
        for service in (triton, trainer):  # the trainer too: torch uses a GPU it sees
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia"
        for flag in ("http", "grpc", "metrics"):
            assert f"--{flag}-address=127.0.0.1" in triton["command"]
        assert set(SHM_FLAGS) <= set(triton["command"])
        # no watchdog in serve-gpu: the check infers, which a dead stub fails
        assert triton["healthcheck"]["test"][1:4] == ["python3", GPU_HEALTH, "--infer"]
    # Passed on to tritonserver's restriction (serve-gpu) or `wsss serve` (serve-cpu): empty,
    # as here, each draws a random key.
    assert triton["environment"][ADMIN_KEY_ENV] == ""
    # The trainer writes into the repository triton serves: the same folder, mounted whole
    # so that an export's staging folder and the repository share a filesystem.
    assert [v["source"] for v in services["trainer"]["volumes"]] == [
        v["source"] for v in triton["volumes"]
    ]
    assert services["bench"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_kubernetes_manifests_match_the_schemas():
    manifests = sorted(str(p) for p in (ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    assert manifests
    run(tool("kubernetes-validate"), "--strict", "--quiet", *manifests)


def _entrypoint(stage: str) -> list[str]:
    """The exec-form ENTRYPOINT of a stage, as Docker reads it (a JSON array, or it would
    silently run it through a shell)."""
    (text,) = re.findall(r"^ENTRYPOINT (\[.*?\])$", stage.replace("\\\n", ""), re.M | re.S)
    return json.loads(text)


def _run_entrypoint(tmp_path, *args: str, key: str | None = None):
    """serve-gpu's entrypoint after NGC's (which execs it), with a stand-in tritonserver
    that prints its arguments, one a line."""
    argv = _entrypoint(_stage("serve-gpu"))
    assert argv[0] == "/opt/nvidia/nvidia_entrypoint.sh"
    fake = tmp_path / "tritonserver"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin"}
    if key is not None:
        env[ADMIN_KEY_ENV] = key
    return subprocess.run([*argv[1:], *args], env=env, capture_output=True, text=True, timeout=30)


def _last(flags: list[str], name: str) -> str:
    """The value tritonserver takes for a repeated flag: the last (checked on the binary)."""
    return [f.split("=", 1)[1] for f in flags if f.startswith(f"{name}=")][-1]


def test_serve_gpu_binds_loopback_unless_an_appended_flag_says_otherwise(tmp_path):
    done = _run_entrypoint(tmp_path)
    assert done.returncode == 0, done.stderr
    flags = done.stdout.splitlines()
    for name in ("--http-address", "--grpc-address", "--metrics-address"):
        assert _last(flags, name) == "127.0.0.1"
    flags = _run_entrypoint(tmp_path, "--http-address=0.0.0.0").stdout.splitlines()
    assert _last(flags, "--http-address") == "0.0.0.0"
    assert _last(flags, "--grpc-address") == "127.0.0.1"
    assert "--model-repository=/var/lib/wsss/model_repository" in flags


def test_serve_gpu_restricts_the_apis_as_wsss_serve_does(tmp_path):
    """To WSSS_ADMIN_KEY where set, else to a new random key; a weak key stops it."""
    key = "operator-key-0123456789"
    flags = _run_entrypoint(tmp_path, key=key).stdout.splitlines()
    assert flags[:2] == restriction_flags(key)
    drawn = []
    for unset in (None, ""):  # compose passes an unset WSSS_ADMIN_KEY on as empty
        flags = _run_entrypoint(tmp_path, key=unset).stdout.splitlines()
        drawn.append(flags[0].rsplit("=", 1)[1])
        assert flags[:2] == restriction_flags(drawn[-1])
    assert drawn[0] != drawn[1] and all(re.fullmatch(r"[0-9a-f]{64}", k) for k in drawn)
    for bad in ("short", "a key with spaces", "with:colon=0123456789"):
        done = _run_entrypoint(tmp_path, key=bad)
        assert done.returncode == 2 and ADMIN_KEY_ENV in done.stderr and not done.stdout


@pytest.mark.triton
def test_tritonserver_takes_the_last_of_a_repeated_address(monkeypatch, tmp_path):
    """What the serve-gpu image, compose and the manifests rely on: an appended address
    replaces the image's. The first given here is one no host has (TEST-NET-1): were it
    taken, the server could not listen."""
    plain = triton.server_command
    nowhere = [f"--{api}-address=192.0.2.1" for api in ("http", "grpc", "metrics")]

    def first_nowhere(*args, **kwargs) -> list[str]:
        binary, *flags = plain(*args, **kwargs)
        return [binary, *nowhere, *flags]

    monkeypatch.setattr(triton, "server_command", first_nowhere)
    serve = triton.on_free_ports(ServeConfig())
    repo = echo_repository(tmp_path / "repo")
    with triton.TritonServer(repo, serve, tmp_path / "server") as server:  # ready over HTTP
        client = grpc.InferenceServerClient(server.grpc_url)
        assert client.is_server_live()
        client.close()
        metrics = f"http://{serve.host}:{serve.metrics_port}/metrics"
        assert urllib.request.urlopen(metrics, timeout=10).status == 200


def test_kubernetes_pods_bind_every_address_and_take_the_key_from_a_secret():
    """The kubelet's probes and the Service reach the pod's own IP, not its loopback."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "serve.yaml").read_text())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for name in ("--http-address", "--grpc-address", "--metrics-address"):
        assert _last(container["args"], name) == "0.0.0.0"
    env = {e["name"]: e for e in container["env"]}
    secret = env[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert secret["optional"] is True  # without the Secret: a random key, the APIs closed
    assert set(SHM_FLAGS) <= set(container["args"])  # the pod's /dev/shm is large
    # a dead stub leaves the model READY: liveness infers, and the kubelet restarts it
    assert container["livenessProbe"]["exec"]["command"][:3] == ["python3", GPU_HEALTH, "--infer"]


def _stage(name: str) -> str:
    """The text of one stage of the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.S | re.M)
    assert match, name
    return match.group(0)


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {n.lower(): v for n, _, v in (line.partition("==") for line in lines if "==" in line)}


def test_serve_gpu_stage_is_the_bundled_servers_release():
    """Checked statically: nvcr.io cannot be reached here."""
    text = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG GPU_BASE_IMAGE=(\S+)$", text, re.M)
    release = NGC_RELEASE[_pins()["nvidia-pytriton"]]
    assert base == f"nvcr.io/nvidia/tritonserver:{release}-py3"
    stage = _stage("serve-gpu")
    assert stage.startswith("FROM ${GPU_BASE_IMAGE} AS serve-gpu")
    assert "--model-repository=/var/lib/wsss/model_repository" in stage
    assert "--model-control-mode=poll" in stage and "HEALTHCHECK" in stage
    assert re.search(r"^USER 1000$", stage, re.M)  # triton-server, not root
    assert f"COPY serving/health.py {GPU_HEALTH}" in stage
    assert f'CMD ["python3", "{GPU_HEALTH}", "--infer"' in stage
    # the last stage: the legacy builder builds every stage before its target
    assert text.rstrip().endswith(stage.rstrip())


def _served_imports() -> set[str]:
    """Top-level modules the repository's Python models import, past the standard library."""
    found = set()
    for path in (ROOT / "wsss" / "served").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"__future__", "triton_python_backend_utils"}


@pytest.mark.parametrize("requirements", ["serve-requirements.txt", "gpu-requirements.txt"])
def test_images_install_what_the_served_models_import(requirements):
    packages = {"numpy": "numpy", "cv2": "opencv-python-headless", "PIL": "pillow"}
    packages["onnxruntime"] = "onnxruntime"
    assert _served_imports() <= set(packages)
    lines = (ROOT / "docker" / requirements).read_text().splitlines()
    listed = {
        re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower(): line
        for line in (raw.split("#")[0].strip() for raw in lines)
        if line
    }
    for module in _served_imports():
        assert packages[module] in listed, f"{requirements} lacks {packages[module]}"
    # numpy < 2 (Triton 24.10's Python backend returns empty outputs with numpy 2), and the
    # project's own OpenCV pin, which is the newest that accepts numpy 1.26.
    pins = _pins()
    if "==" in listed["numpy"]:
        assert listed["numpy"].endswith(f"=={pins['numpy']}")
    else:
        assert "<2" in listed["numpy"]
    if "==" in listed["opencv-python-headless"]:
        assert listed["opencv-python-headless"].endswith(pins["opencv-python-headless"])
    # The serve-cpu image takes the CPU build of the project's ONNX Runtime release.
    if requirements == "serve-requirements.txt":
        assert listed["onnxruntime"] == f"onnxruntime=={pins['onnxruntime-gpu']}"
        assert "torch" not in listed


def test_the_health_check_stands_alone_and_asks_what_the_repository_serves():
    """serve-gpu copies serving/health.py alone into an image without the project: standard
    library only, and the names it sends are the served ones."""
    from serving import health
    from wsss.tensors import ENCODED_IMAGE, PIPELINE_BYTES, SCORES

    tree = ast.parse((ROOT / "serving" / "health.py").read_text())
    imported = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported
    assert (health.INFER_MODEL, health.INFER_INPUT, health.INFER_OUTPUT) == (
        PIPELINE_BYTES,
        ENCODED_IMAGE.name,
        SCORES,
    )
    from wsss.served.images import decode_image

    assert decode_image(health.tiny_png()).shape == (32, 32, 3)  # a PNG the server reads


def _retrain_scripts() -> dict[str, str]:
    """The shell scripts the retrain job runs, as the shell gets them."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    job = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "retrain-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return {
        "compose": compose["services"]["trainer"]["command"][0].replace("$$", "$"),
        "kubernetes": container["args"][0],
    }


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_the_retrain_shell_passes_sigterm_on_to_the_step_it_runs(where, sig, tmp_path):
    """`docker stop` / the kubelet SIGTERM the shell (PID 1 there); it ran each step in the
    foreground and never passed it on, so the export was killed at the grace period's end
    and left its staging folder. A Ctrl-C of `docker compose run` (SIGINT, which a step
    run in the background ignores) is passed on as SIGTERM. A stand-in `python` notes the
    signal it gets."""
    from tests.conftest import wait_for

    stand_in = tmp_path / "bin" / "python"
    stand_in.parent.mkdir()
    stand_in.write_text(  # its trap set before it says it started
        "#!/bin/sh\n"
        f"trap 'echo term >> {tmp_path}/got; exit 143' TERM\n"
        f'echo "$*" >> {tmp_path}/started\n'
        "while :; do sleep 0.05; done\n"
    )
    stand_in.chmod(0o755)
    env = os.environ | {"PATH": f"{stand_in.parent}:{os.environ['PATH']}", "WSSS_CONFIG": "c"}
    # The shell starts as a container's PID 1 does, with every signal at its default: a
    # suite run in the background (`make test &`, a CI runner's job) has SIGINT ignored, a
    # non-interactive shell cannot trap a signal ignored on entry, and the Ctrl-C case
    # failed there, not in a container.
    # (A handler set here for the Popen: exec resets it to the default in the child, and
    # no preexec_fn runs in the forked child of a threaded process.)
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        shell = subprocess.Popen(["/bin/sh", "-ec", _retrain_scripts()[where]], env=env)
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        wait_for(lambda: (tmp_path / "started").exists(), 30, "the first step to start")
        shell.send_signal(sig)
        assert shell.wait(timeout=30) == 143  # stopped there: no later step runs
    finally:
        shell.kill()
    assert (tmp_path / "got").read_text() == "term\n"
    assert (tmp_path / "started").read_text() == "-m wsss data synth --config c --if-missing\n"


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_the_retrain_shell_runs_its_steps_in_turn_and_stops_at_a_failure(where, tmp_path):
    stand_in = tmp_path / "bin" / "python"
    stand_in.parent.mkdir()
    stand_in.write_text(  # the export step fails with status 3
        f'#!/bin/sh\necho "$3 $*" >> {tmp_path}/steps\n[ "$3" = export ] && exit 3\nexit 0\n'
    )
    stand_in.chmod(0o755)
    (tmp_path / "a.yaml").write_text("")  # a file a glob in the options would match
    env = os.environ | {"PATH": f"{stand_in.parent}:{os.environ['PATH']}", "WSSS_CONFIG": "c"}
    env["WSSS_TRAIN_ARGS"] = "--set x=1 *.yaml"
    script = _retrain_scripts()[where]
    run = subprocess.run(["/bin/sh", "-ec", script], env=env, timeout=30, cwd=tmp_path)
    assert run.returncode == 3
    steps = (tmp_path / "steps").read_text().splitlines()
    assert [s.split()[0] for s in steps] == ["data", "train", "export"]
    if where == "compose":  # its options reach the steps as typed, not globbed
        assert steps[1].endswith("--set x=1 *.yaml")
