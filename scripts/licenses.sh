#!/usr/bin/env bash
# Fails when a crate in the dependency graph (Cargo.lock) has a licence outside the
# allow-list below: permissive licences compatible with distributing Leasehold under
# Apache-2.0. An SPDX expression passes when one of its OR-alternatives has only
# allowed terms. (What `cargo deny check licenses` does; the advisory check of
# cargo-deny needs the RustSec database from GitHub, which these machines cannot reach.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c '
import json, re, sys

ALLOWED = {
    "MIT", "Apache-2.0", "Apache-2.0 WITH LLVM-exception", "BSD-2-Clause",
    "BSD-3-Clause", "ISC", "Zlib", "Unicode-3.0", "Unicode-DFS-2016", "BSL-1.0",
    "Unlicense", "CC0-1.0",
    # Community Data License Agreement (permissive, for data): the Mozilla root CA list in
    # webpki-roots, which the rustls support of ureq links (Leasehold trusts only the CAs it is
    # given; the list is never consulted).
    "CDLA-Permissive-2.0",
}

def tokens(expr):
    expr = expr.replace("/", " OR ")
    return re.findall(r"\(|\)|[A-Za-z0-9.+-]+(?: WITH [A-Za-z0-9.+-]+)?", expr)

def parse(ts):
    """expr := term (OR term)* ; term := atom (AND atom)* ; atom := ID | ( expr )"""
    def atom(i):
        if ts[i] == "(":
            v, i = expr(i + 1)
            return v, i + 1
        return ts[i] in ALLOWED, i + 1
    def term(i):
        v, i = atom(i)
        while i < len(ts) and ts[i] == "AND":
            w, i = atom(i + 1)
            v = v and w
        return v, i
    def expr(i):
        v, i = term(i)
        while i < len(ts) and ts[i] == "OR":
            w, i = term(i + 1)
            v = v or w
        return v, i
    return expr(0)[0]

meta = json.load(sys.stdin)
bad = []
for p in meta["packages"]:
    lic = p.get("license")
    if not lic or not parse(tokens(lic)):
        bad.append("%s %s: %s" % (p["name"], p["version"], lic or "no licence field"))
for b in sorted(set(bad)):
    print("licence not allowed:", b)
if bad:
    sys.exit(1)
print("licences: all %d crates use allowed licences" % len(meta["packages"]))
'
