# wsss: training, export and Triton serving in one image, for GPU servers.
#
# The image runs exactly what a clone runs: `make setup` installs the pinned environment
# (torch CUDA wheels, onnxruntime-gpu, and tritonserver 2.51.0 from the nvidia-pytriton wheel),
# and `make serve` builds the models if the mounted repository has none, then serves.
# BASE must be Debian 12 with Python 3.11 (pass --build-arg BASE=... for a local base image).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends make libgomp1 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/wsss
# Dependency files first, so code edits do not reinstall the environment.
COPY pyproject.toml constraints.txt Makefile README.md ./
COPY wsss/__init__.py wsss/__init__.py
COPY training/__init__.py training/__init__.py
COPY export/__init__.py export/__init__.py
COPY serving/__init__.py serving/__init__.py
RUN make setup PYTHON=python3.11
COPY . .
RUN .venv/bin/pip install --no-deps -e . && touch .venv/.installed

# Ports follow HTTP_PORT / GRPC_PORT / METRICS_PORT; the server binds 127.0.0.1 unless
# serve.host is set (run with --network host, or set serve.host=0.0.0.0 behind a firewall).
ENV HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002
EXPOSE 8000 8001 8002
VOLUME ["/opt/wsss/model_repository", "/opt/wsss/runs", "/opt/wsss/data"]
CMD ["make", "serve"]
