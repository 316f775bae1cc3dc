#!/usr/bin/env bash
# Make a CA, a SuperLink certificate for the given address, and SuperNode key pairs: a wrapper of
# `corolla keys ca` and `corolla keys node` (kept for scripts that call it).
#   bash deploy/certs.sh OUT_DIR SERVER_IP_OR_NAME [N_NODES]
# writes OUT/ca.crt, ca.key, server.crt, server.key (SAN: the address, 127.0.0.1, localhost) and OUT/node0..N-1
# (+ .pub). Then:
#   corolla superlink --home HOME --ssl-ca OUT/ca.crt --ssl-cert OUT/server.crt --ssl-key OUT/server.key --auth ...
#   corolla nodes register --home HOME OUT/node0.pub
#   corolla client --superlink SERVER:9092 --root-certificates OUT/ca.crt --auth-key OUT/node0 ...
set -euo pipefail
out=${1:?usage: certs.sh OUT_DIR SERVER_IP_OR_NAME [N_NODES]}
host=${2:?server address (IP or DNS name) the clients will dial}
nodes=${3:-0}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${COROLLA_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
"$py" -m corolla.cli keys ca "$out" --host "$host" >/dev/null
names=()
for ((i = 0; i < nodes; i++)); do names+=("node$i"); done
if ((nodes > 0)); then "$py" -m corolla.cli keys node "$out" "${names[@]}" --force >/dev/null; fi
echo "wrote $out: ca.crt server.crt server.key${names[*]:+ and key pairs ${names[*]}}"
