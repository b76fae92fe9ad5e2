#!/usr/bin/env bash
# Installs what building and testing Leasehold needs, once: Debian's etcd-server (the
# real etcd the tests and `make run` start) and protobuf-compiler (protoc, used at build
# time). Idempotent: does nothing when both are present.
set -euo pipefail

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing ${need[*]} with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# etcd-server's package starts a system etcd on 2379; ours run on their own ports, so
# that one is harmless, but stop it where we can to keep the machine quiet.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd 2>/dev/null || true
fi
