# llm-extproc images. Two targets:
#   service (default): the ext_proc service only, slim, non-root.
#   demo: adds the demo's offline OCR aux vision model and the backend emulators' needs.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim AS service
RUN useradd --create-home --uid 10001 extproc
COPY --from=build /install /usr/local
COPY config/compose.yaml /etc/llm-extproc/config.yaml
USER extproc
EXPOSE 50051 9464
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=5 \
    CMD ["extproc", "health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/llm-extproc/config.yaml"]

FROM service AS demo
USER root
# OpenCV (pulled in by rapidocr-onnxruntime) needs these shared libraries.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install --no-cache-dir "/src[vision-demo]" && rm -rf /src
USER extproc
