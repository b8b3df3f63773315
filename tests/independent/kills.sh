#!/bin/bash
# kill -9 during backfills against the independent servers: a clean backfill gives each
# server's final company count; then fresh servers get backfills killed after 3, 7, 2 and
# 11 s and one that runs to the end. The counts must match the clean run's: a company
# created twice (or not at all) after a crash shows here.
# Needs: cargo build --release; the env vars of README.md (RALLY_KEY … AMO_SECRET).
set -e
DIR="$(cd "$(dirname "$0")" && pwd)"
W="${W:-/tmp/crmbridge-indep}"
B="${CRMBRIDGE:-$DIR/../../target/release/crmbridge}"
C="$W/crmbridge.toml"
counts() {
  for p in 9701 9702 9703; do
    python3 -c "import json,urllib.request; print(len(json.load(urllib.request.urlopen('http://127.0.0.1:$p/__admin/companies'))))"
  done | paste -sd' '
}
N="${N:-1000}" bash "$DIR/restart.sh" > /dev/null
"$B" backfill --config "$C" > "$W/logs/clean-backfill.log" 2>&1 || true
clean=$(counts)
N="${N:-1000}" bash "$DIR/restart.sh" > /dev/null
for t in 3 7 2 11; do
  "$B" backfill --config "$C" > "$W/logs/killed-backfill.log" 2>&1 &
  pid=$!
  sleep "$t"
  kill -9 "$pid"
  wait "$pid" 2> /dev/null || true
  echo "killed after $t s"
done
"$B" backfill --config "$C" > "$W/logs/final-backfill.log" 2>&1 || true
after=$(counts)
echo "companies (rally marketo amocrm): clean run $clean; after the kills $after"
if [ "$clean" = "$after" ]; then echo "same"; else echo "DIFFERENT"; exit 1; fi
