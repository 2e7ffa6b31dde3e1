#!/usr/bin/env bash
# Runs every Go fuzz target of the repository for a short time each
# (FUZZTIME, default 3s): CI's check that no decoder of outside input
# crashes on what the fuzzer finds quickly. The seed corpora (f.Add and
# testdata/fuzz) run in every plain `go test` as well.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime="${FUZZTIME:-3s}"
n=0
while IFS=: read -r file _ line; do
  name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*).*/\1/' <<<"$line")
  pkg="./$(dirname "$file")"
  echo "fuzz: $pkg $name ($fuzztime)"
  go test -run='^$' -fuzz="^${name}\$" -fuzztime="$fuzztime" -fuzzminimizetime=0 "$pkg" >/tmp/edgefleet-fuzz.log 2>&1 || {
    cat /tmp/edgefleet-fuzz.log
    echo "fuzz: $name in $pkg failed; the crashing input is under $pkg/testdata/fuzz/$name" >&2
    exit 1
  }
  n=$((n + 1))
done < <(grep -rn --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]*\(' . | sort)
echo "fuzz: $n targets ran for $fuzztime each, no crash"
