#!/usr/bin/env python3
"""Checks the Kubernetes examples for what the proxy needs from them.

Linters check the syntax (yamllint, hadolint, systemd-analyze in .ci/run);
this checks the meaning: probes on the admin port, loopback listen address,
secrets as read-only files, a hardened container, and a grace period longer
than the preStop pause plus the drain. With the file store (the default) the
state lies on a persistent volume and one replica runs; the main example
instead runs several replicas sharing a Redis store: a Service of the same
file, its password and sealing key as files from a read-only Secret mount,
and a Redis with append-only persistence that sees the password only.
The forward-mode example must also mount the CA into both containers, its
key into the proxy's only, and point the app's HTTPS_PROXY at the sidecar.
"""
import re
import sys
import tomllib
from urllib.parse import urlsplit

import yaml

PATHS = ("config/kubernetes.yaml", "config/kubernetes-forward.yaml")
# The examples whose replicas share their token state through Redis.
SHARED = ("config/kubernetes.yaml",)


def seconds(text):
    match = re.fullmatch(r"(\d+)s", text)
    if not match:
        raise ValueError(f"expected a duration in seconds, got {text!r}")
    return int(match.group(1))


def proxy_of(document):
    """The goto-auth-proxy sidecar of a Deployment, or None."""
    if document["kind"] != "Deployment":
        return None
    pod = document["spec"]["template"]["spec"]
    return next((c for c in pod.get("initContainers", []) if c["name"] == "goto-auth-proxy"),
                None)


def check_example(path):
    """The problems found in the example at `path`."""
    problems = []

    def check(condition, what):
        if not condition:
            problems.append(what)

    documents = [d for d in yaml.safe_load_all(open(path)) if d]
    kinds = {d["kind"]: d for d in documents}
    deployment = next(d for d in documents if proxy_of(d) is not None)
    pod = deployment["spec"]["template"]["spec"]
    proxy = proxy_of(deployment)
    check(proxy.get("restartPolicy") == "Always", "the proxy is a native sidecar")
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    shared = env.get("GOTO_STORE", "file") != "file"
    check(shared == (path in SHARED),
          "a Redis store (GOTO_STORE)" if path in SHARED else "the file store")
    if shared:
        check(deployment["spec"].get("replicas", 1) >= 2, "two replicas or more share the store")
    else:
        check("PersistentVolumeClaim" in kinds, "a PersistentVolumeClaim holds the state")
        check(deployment["spec"]["replicas"] == 1, "one replica per state volume")
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
    if shared:
        # Redis holds the state; the state file is this pod's copy, on any writable volume.
        check(state_mount is not None and not state_mount.get("readOnly"),
              "the state file lies in a writable mount")
    else:
        check(state_mount is not None
              and "persistentVolumeClaim" in volumes[state_mount["name"]],
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
    if shared:
        check_store(check, env, documents, mounts, volumes)
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
              f"accounts.{name}.state_file lies beside GOTO_STATE_FILE")


def secret_file(check, variable, path, mounts, volumes, documents):
    """The (Secret name, key) that the file at `path` comes from, checking
    that it lies in a read-only Secret mount and that a Secret declared in
    the example provides the key; None when it does not."""
    check(path and "/" in path, f"{variable} is set to a file path")
    if not path or "/" not in path:
        return None
    directory, name = path.rsplit("/", 1)
    mount = mounts.get(directory)
    secret = mount is not None and volumes[mount["name"]].get("secret")
    check(secret and mount.get("readOnly"), f"{variable} lies in a read-only Secret mount")
    if not secret:
        return None
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    check(not items or name in items, f"{variable}: the Secret volume's items include {name}")
    key = items.get(name, name)
    declared = [d for d in documents if d["kind"] == "Secret"
                and d["metadata"]["name"] == secret["secretName"]]
    for document in declared:
        provided = {**document.get("data", {}), **document.get("stringData", {})}
        check(key in provided, f"{variable}: Secret {secret['secretName']} provides {key}")
    return secret["secretName"], key


def secrets_seen(container, volumes):
    """What a container sees of Secrets: (name, key) pairs, with key None
    for a whole Secret."""
    seen = set()
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret is None:
            continue
        items = secret.get("items")
        if items:
            seen.update((secret["secretName"], item["key"]) for item in items)
        else:
            seen.add((secret["secretName"], None))
    for variable in container.get("env", []):
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            seen.add((reference["name"], reference["key"]))
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            seen.add((source["secretRef"]["name"], None))
    return seen


def check_store(check, env, documents, mounts, volumes):
    """A Redis store: a Service of this file, the password and the sealing
    key as Secret files, and a Redis that keeps its data on disk and never
    sees the key."""
    url = urlsplit(env["GOTO_STORE"])
    check(url.scheme in ("redis", "rediss"), "GOTO_STORE is a redis:// or rediss:// URL")
    check(url.password is None, "the Redis password comes as a file, not in GOTO_STORE")
    # A Service name, possibly with its namespace and the cluster domain after it.
    host = (url.hostname or "").split(".", 1)[0]
    port = url.port or 6379
    service = next((d for d in documents if d["kind"] == "Service"
                    and d["metadata"]["name"] == host), None)
    check(service is not None, f"GOTO_STORE names a Service of this file ({host!r})")
    if service is not None:
        check(any(p["port"] == port for p in service["spec"]["ports"]),
              f"Service {host} serves port {port}")
    password = secret_file(check, "GOTO_STORE_PASSWORD_FILE",
                           env.get("GOTO_STORE_PASSWORD_FILE"), mounts, volumes, documents)
    store_key = secret_file(check, "GOTO_STORE_KEY_FILE",
                            env.get("GOTO_STORE_KEY_FILE"), mounts, volumes, documents)
    if service is None:
        return
    selector = service["spec"].get("selector", {})
    redis = next((d for d in documents if d["kind"] in ("StatefulSet", "Deployment")
                  and selector and selector.items()
                  <= d["spec"]["template"]["metadata"].get("labels", {}).items()), None)
    check(redis is not None, f"Service {host} selects a Redis workload of this file")
    if redis is None:
        return
    name = redis["metadata"]["name"]
    pod = redis["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    check(re.search(r"\bappendonly\s+yes\b", command), f"{name} runs with appendonly yes")
    claims = {c["metadata"]["name"] for c in redis["spec"].get("volumeClaimTemplates", [])}
    check(any(m["name"] in claims for m in container.get("volumeMounts", [])),
          f"{name} keeps its data on a volume claim")
    check("readinessProbe" in container, f"{name} has a readiness probe")
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name} runs as non-root")
    seen = secrets_seen(container, {v["name"]: v for v in pod.get("volumes", [])})
    if password is not None:
        check(password in seen or (password[0], None) in seen,
              f"{name} reads its password from the proxy's {password[0]}/{password[1]}")
    if store_key is not None:
        check(store_key not in seen and (store_key[0], None) not in seen,
              f"{name} never sees the store key {store_key[0]}/{store_key[1]}")


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
