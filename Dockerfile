FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
COPY providers ./providers
COPY migrations ./migrations
RUN pip install '.[all]' && useradd --create-home --uid 10001 gpufleet
USER gpufleet
ENV GPUFLEET_DATA_DIR=/home/gpufleet/data
EXPOSE 8000
CMD ["gpufleet", "api", "--host", "0.0.0.0", "--port", "8000"]
