#!/usr/bin/env bash
# Make a CA, a SuperLink certificate for the given addresses, and SuperNode keys for authentication.
#   bash deploy/certs.sh OUT_DIR SERVER_IP_OR_NAME [N_NODES]
# Then: corolla server --ssl-ca OUT/ca.crt --ssl-cert OUT/server.crt --ssl-key OUT/server.key ...
#       corolla client --root-certificates OUT/ca.crt --auth-key OUT/node0 ...   (register OUT/node0.pub first:
#       FLWR_HOME=... flwr supernode register OUT/node0.pub CONNECTION)
set -euo pipefail
out=${1:?usage: certs.sh OUT_DIR SERVER_IP_OR_NAME [N_NODES]}
host=${2:?server address (IP or DNS name) the clients will dial}
nodes=${3:-0}
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:4096 -nodes -days 365 -subj "/CN=corolla-ca" -keyout ca.key -out ca.crt 2>/dev/null
if [[ $host =~ ^[0-9.]+$ ]]; then san="IP:$host,IP:127.0.0.1,DNS:localhost"; else san="DNS:$host,IP:127.0.0.1,DNS:localhost"; fi
openssl req -newkey rsa:4096 -nodes -subj "/CN=$host" -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=%s\n" "$san" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile san.ext -out server.crt 2>/dev/null
rm -f server.csr san.ext
for ((i = 0; i < nodes; i++)); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "node$i" -C "corolla-node$i" <<<y >/dev/null
done
echo "wrote $(pwd): ca.crt server.crt server.key${nodes:+ and $nodes node key pairs}"
