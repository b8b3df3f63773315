#!/bin/bash
# Starts fresh independent vendor servers on 127.0.0.1:9701-9703 (N companies each) and
# writes a crmbridge config for them into $W (default /tmp/crmbridge-indep). SERVERS names
# the directory of the three servers (default: this one; `variant/` holds a second set).
set -e
DIR="$(cd "$(dirname "$0")" && pwd)"
S="${SERVERS:-$DIR}"
W="${W:-/tmp/crmbridge-indep}"
N="${N:-3000}"
pkill -f "_server.py --port" || true
sleep 1
rm -rf "$W/state"; mkdir -p "$W/logs"
sed -e "s#@W@#$W#g" "$DIR/crmbridge.toml" > "$W/crmbridge.toml"
echo -n rt0 > "$W/amo-refresh"
nohup python3 "$S/rally_server.py" --port 9701 --api-key rk_test --companies "$N" --rps 10 --mutations-per-second 0 --seed 1 > "$W/logs/rally.log" 2>&1 &
nohup python3 "$S/marketo_server.py" --port 9702 --client-id mid --client-secret msecret --companies "$N" --first-id 1 --token-ttl 3600 --mutations-per-second 0 --seed 2 > "$W/logs/marketo.log" 2>&1 &
nohup python3 "$S/amocrm_server.py" --port 9703 --client-id aid --client-secret asecret --refresh-token rt0 --long-lived-token llt --companies "$N" --rps 7 --token-ttl 86400 --mutations-per-second 0 --seed 3 > "$W/logs/amocrm.log" 2>&1 &
sleep 3
echo "servers up; config: $W/crmbridge.toml"
