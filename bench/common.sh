# Sourced by the bench scripts: builds the release binary and the mock,
# gives a work directory, and kills every process recorded in `pids` (only
# those the script started) on exit.
cargo build --release --quiet --bin graphcache --example mock-graph
BIN=target/release/graphcache
MOCK=target/release/examples/mock-graph
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
