# train-llama: the whole pipeline (checks, preparation, DeepSpeed training, publishing) in one image.
#   docker build -t train-llama .
#   docker run --gpus all --shm-size=8g -v "$PWD/data-volume:/data" -e OUTPUT_REPO=me/my-llama -e HF_TOKEN train-llama
# Configuration is environment variables only (README.md); models and checkpoints go to /data.

# The devel image brings nvcc: DeepSpeed builds its CUDA ops (e.g. FusedAdam) just in time, and
# refuses to when nvcc's CUDA major version differs from PyTorch's, hence PyTorch's cu130 wheels below.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive

# Python 3.12 (Ubuntu 24.04's), with headers for the just-in-time builds of DeepSpeed's ops.
# Package versions float with Ubuntu's security updates, as in the base image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Hugging Face Spaces run containers as uid 1000; Ubuntu 24.04 images already name that uid `ubuntu`.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --shell /bin/bash user \
 && mkdir -p /opt/venv /data/output /data/work \
 && chown -R 1000:1000 /opt/venv /data

USER 1000
# TOKENIZERS_PARALLELISM is no secret (the linter matches "TOKEN"); HF_TOKEN is passed at run time only.
# hadolint ignore=DL3064
ENV HOME=/home/user \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/home/user/.cache \
    HF_HOME=/home/user/.cache/huggingface \
    TRITON_CACHE_DIR=/home/user/.cache/triton \
    TORCH_EXTENSIONS_DIR=/home/user/.cache/torch_extensions \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_NVLS_ENABLE=0 \
    OUTPUT_DIR=/data/output \
    WORK_DIR=/data/work

WORKDIR /home/user/app

# The same dependency files as the README's set-up: requirements.txt within constraints.txt.
# PyTorch goes first because DeepSpeed's source build imports it (hence --no-build-isolation, which
# in turn needs setuptools and wheel in the environment).
COPY --chown=1000:1000 requirements.txt constraints.txt ./
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0 \
 && pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" -c constraints.txt torch \
 && pip install --no-cache-dir --no-build-isolation --extra-index-url "$TORCH_INDEX_URL" \
        -r requirements.txt -c constraints.txt

# Everything trainer.sh runs: the stage scripts, their modules and the embedded demo corpora.
COPY --chown=1000:1000 *.py trainer.sh ./
COPY --chown=1000:1000 data/ ./data/

# Models, the run state and checkpoints outlive the container (a Space's persistent storage is /data).
VOLUME ["/data"]

CMD ["bash", "trainer.sh"]
