#!/usr/bin/env python3
"""Load benchmark: the cost of header injection, measured against nginx,
HAProxy and a minimal hyper proxy.

An upstream (nginx, answering a small body) on loopback is loaded with wrk
five ways, in turn, several rounds (A B C D E, A B C D E, ...), so that noise
on a shared machine falls on all of them alike:

  direct   wrk -> upstream
  proxy    wrk -> goto-auth-proxy (demo mode: stand-in token endpoint) -> upstream
  nginx    wrk -> nginx injecting the same ~1.5 KB bearer header -> upstream
  haproxy  wrk -> HAProxy (http-request set-header, http-reuse always) -> upstream
  minimal  wrk -> benches/minimal_proxy.rs: hyper, one upstream connection per
           client connection, the header inserted, nothing else, one
           single-threaded runtime per core as the proxy runs (the floor of
           what hyper costs for this job) -> upstream

nginx runs 2 workers and HAProxy 2 threads, as many as the machine has cores
here. Prints req/s, p50 and p99 latency and peak RSS for each, and the ratios
of goto-auth-proxy to the others. Also over TLS to the upstream (--tls).

    python3 benches/load.py                      # plain upstream, 1/32/256 connections
    python3 benches/load.py --tls --rounds 5     # TLS upstream (rustls vs nginx's OpenSSL)
    python3 benches/load.py --baseline OLD/goto-auth-proxy   # and an older build, side by side

Needs wrk, nginx and HAProxy (Debian: apt-get install wrk nginx-light haproxy;
the script installs them when run as root) and release builds (it runs cargo
build).
Everything binds to 127.0.0.1 and stops when the script ends.
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = "ok\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "haproxy": "haproxy"}
WORKERS = 2
BEARER = "Bearer " + "x" * 1500


def ensure_tools():
    missing = [package for tool, package in PACKAGES.items()
               if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing tools: apt-get install {' '.join(missing)}")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def nginx_binary():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_command(workdir, name, server_block, workers, directives="daemon off;"):
    """Writes an nginx configuration under `workdir`; returns the command that runs it."""
    prefix = os.path.join(workdir, name)
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    {server_block}
}}
""")
    return [nginx_binary(), "-p", prefix, "-c", conf, "-g", directives]


