#!/usr/bin/env bash
# Brings docker-compose.yml up from nothing, forms the three-member control plane, places
# a volume on a node of each site, checks `tandem status`, and tears everything down.
# Usage: bash docker/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=tandem-smoke
compose() { docker compose "$@" 2>/dev/null || docker-compose "$@"; }
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
bash docker/build-image.sh
compose run --rm init >/dev/null
compose up -d >/dev/null
cli() { compose run --rm -e TANDEM_RETRY_SECONDS=30 cli "$@"; }
cli cluster init
registered() { cli status --json | grep -q "\"name\":\"$1\""; }
for node in member-a member-b member-c node-a3 node-b2; do
  for _ in $(seq 60); do registered "$node" && break; sleep 1; done
done
cli cluster add-member member-b >/dev/null
cli cluster add-member member-c >/dev/null
cli volume create east --node node-a3 --size 64MiB >/dev/null
cli volume create west --node node-b2 --size 64MiB >/dev/null
status=$(cli status --json)
python3 - "$status" <<'PYTHON'
import json, sys
status = json.loads(sys.argv[1])
members = [member["name"] for member in status["cluster"]["members"]]
assert sorted(members) == ["member-a", "member-b", "member-c"], members
sites = {site: sorted(node["name"] for node in nodes) for site, nodes in status["sites"].items()}
assert sites == {"site-a": ["member-a", "member-b", "node-a3"], "site-b": ["member-c", "node-b2"]}, sites
assert all(node["health"] == "up" for nodes in status["sites"].values() for node in nodes), status["sites"]
volumes = {volume["name"]: (volume["node"], volume["state"]) for volume in status["volumes"]}
assert volumes == {"east": ("node-a3", "ready"), "west": ("node-b2", "ready")}, volumes
print(f"smoke: {len(members)} members, leader {status['cluster']['leader']}, "
      f"{sum(len(nodes) for nodes in sites.values())} nodes up in {len(sites)} sites, {len(volumes)} volumes ready")
PYTHON
