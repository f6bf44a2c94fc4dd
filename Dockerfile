# herald's container image: a release build in a Rust image, then only the binary on distroless/cc (glibc,
# libgcc_s, CA certificates; no shell, no package manager), running as the image's non-root user (65532).
#
#   make image                      # docker build -t herald:<version> .  (DOCKER=podman make image works too)
#
# Runtime requirements, kept explicit because no container runtime runs where herald is tested:
# - Shared libraries (`ldd target/release/herald`): libc.so.6, libm.so.6, libgcc_s.so.1 and the dynamic loader,
#   nothing else (no OpenSSL: herald speaks plain TCP; TLS ends at the ingress or load balancer).
# - glibc 2.34 or newer (the newest symbol version the binary uses); distroless/cc-debian12 has 2.36. The build
#   stage is Debian 12 as well, so the binary can never need a newer glibc than the runtime image has.
# - Writes nothing but a registry member's --data-dir, and `herald dev`'s temporary directory under $TMPDIR: the
#   root filesystem can be read-only (the Helm chart mounts the data volume at /data and an emptyDir at /tmp).
# - No shell: probes are HTTP (/livez, /readyz), the preStop pause is Kubernetes' sleep action, and `helm test`
#   runs `herald ctl round-trip` from this same image.
# tests/runtime.rs checks the libraries, the glibc version, the non-root user and the read-only root with the
# real binary.

# The toolchain must be at least what the locked dependencies ask for (`rust-version` in Cargo.lock's crates).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald \
    && install -D -m 0755 target/release/herald /out/herald

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/herald /usr/local/bin/herald
USER 65532:65532
# 7070 WebSocket + HTTP, 7071 gRPC publish, 7072 edge-to-edge, 7081 registry (raft), 7082 registry metrics/health.
EXPOSE 7070 7071 7072 7081 7082
ENTRYPOINT ["/usr/local/bin/herald"]
CMD ["dev", "--host", "0.0.0.0"]
