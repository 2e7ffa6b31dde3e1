#!/usr/bin/env bash
# Runs every Go fuzz target of the repository briefly: CI's check that no
# decoder of outside input crashes on what the fuzzer finds quickly. The
# seed corpora (f.Add and testdata/fuzz) run in every plain `go test` as
# well.
#
# FUZZTIME is each target's budget: a duration (3s, the default for
# `make fuzz`) or an execution count (2000x, what `make fuzz-ci` uses). CI
# uses counts because a duration budget races Go's fuzz coordinator
# (go.dev/issue/75804, not fixed in Go 1.26): when the deadline fires while
# a worker is busy, which a loaded machine makes likely, the target fails
# with "context deadline exceeded" and no crashing input. A count has no
# deadline to race. FUZZPKG, if set, limits the run to packages whose path
# contains it.
#
# Each package's test binary is built once, instrumented for fuzzing
# (`go test -c -fuzz=.`), and run once per target from the package's
# directory, where a crashing input is written (testdata/fuzz/FuzzName).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
fuzztime="${FUZZTIME:-3s}"
work="$(mktemp -d -t edgefleet-fuzz.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cache="$(go env GOCACHE)/fuzz"
n=0
start=$SECONDS
built=""
while IFS=: read -r file _ line; do
  name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*).*/\1/' <<<"$line")
  dir="$(dirname "${file#./}")"
  case "./$dir" in *"${FUZZPKG:-}"*) ;; *) continue ;; esac
  bin="$work/$(tr / _ <<<"$dir").test"
  if [ "$built" != "$dir" ]; then
    t0=$SECONDS
    if ! go test -c -fuzz=. -o "$bin" "./$dir" >"$work/build.log" 2>&1; then
      cat "$work/build.log"
      echo "fuzz: building the tests of ./$dir failed" >&2
      exit 1
    fi
    echo "fuzz: built ./$dir in $((SECONDS - t0))s"
    built="$dir"
  fi
  pkgpath="$(cd "$dir" && go list .)"
  t0=$SECONDS
  # -test.timeout bounds a hang in the target itself (an input that never
  # returns), which fuzzing alone would not report.
  if ! (cd "$dir" && "$bin" -test.run='^$' -test.fuzz="^${name}\$" -test.fuzztime="$fuzztime" \
    -test.fuzzminimizetime=0 -test.timeout=5m -test.fuzzcachedir="$cache/$pkgpath") >"$work/run.log" 2>&1; then
    cat "$work/run.log"
    echo "fuzz: $name in ./$dir failed; a crashing input is under $root/$dir/testdata/fuzz/$name (commit it as a regression seed once fixed)" >&2
    exit 1
  fi
  echo "fuzz: ./$dir $name ($fuzztime) ok in $((SECONDS - t0))s"
  n=$((n + 1))
done < <(grep -rn --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]*\(' . | sort)
echo "fuzz: $n targets ran for $fuzztime each in $((SECONDS - start))s, no crash"
