#!/usr/bin/env bash
# Regenerates the test certificates: a private CA and a server certificate it
# signs for localhost and 127.0.0.1. For tests and local experiments only:
# the keys are public, so nothing real may ever trust this CA.
set -euo pipefail
cd "$(dirname "$0")"
days=36500
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out test-ca.key
openssl req -x509 -new -key test-ca.key -sha256 -days "$days" \
  -subj "/CN=goto-auth-proxy test CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out test-ca.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out localhost.key
openssl req -new -key localhost.key -subj "/CN=localhost" -out localhost.csr
cat > localhost.ext <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EXT
openssl x509 -req -in localhost.csr -CA test-ca.pem -CAkey test-ca.key -CAcreateserial \
  -days "$days" -sha256 -extfile localhost.ext -out localhost.pem
rm -f localhost.csr localhost.ext test-ca.srl
