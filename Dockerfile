# herald's container image: a release build in a Rust image, then only the binary on distroless/cc (glibc,
# libgcc_s, CA certificates; no shell, no package manager), running as the image's non-root user (65532).
#
# The binary links only glibc and libgcc_s (see `ldd target/release/herald`): libc.so.6, libm.so.6,
# libgcc_s.so.1 and the dynamic loader. It writes nothing but a registry member's --data-dir (and `herald dev`'s
# temporary directory under $TMPDIR), so it runs with a read-only root filesystem; tests/runtime.rs checks that.
#
#   make image            # docker build -t herald:<version> .

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald \
    && install -D -m 0755 target/release/herald /out/herald

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/herald /usr/local/bin/herald
USER 65532:65532
EXPOSE 7070 7071 7072 7081 7082
ENTRYPOINT ["/usr/local/bin/herald"]
CMD ["dev", "--host", "0.0.0.0"]
