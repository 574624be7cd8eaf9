# The project's image for Kubeflow pipeline tasks (`embbench run-cell`, `embbench report`).
#   CUDA (default): docker build -t REGISTRY/embbench:0.1.0-cuda .
#   CPU:            docker build --build-arg VARIANT=cpu -t REGISTRY/embbench:0.1.0-cpu .
# torch's PyPI wheel for Linux is the CUDA build (it bundles the CUDA runtime; the node only needs
# the NVIDIA driver and device plugin); VARIANT=cpu installs the CPU wheel first, which
# satisfies the same pins (2.14.1+cpu == 2.14.1), and the image is ~4 GB smaller.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# MALLOC_*, OMP_WAIT_POLICY: glibc's allocator and libgomp's settings for every process of the
# task (embbench/_malloc.py).

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0 \
    EMBBENCH_ROOT=/app \
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=536870912 \
    OMP_WAIT_POLICY=PASSIVE
WORKDIR /app

RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install --index-url "$TORCH_CPU_INDEX" torch==2.14.1 torchvision==0.29.1; \
    elif [ "$VARIANT" != "cuda" ]; then echo "VARIANT must be cpu or cuda" >&2; exit 1; fi

# Dependencies first (cached while only the code changes), then the package itself.
COPY pyproject.toml README.md ./
COPY embbench ./embbench
RUN pip install ".[pipeline,ray]"
# notebooks/ (05 renders the report) and params/ (datasets.yaml, defaults) are read at run time
# from EMBBENCH_ROOT; data, caches and runs live on the pipeline's volume (EMBBENCH_DATA ...).
COPY notebooks ./notebooks
COPY params ./params
RUN python -m ipykernel install --sys-prefix --name embbench --display-name "Python (embbench)" \
    && python -c "import embbench, kfp, torch; print('embbench image ok, torch', torch.__version__)"

ENTRYPOINT []
CMD ["embbench", "--help"]
