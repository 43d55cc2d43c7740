#!/usr/bin/env bash
# The project's test command (CI runs it through .ci/run): installs what the
# tests need when it is missing, then runs rustfmt, clippy and the test suite.
# Exits non-zero if any of them fails. Last, a short run of every fuzz
# target (scripts/fuzz.sh; cargo-fuzz is installed when missing).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

step "checking system packages"
# shellcheck disable=SC2119 # no arguments: all of them
ensure_packages

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "cargo $component is missing and there is no rustup"
        step "installing the $component component"
        rustup component add "$component"
    fi
done

if ! cargo nextest --version >/dev/null 2>&1; then
    step "installing cargo-nextest"
    cargo install --locked --quiet cargo-nextest
fi

failed=()

step "cargo fmt --check"
if ! cargo fmt --check; then
    failed+=("fmt")
fi

step "cargo clippy --all-targets [--features failpoints] -- -D warnings"
if ! cargo clippy --quiet --all-targets -- -D warnings ||
    ! cargo clippy --quiet --all-targets --features failpoints -- -D warnings; then
    failed+=("clippy")
fi

# The fault points (a frame damaged on the wire, ...) are compiled in for the
# tests only; they do nothing unless FAILPOINTS names them.
step "cargo nextest run --profile ci --features failpoints"
if ! cargo nextest run --profile ci --features failpoints; then
    failed+=("tests")
fi

step "a short run of every fuzz target (scripts/fuzz.sh)"
if ! ./scripts/fuzz.sh --seconds "${HABLK_FUZZ_SECONDS:-20}"; then
    failed+=("fuzz")
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    printf '\nscripts/test.sh: FAILED (%s)\n' "${failed[*]}" >&2
    exit 1
fi
