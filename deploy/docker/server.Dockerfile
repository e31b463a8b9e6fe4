# syntax=docker/dockerfile:1
#
# The sleap-rtc signaling server (`sleap-rtc-server`), on Debian bookworm-slim, as an unprivileged
# user. Build from the repository root (the context is the Cargo workspace; see .dockerignore):
#
#   docker build -f deploy/docker/server.Dockerfile -t sleap-rtc-server .
#   docker run -d --name sleap-rtc-server -p 8080:8080 -v sleap-rtc-data:/var/lib/sleap-rtc sleap-rtc-server
#
# Every flag has an environment variable (`sleap-rtc-server --help`); docs/deploying.md has the
# rest: TLS in front, several instances with Redis and DynamoDB, Kubernetes.

# The toolchain: the workspace needs Rust 1.88 or newer (the redis client).
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# Only the server crate: it does not compile the WebRTC stack. The registry and target caches
# make a rebuild after a source change incremental; the binary is copied out of the cache in
# the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build -p sleap-rtc-server --release --locked \
 && install -D -m 0755 target/release/sleap-rtc-server /out/sleap-rtc-server

FROM ${RUNTIME_IMAGE}
# CA roots: the DynamoDB store (HTTPS) and `rediss://` verify their peers against them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sleap-rtc \
 && useradd --system --uid 10001 --gid sleap-rtc --home-dir /var/lib/sleap-rtc --shell /usr/sbin/nologin sleap-rtc \
 && install -d -o sleap-rtc -g sleap-rtc -m 0750 /var/lib/sleap-rtc
COPY --from=builder /out/sleap-rtc-server /usr/local/bin/sleap-rtc-server

# The embedded database (sleap-rtc.sqlite) and the JWT signing key (jwt-ed25519.pem, made on
# first start unless SLEAP_RTC_JWT_KEY_FILE names one) live in the data volume: keep it.
ENV SLEAP_RTC_LISTEN=0.0.0.0:8080 \
    SLEAP_RTC_DATA_DIR=/var/lib/sleap-rtc
VOLUME ["/var/lib/sleap-rtc"]
WORKDIR /var/lib/sleap-rtc
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080
# The image has no curl: the binary probes itself (GET /health on the first SLEAP_RTC_LISTEN
# address, loopback for 0.0.0.0; exit 0 on 200, 1 otherwise).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["sleap-rtc-server", "--health-check"]
# SIGTERM drains connections (SLEAP_RTC_SHUTDOWN_GRACE_SECS, 10 s by default) before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sleap-rtc-server"]
