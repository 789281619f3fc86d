#!/usr/bin/env bash
# eaas-registry end to end: serve on a free port, put/get/list/rm, and watch seeing the changes.
set -euo pipefail
tool=$1
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
"$tool" serve --port 0 --token t0k > "$dir/serve.log" &
for _ in $(seq 50); do grep -q serving "$dir/serve.log" && break; sleep 0.1; done
port=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$dir/serve.log")
[[ -n $port ]] || { echo "no port"; cat "$dir/serve.log"; exit 1; }
ep="embedded://127.0.0.1:$port"
if "$tool" --endpoint "$ep" list /x/ 2> "$dir/err"; then echo "expected a refusal without the token"; exit 1; fi
grep -q permission_denied "$dir/err"
"$tool" --endpoint "$ep" --token t0k watch /svc/ > "$dir/watch.log" &
sleep 0.5
"$tool" --endpoint "$ep" --token t0k put /svc/a alpha
"$tool" --endpoint "$ep" --token t0k put /svc/b beta
"$tool" --endpoint "$ep" --token t0k put /other/c gamma
"$tool" --endpoint "$ep" --token t0k get /svc/a | grep -q $'^/svc/a\talpha\t'
"$tool" --endpoint "$ep" --token t0k list /svc/ > "$dir/list.log"
grep -q "# 2 record(s)" "$dir/list.log"
"$tool" --endpoint "$ep" --token t0k rm /svc/a
if "$tool" --endpoint "$ep" --token t0k get /svc/a 2> "$dir/err"; then echo "deleted key still there"; exit 1; fi
grep -q not_found "$dir/err"
for _ in $(seq 50); do grep -q '^remove' "$dir/watch.log" && break; sleep 0.1; done
grep -q $'^put\t/svc/a\talpha' "$dir/watch.log"
grep -q $'^put\t/svc/b\tbeta' "$dir/watch.log"
grep -q $'^remove\t/svc/a' "$dir/watch.log"
if grep -q /other/ "$dir/watch.log"; then echo "watch leaked another prefix"; exit 1; fi
echo "eaas-registry CLI: ok"
