#!/usr/bin/env bash
# `make demo`: train a small char-level GRU on The Time Machine (~1-2 minutes), export it, serve it on a
# free port, stream a generation through rnnlab-client, stop the server.
# Settings: DEMO_DIR (work directory, default a fresh temp dir), DEMO_MINUTES (training budget, 1.5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MINUTES=${DEMO_MINUTES:-1.5}
WORK=${DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/rnnlab-demo.XXXXXX")}
RUN=$WORK/run
BUNDLES=$WORK/bundles
LOG=$WORK/serve.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The console scripts when rnnlab is installed, else the same entry points as modules.
cli() {
    local name=$1 module=$2
    shift 2
    if command -v "$name" >/dev/null 2>&1; then "$name" "$@"; else "$PYTHON" -m "$module" "$@"; fi
}

echo "== training into $RUN (${MINUTES} min budget)"
cli rnnlab-lm lm.cli train --corpus timemachine --out "$RUN" --cell gru --layers 1 --hidden 256 \
    --max-minutes "$MINUTES"
echo "== exporting to $BUNDLES/timemachine"
cli rnnlab-lm lm.cli export "$RUN" --out "$BUNDLES/timemachine"

echo "== starting rnnlab-serve (log: $LOG)"
if command -v rnnlab-serve >/dev/null 2>&1; then
    rnnlab-serve --models "$BUNDLES" --port 0 >"$LOG" 2>&1 &
else
    "$PYTHON" -m serving.server --models "$BUNDLES" --port 0 >"$LOG" 2>&1 &
fi
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

PORT=""
for _ in $(seq 300); do
    PORT=$(sed -n 's/^rnnlab-serve listening on .*:\([0-9]*\)$/\1/p' "$LOG")
    [ -n "$PORT" ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$LOG" >&2; echo "error: the server exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$PORT" ] || { cat "$LOG" >&2; echo "error: the server did not report its port" >&2; exit 1; }
TARGET=127.0.0.1:$PORT
cli rnnlab-client serving.client_cli --target "$TARGET" health --wait 30
MODEL=$(cli rnnlab-client serving.client_cli --target "$TARGET" models | head -n 1 | cut -f 1)
echo "== streaming from model '$MODEL' at $TARGET"
cli rnnlab-client serving.client_cli --target "$TARGET" generate "$MODEL" "The Time Traveller " \
    --max-tokens 300 --temperature 0.7 --seed 0 --stats
echo "== done (work directory: $WORK)"
