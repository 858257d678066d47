# infernode: the node and its CLI. Models are mounted at /models; data lives in /data.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY actors ./actors
COPY node ./node
RUN pip install . && useradd --create-home --uid 1000 infernode && mkdir -p /data /models \
    && chown infernode /data
USER 1000
VOLUME ["/data"]
EXPOSE 9464 8000
ENTRYPOINT []
CMD ["infernode", "up", "--data-dir", "/data"]
