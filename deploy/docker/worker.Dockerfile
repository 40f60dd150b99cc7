# The image of the Kubernetes GPU worker and UI app (deploy/kubernetes). Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t ghcr.io/crafterse/imagegen-worker:0.9.0 .
# Versions are pinned: the base image by tag (pin its digest at release), Python packages by
# requirements.txt. torch 2.13.0 from PyPI is the CUDA build on Linux x86_64 (its CUDA libraries come
# as nvidia-* wheels), so the image needs no CUDA base; the node's driver is mounted by the NVIDIA
# container runtime.
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    GRADIO_TEMP_DIR=/tmp/gradio \
    HF_HOME=/models/hf \
    GRADIO_ANALYTICS_ENABLED=False

WORKDIR /app
COPY requirements.txt .
RUN pip install torch==2.13.0 && pip install -r requirements.txt

COPY app.py ./
COPY inference/ inference/
COPY queueing/ queueing/
COPY storage/ storage/
COPY deploy/fetch_weights.py deploy/fetch_weights.py
# Gradio writes a type stub next to app.py when app.RawNumber is defined: write it now, because the
# pods run with a read-only root filesystem.
RUN python -c "import app" && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin imagegen

USER 10001
EXPOSE 7860 8080
CMD ["python", "app.py", "--worker"]
