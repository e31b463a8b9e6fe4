# syntax=docker/dockerfile:1
#
# A sleap-rtc GPU worker: the `sleap-rtc` binary on an image that has CUDA and sleap-nn
# (upstream's ghcr.io/talmolab/sleap-nn-cuda by default). Build from the repository root:
#
#   docker build -f deploy/docker/worker.Dockerfile -t sleap-rtc-worker .
#   docker run -d --gpus all --name sleap-rtc-worker \
#     -e SLEAP_RTC_SERVER=https://rtc.example.org -e SLEAP_RTC_TOKEN=slp_... \
#     -v /nas/lab:/data/lab:ro -e SLEAP_RTC_MOUNTS=/data/lab \
#     -v sleap-rtc-work:/var/lib/sleap-rtc sleap-rtc-worker
#
# Configuration is all environment: SLEAP_RTC_SERVER, SLEAP_RTC_TOKEN (a worker token names its
# room; SLEAP_RTC_ROOM otherwise), SLEAP_RTC_MOUNTS (directories jobs may name by absolute path,
# colon-separated like PATH), SLEAP_RTC_WORK_DIR, SLEAP_NN, SLEAP_RTC_REGISTRY. Arguments after
# the image name go to `sleap-rtc worker` (e.g. `--name gpu-3 --device cuda:0`).

# The base is upstream's moving tag by default (the one documented exception to pinned tags):
# pin a digest or a dated tag for production with --build-arg SLEAP_NN_IMAGE=...
ARG SLEAP_NN_IMAGE=ghcr.io/talmolab/sleap-nn-cuda:latest
# The toolchain. The binary links the builder's glibc (2.36 on bookworm): for a base with an
# older glibc, build on an older Debian (e.g. --build-arg RUST_IMAGE=docker.io/library/rust:1.95-slim-bullseye).
# The `sleap-rtc --version` step below fails the build, rather than the first job, on a mismatch.
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build -p sleap-rtc --release --locked \
 && install -D -m 0755 target/release/sleap-rtc /out/sleap-rtc

FROM ${SLEAP_NN_IMAGE}
# The base may leave a non-root user set: creating ours needs root.
USER 0:0
RUN groupadd --system --gid 10001 sleap-rtc \
 && useradd --system --uid 10001 --gid sleap-rtc --home-dir /var/lib/sleap-rtc --shell /usr/sbin/nologin sleap-rtc \
 && install -d -o sleap-rtc -g sleap-rtc -m 0750 /var/lib/sleap-rtc /var/lib/sleap-rtc/work \
 && install -d -m 0755 /data
COPY --from=builder /out/sleap-rtc /usr/local/bin/sleap-rtc
# The binary must run on this base (its glibc): checked at build time.
RUN ["sleap-rtc", "--version"]

# The work dir holds each job's uploads and results, the upload cache and the model cache: put
# it on a volume (a PVC on Kubernetes). HOME is there too, for sleap-nn's and torch's caches.
# /data is the default mount point for datasets (read-only bind mounts); list every directory
# jobs may read in SLEAP_RTC_MOUNTS.
ENV HOME=/var/lib/sleap-rtc \
    SLEAP_RTC_WORK_DIR=/var/lib/sleap-rtc/work \
    SLEAP_RTC_MOUNTS=/data \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/var/lib/sleap-rtc"]
WORKDIR /var/lib/sleap-rtc
USER 10001:10001
# A worker listens on nothing: it dials the signaling server, and its WebRTC connections are
# outbound UDP (with STUN, or TURN when that lands). No EXPOSE.
ENTRYPOINT ["sleap-rtc", "worker"]
# The base image's CMD would otherwise become arguments of `sleap-rtc worker`.
CMD []
