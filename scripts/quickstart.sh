#!/usr/bin/env bash
# Local quickstart: builds and starts a signaling server on 127.0.0.1, signs in, creates a room
# and a worker token, and shows how peers connect. Ctrl-C stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-8080}"
DATA="${SLEAP_RTC_DATA_DIR:-$HOME/.local/share/sleap-rtc/quickstart}"
echo "==> building sleap-rtc-server (release; the first build takes a few minutes)"
cargo build --release --locked -p sleap-rtc-server
mkdir -p "$DATA"
./target/release/sleap-rtc-server --listen "127.0.0.1:$PORT" --data-dir "$DATA" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:$PORT/health"; echo
BASE="http://127.0.0.1:$PORT"
JWT=$(curl -fsS -X POST "$BASE/anonymous-signin" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jwt"])')
ROOM=$(curl -fsS -X POST "$BASE/api/auth/rooms" -H "Authorization: Bearer $JWT" -H 'Content-Type: application/json' \
  -d '{"name":"quickstart"}')
ROOM_ID=$(echo "$ROOM" | python3 -c 'import json,sys; print(json.load(sys.stdin)["room_id"])')
TOKEN=$(curl -fsS -X POST "$BASE/api/auth/token" -H "Authorization: Bearer $JWT" -H 'Content-Type: application/json' \
  -d "{\"room_id\":\"$ROOM_ID\",\"worker_name\":\"local\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_id"])')
cat <<MSG

sleap-rtc signaling server running at $BASE (WebSocket: ws://127.0.0.1:$PORT/ws, data in $DATA)
  room:          $ROOM_ID
  user JWT:      $JWT
  worker token:  $TOKEN   (shown once; stored hashed)

A worker registers with:  {"type":"register","role":"worker","api_key":"$TOKEN"}
A client registers with:  {"type":"register","role":"client","jwt":"<JWT>","room_id":"$ROOM_ID"}
Live workers:             curl -H "Authorization: Bearer \$JWT" $BASE/api/rooms/$ROOM_ID/workers
Metrics:                  curl $BASE/metrics

Press Ctrl-C to stop the server.
MSG
wait $SERVER