def start_nginx(workdir, name, server_block, workers):
    return subprocess.Popen(nginx_command(workdir, name, server_block, workers),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_haproxy(workdir, port, up_port, tls):
    """HAProxy in front of the upstream, setting the same header, with as
    many threads as nginx has workers."""
    server = f"server up 127.0.0.1:{up_port}"
    if tls:
        ca = os.path.join(ROOT, "certs", "test-ca.pem")
        server += f" ssl verify required ca-file {ca} sni str(localhost) verifyhost localhost"
    conf = os.path.join(workdir, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
    nbthread {WORKERS}
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend front
    bind 127.0.0.1:{port}
    default_backend back
backend back
    http-request set-header Authorization "{BEARER}"
    {server}
""")
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return subprocess.Popen([haproxy, "-db", "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer")


def peak_rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def nginx_pids(master):
    children = subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True, text=True).stdout.split()
    return [master.pid] + [int(p) for p in children]


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url, connections, duration):
    threads = min(2, connections)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(*re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups())
    p99 = to_ms(*re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups())
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        sys.exit(f"{url}: {errors.group(1)} non-2xx answers:\n{out}")
    return rps, p50, p99


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="10s")
    parser.add_argument("--connections", default="1,32,256")
    parser.add_argument("--tls", action="store_true", help="TLS between the proxies and the upstream")
    parser.add_argument("--svg", metavar="FILE", help="also draw req/s and p99 per target as an SVG chart")
    parser.add_argument("--baseline", metavar="BINARY",
                        help="also load another goto-auth-proxy build (say, of the previous commit), set up alike")
    args = parser.parse_args()
    ensure_tools()
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "goto-auth-proxy",
                    "--example", "minimal_proxy"], cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="goto-load-")
    processes = []
    try:
        up_port, ngx_port, gap_port, admin_port, hap_port, min_port = (free_port() for _ in range(6))
        certs = os.path.join(ROOT, "certs")
        if args.tls:
            # `ssl http2` on the listen line: Debian 12's nginx 1.22 predates `http2 on;`.
            listen = f"listen 127.0.0.1:{up_port} ssl http2; ssl_certificate {certs}/localhost.pem; " \
                     f"ssl_certificate_key {certs}/localhost.key;"
            upstream_url = f"https://localhost:{up_port}"
            backend = f"""upstream backend {{ server 127.0.0.1:{up_port}; keepalive 256; }}
    server {{ listen 127.0.0.1:{ngx_port}; location / {{
        proxy_pass https://backend; proxy_http_version 1.1; proxy_set_header Connection "";
        proxy_ssl_trusted_certificate {certs}/test-ca.pem; proxy_ssl_verify on;
        proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on;
        proxy_set_header Authorization "{BEARER}"; }} }}"""
        else:
            listen = f"listen 127.0.0.1:{up_port};"
            upstream_url = f"http://127.0.0.1:{up_port}"
            backend = f"""upstream backend {{ server 127.0.0.1:{up_port}; keepalive 256; }}
    server {{ listen 127.0.0.1:{ngx_port}; location / {{
        proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
        proxy_set_header Authorization "{BEARER}"; }} }}"""
        upstream = start_nginx(work, "upstream", f"server {{ {listen} keepalive_requests 1000000; "
                               f"location / {{ return 200 '{BODY.strip()}'; }} }}", 1)
        processes.append(upstream)
        nginx = start_nginx(work, "nginx", backend, WORKERS)
        processes.append(nginx)
        haproxy = start_haproxy(work, hap_port, up_port, args.tls)
        processes.append(haproxy)
        # Laid out as the proxy is: one single-threaded runtime per core.
        minimal_command = [os.path.join(ROOT, "target/release/examples/minimal_proxy"), "--per-core",
                           f"127.0.0.1:{min_port}", upstream_url]
        if args.tls:
            minimal_command.append(os.path.join(certs, "test-ca.pem"))
        minimal = subprocess.Popen(minimal_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(minimal)
        def start_proxy(binary, port, admin):
            command = [binary, "demo", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                       "--upstream", upstream_url, "--token-lifetime", "3600s"]
            if args.tls:
                command += ["--upstream-ca-file", os.path.join(certs, "test-ca.pem")]
            started = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env={**os.environ, "RUST_LOG": "warn"})
            processes.append(started)
            wait_http(f"http://127.0.0.1:{admin}/readyz")
            return started

        proxy = start_proxy(os.path.join(ROOT, "target/release/goto-auth-proxy"), gap_port, admin_port)
        targets = {
            "direct": f"{'https' if args.tls else 'http'}://127.0.0.1:{up_port}/bench",
            "proxy": f"http://127.0.0.1:{gap_port}/bench",
            "nginx": f"http://127.0.0.1:{ngx_port}/bench",
            "haproxy": f"http://127.0.0.1:{hap_port}/bench",
            "minimal": f"http://127.0.0.1:{min_port}/bench",
        }
        if args.baseline:
            base_port, base_admin = free_port(), free_port()
            start_proxy(os.path.abspath(args.baseline), base_port, base_admin)
            targets["baseline"] = f"http://127.0.0.1:{base_port}/bench"
        if args.tls:
            # wrk to a TLS upstream would measure wrk's TLS; the direct baseline stays plain.
            plain_port = free_port()
            plain = start_nginx(work, "plain", f"server {{ listen 127.0.0.1:{plain_port}; "
                                f"location / {{ return 200 '{BODY.strip()}'; }} }}", 1)
            processes.append(plain)
            targets["direct"] = f"http://127.0.0.1:{plain_port}/bench"
        for url in targets.values():
            wait_http(url)
        idle_proxy_rss = peak_rss_kib([proxy.pid])

        results = {}
        connection_counts = [int(c) for c in args.connections.split(",")]
        for round_number in range(1, args.rounds + 1):
            for connections in connection_counts:
                for name, url in targets.items():
                    rps, p50, p99 = run_wrk(url, connections, args.duration)
                    results.setdefault((connections, name), []).append((rps, p50, p99))
                    print(f"round {round_number} c={connections:<4} {name:<8} {rps:>10.0f} req/s "
                          f"p50 {p50:7.3f} ms  p99 {p99:7.3f} ms", flush=True)

        print(f"\nupstream over {'TLS' if args.tls else 'plain HTTP'}; medians of {args.rounds} rounds of {args.duration}")
        print(f"{'conns':>5} {'target':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
        all_medians = {}
        for connections in connection_counts:
            medians = all_medians.setdefault(connections, {})
            for name in targets:
                runs = results[(connections, name)]
                medians[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
                rps, p50, p99 = medians[name]
                print(f"{connections:>5} {name:<8} {rps:>10.0f} {p50:>8.3f} {p99:>8.3f}")
            proxy_m, direct_m = medians["proxy"], medians["direct"]
            for peer in ("nginx", "haproxy", "minimal", "baseline"):
                if peer in medians:
                    peer_m = medians[peer]
                    print(f"      goto-auth-proxy / {peer}: req/s {proxy_m[0] / peer_m[0]:.2f}x, "
                          f"p99 {proxy_m[2] / peer_m[2]:.2f}x")
            added = ", ".join(f"{name} {medians[name][1] - direct_m[1]:.3f} ms"
                              for name in targets if name != "direct")
            print(f"      added p50 over direct: {added}")
        if args.svg:
            write_chart(args.svg, connection_counts, list(targets), all_medians,
                        f"upstream over {'TLS' if args.tls else 'plain HTTP'}, medians of {args.rounds} rounds")
            print(f"chart written to {args.svg}")
        print(f"\npeak RSS: goto-auth-proxy {peak_rss_kib([proxy.pid]) / 1024:.1f} MiB "
              f"(idle {idle_proxy_rss / 1024:.1f} MiB), nginx {peak_rss_kib(nginx_pids(nginx)) / 1024:.1f} MiB "
              f"(master and workers), HAProxy {peak_rss_kib([haproxy.pid]) / 1024:.1f} MiB, "
              f"minimal {peak_rss_kib([minimal.pid]) / 1024:.1f} MiB")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


COLOURS = {"direct": "#9e9e9e", "proxy": "#1565c0", "nginx": "#2e7d32", "haproxy": "#6a1b9a",
           "minimal": "#00838f", "baseline": "#ef6c00"}


def write_chart(path, connection_counts, names, medians, title):
    """Two panels of grouped bars (req/s, p99 ms), one group per connection count."""
    panel_height, top = 220, 40
    bar, gap, group_gap, left = 26, 4, 40, 70
    group_width = len(names) * (bar + gap) + group_gap + 60
    width = max(left + 40 + len(connection_counts) * group_width, left + 20 + len(names) * 130)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + 2 * (panel_height + 60)}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="20" font-size="14">{title}</text>']
    legend_y = top + 2 * (panel_height + 60) - 25
    for legend_index, name in enumerate(names):
        x = left + legend_index * 130
        parts.append(f'<rect x="{x}" y="{legend_y}" width="12" height="12" fill="{COLOURS[name]}"/>'
                     f'<text x="{x + 16}" y="{legend_y + 11}">{"goto-auth-proxy" if name == "proxy" else name}</text>')
    for panel, (label, index) in enumerate((("requests per second", 0), ("p99 latency, ms", 2))):
        base = top + panel * (panel_height + 60) + panel_height
        peak = max(medians[c][n][index] for c in connection_counts for n in names) or 1
        parts.append(f'<text x="{left}" y="{base - panel_height - 6}">{label}</text>'
                     f'<line x1="{left}" y1="{base}" x2="{width - 20}" y2="{base}" stroke="#333"/>')
        for group, connections in enumerate(connection_counts):
            x0 = left + 20 + group * group_width
            for position, name in enumerate(names):
                value = medians[connections][name][index]
                height = value / peak * (panel_height - 20)
                x = x0 + position * (bar + gap)
                shown = f"{value:.0f}" if index == 0 else f"{value:.2f}"
                parts.append(f'<rect x="{x}" y="{base - height:.1f}" width="{bar}" height="{height:.1f}" '
                             f'fill="{COLOURS[name]}"/><text x="{x + bar / 2}" y="{base - height - 3:.1f}" '
                             f'font-size="9" text-anchor="middle">{shown}</text>')
            parts.append(f'<text x="{x0 + len(names) * (bar + gap) / 2}" y="{base + 16}" '
                         f'text-anchor="middle">{connections} conn.</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
