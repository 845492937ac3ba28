# xdpwatch: one image for the producer and the consumers; the entrypoint is the xdpwatch CLI.
# bcc compiles the XDP program when the producer starts, against the host kernel's headers:
# mount /lib/modules and /usr/src from the host (see docker-compose.yml).
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip python3-bpfcc libbpfcc libbpf1 bpfcc-tools \
      iproute2 zstd ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A venv that sees Debian's bcc module (it is not on PyPI), with exactly the packages of
# requirements-image.lock (`make lock`): sha256 checked, wheels only. Then xdpwatch itself,
# resolving nothing, built by the locked setuptools.
RUN python3 -m venv --system-site-packages /opt/xdpwatch
WORKDIR /opt/xdpwatch/src
COPY requirements-image.lock ./
RUN /opt/xdpwatch/bin/pip install --no-cache-dir --require-hashes --only-binary :all: -r requirements-image.lock
COPY pyproject.toml README.md ./
COPY xdpwatch xdpwatch
COPY producer producer
COPY consumers consumers
COPY kafka kafka
COPY schemas schemas
COPY bpf bpf
RUN /opt/xdpwatch/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
 && /opt/xdpwatch/bin/xdpwatch --version

# The consumers run as this user (fixed uid: volumes and host files can be given to it).
# The archive directory is its own, mode 0700, as `xdpwatch archive` requires; a named
# volume mounted there starts as a copy of it. The producer needs capabilities that only
# root can hold in a container: docker-compose.yml runs it as root with nothing else.
RUN groupadd --system --gid 10001 xdpwatch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/xdpwatch --no-create-home \
      --shell /usr/sbin/nologin xdpwatch \
 && install -d -m 0755 /var/lib/xdpwatch \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/xdpwatch/archive

ENV PATH=/opt/xdpwatch/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Prometheus metrics (--metrics-port) of whichever command runs.
EXPOSE 9464
WORKDIR /var/lib/xdpwatch
USER 10001:10001
ENTRYPOINT ["xdpwatch"]
CMD ["--help"]
