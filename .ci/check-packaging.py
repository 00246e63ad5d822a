#!/usr/bin/env python3
"""Checks the Kubernetes example for what the proxy needs from it.

Linters check the syntax (yamllint, hadolint, systemd-analyze in .ci/run);
this checks the meaning: probes on the admin port, loopback listen address,
secrets as read-only files, the state on a persistent volume, a hardened
container, and a grace period longer than the preStop pause plus the drain.
"""
import re
import sys

import yaml

PATH = "config/kubernetes.yaml"


def seconds(text):
    match = re.fullmatch(r"(\d+)s", text)
    if not match:
        raise ValueError(f"expected a duration in seconds, got {text!r}")
    return int(match.group(1))


def main():
    problems = []

    def check(condition, what):
        if not condition:
            problems.append(what)

    documents = [d for d in yaml.safe_load_all(open(PATH)) if d]
    kinds = {d["kind"]: d for d in documents}
    check("PersistentVolumeClaim" in kinds, "a PersistentVolumeClaim holds the state")
    deployment = kinds["Deployment"]
    check(deployment["spec"]["replicas"] == 1, "one replica per state volume")
    pod = deployment["spec"]["template"]["spec"]
    proxy = next(c for c in pod["initContainers"] if c["name"] == "goto-auth-proxy")
    check(proxy.get("restartPolicy") == "Always", "the proxy is a native sidecar")
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    check(env["GOTO_PROXY_LISTEN"].startswith("127.0.0.1:"), "the proxy listens on loopback only")
    admin_port = int(env["GOTO_PROXY_ADMIN_LISTEN"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    check(ports.get("admin") == admin_port, "the admin port is declared")
    check(proxy["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness on /readyz")
    check(proxy["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness on /healthz")
    for probe in ("readinessProbe", "livenessProbe"):
        check(proxy[probe]["httpGet"]["port"] in ("admin", admin_port), f"{probe} on the admin port")

    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for variable in ("GOTO_CLIENT_SECRET_FILE", "GOTO_REFRESH_TOKEN_FILE"):
        directory = env[variable].rsplit("/", 1)[0]
        mount = mounts.get(directory)
        check(mount is not None and mount.get("readOnly"), f"{variable} lies in a read-only mount")
        check(mount is not None and "secret" in volumes[mount["name"]], f"{variable} comes from a Secret")
    check("GOTO_CLIENT_SECRET" not in env and "GOTO_REFRESH_TOKEN" not in env,
          "secrets come as files, not environment values")
    state_dir = env["GOTO_STATE_FILE"].rsplit("/", 1)[0]
    state_mount = mounts.get(state_dir)
    check(state_mount is not None and "persistentVolumeClaim" in volumes[state_mount["name"]],
          "the state file lies on the persistent volume")

    security = proxy["securityContext"]
    check(security.get("readOnlyRootFilesystem") is True, "read-only root file system")
    check(security.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    check(pod["securityContext"].get("runAsNonRoot") is True, "runs as non-root")

    drain = seconds(env["GOTO_DRAIN_TIMEOUT"])
    pause = proxy["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    check(grace > pause + drain, f"grace period {grace}s exceeds preStop {pause}s + drain {drain}s")

    for problem in problems:
        print(f"{PATH}: missing: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{PATH}: {len(documents)} documents, all checks hold")


if __name__ == "__main__":
    main()
