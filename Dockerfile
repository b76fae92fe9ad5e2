# The image the Helm chart runs: `leasehold` on a small non-root runtime.
# Build: docker build -t leasehold/leasehold:0.1.0 .

FROM rust:1.85-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin leasehold \
 && cp target/release/leasehold /leasehold \
 && strip /leasehold

# glibc + libgcc, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /leasehold /usr/local/bin/leasehold
USER 65532:65532
EXPOSE 7070 7071 7072
ENTRYPOINT ["/usr/local/bin/leasehold"]
CMD ["serve"]
