#!/usr/bin/env bash
# helm and kubeconform (Go tools, built with `go install` through the Go module proxy) and
# the Kubernetes JSON schemas kubeconform checks against, made offline from the OpenAPI
# spec inside the k8s.io/kubernetes Go module (scripts/k8s_schemas.py), all in one
# cache directory: ${FEDFLEET_CACHE:-~/.cache/fedfleet}/k8s-tools/{bin,schemas}.
# tests/test_helm.py uses them; scripts/bootstrap.sh --test runs this. Idempotent: when
# the pinned versions are already there it only checks a stamp file and exits.
#   bash scripts/k8s_tools.sh          # install (needs go and python3)
#   bash scripts/k8s_tools.sh --print  # the cache directory
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v4.3.2         # helm.sh/helm/v4
KUBECONFORM_VERSION=v0.7.0  # github.com/yannh/kubeconform
K8S_VERSION=v1.37.2         # k8s.io/kubernetes: api/openapi-spec/swagger.json (helm v4.3.2 is
                            # built on the k8s.io v0.37 modules)
CACHE="${FEDFLEET_CACHE:-$HOME/.cache/fedfleet}/k8s-tools"
STAMP="$CACHE/stamp"
WANT="helm=$HELM_VERSION kubeconform=$KUBECONFORM_VERSION kubernetes=$K8S_VERSION schemas=1"

if [[ "${1:-}" == "--print" ]]; then echo "$CACHE"; exit 0; fi
log() { printf '[k8s-tools] %s\n' "$*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$CACHE/bin/helm" \
      && -x "$CACHE/bin/kubeconform" ]]; then
  exit 0
fi
if ! command -v go >/dev/null; then
  for d in /usr/local/go/bin /usr/lib/go/bin; do [[ -x $d/go ]] && PATH="$d:$PATH"; done
fi
command -v go >/dev/null || { log "go not found: cannot build helm and kubeconform"; exit 1; }
PY="${PYTHON:-python3}"
mkdir -p "$CACHE/bin"
export GOBIN="$CACHE/bin" GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -buildvcs=false"
start=$SECONDS

log "go install helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
log "go install github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"

log "schemas from k8s.io/kubernetes@$K8S_VERSION (api/openapi-spec/swagger.json)"
dir=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
      | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error")))')
rm -rf "$CACHE/schemas.tmp"
"$PY" scripts/k8s_schemas.py "$dir/api/openapi-spec/swagger.json" "$CACHE/schemas.tmp" \
      "$K8S_VERSION" >&2
rm -rf "$CACHE/schemas" && mv "$CACHE/schemas.tmp" "$CACHE/schemas"
echo "$K8S_VERSION" > "$CACHE/schemas/VERSION"

echo "$WANT" > "$STAMP"
log "installed in $CACHE in $((SECONDS - start)) s"
