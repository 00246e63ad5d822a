#!/usr/bin/env python3
"""Checks the Kubernetes examples for what the proxy needs from them.

Linters check the syntax (yamllint, hadolint, systemd-analyze in .ci/run);
this checks the meaning: probes on the admin port, loopback listen address,
secrets as read-only files, the state on a persistent volume, a hardened
container, and a grace period longer than the preStop pause plus the drain.
The forward-mode example must also mount the CA into both containers, its
key into the proxy's only, and point the app's HTTPS_PROXY at the sidecar.
"""
import re
import sys
import tomllib

import yaml

PATHS = ("config/kubernetes.yaml", "config/kubernetes-forward.yaml")


def seconds(text):
    match = re.fullmatch(r"(\d+)s", text)
    if not match:
        raise ValueError(f"expected a duration in seconds, got {text!r}")
    return int(match.group(1))


def check_example(path):
    """The problems found in the example at `path`."""
    problems = []

    def check(condition, what):
        if not condition:
            problems.append(what)

    documents = [d for d in yaml.safe_load_all(open(path)) if d]
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

    if "GOTO_PROXY_CONFIG" in env:
        check_accounts(check, env, kinds, mounts, volumes)
    if env.get("GOTO_PROXY_FORWARD") == "true":
        check_forward(check, env, pod, proxy, mounts, volumes)
    return problems, len(documents)


def check_accounts(check, env, kinds, mounts, volumes):
    """The config file's accounts: their secrets in read-only Secret mounts,
    their state files on the persistent volume."""
    config_dir, config_name = env["GOTO_PROXY_CONFIG"].rsplit("/", 1)
    mount = mounts.get(config_dir)
    config_map = kinds.get("ConfigMap")
    check(mount is not None and config_map is not None, "the config file comes from a ConfigMap")
    if mount is None or config_map is None:
        return
    accounts = tomllib.loads(config_map["data"][config_name]).get("accounts", {})
    check(accounts, "the config file declares an account")
    state_dir = env["GOTO_STATE_FILE"].rsplit("/", 1)[0]
    for name, account in accounts.items():
        for key in ("client_secret_file", "refresh_token_file", "pat_file"):
            if key not in account:
                continue
            secret_mount = mounts.get(account[key].rsplit("/", 1)[0])
            check(secret_mount is not None and secret_mount.get("readOnly")
                  and "secret" in volumes[secret_mount["name"]],
                  f"accounts.{name}.{key} lies in a read-only Secret mount")
        check(account.get("state_file", "").rsplit("/", 1)[0] == state_dir,
              f"accounts.{name}.state_file lies on the persistent volume")


def check_forward(check, env, pod, proxy, mounts, volumes):
    """Forward mode: the CA in both containers, its key in the proxy's only."""
    for variable in ("GOTO_CA_CERT_FILE", "GOTO_CA_KEY_FILE"):
        directory = env[variable].rsplit("/", 1)[0]
        mount = mounts.get(directory)
        check(mount is not None and mount.get("readOnly") and "secret" in volumes[mount["name"]],
              f"{variable} lies in a read-only Secret mount")
    key_name = env["GOTO_CA_KEY_FILE"].rsplit("/", 1)[1]
    listen_port = env["GOTO_PROXY_LISTEN"].rsplit(":", 1)[1]
    for app in pod["containers"]:
        app_env = {e["name"]: e.get("value") for e in app.get("env", [])}
        check(app_env.get("HTTPS_PROXY") == f"http://127.0.0.1:{listen_port}",
              f"{app['name']}: HTTPS_PROXY points at the sidecar")
        for mount in app.get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret")
            if secret is None:
                continue
            items = [item["key"] for item in secret.get("items", [])]
            check(items and key_name not in items,
                  f"{app['name']}: mounts the CA certificate only, never {key_name}")
        trusted = [app_env.get(v) for v in ("NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")]
        check(any(trusted), f"{app['name']}: trusts the CA")


def main():
    failed = False
    for path in PATHS:
        problems, count = check_example(path)
        for problem in problems:
            print(f"{path}: missing: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
        if not problems:
            print(f"{path}: {count} documents, all checks hold")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
