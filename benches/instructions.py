#!/usr/bin/env python3
"""User-space instructions per proxied request, goto-auth-proxy against nginx
and the minimal hyper proxy of benches/minimal_proxy.rs.

Each proxy runs under valgrind's callgrind, which counts instructions
rather than time: the figure is the same on a loaded machine and an idle
one. Both forward to the same nginx upstream on loopback, nginx injecting
the same ~1.5 KB bearer header. Counting starts after a warm-up,
wrk sends requests over one keep-alive connection, and the count is divided
by the requests served. The kernel's share (the socket calls, about the
same for both) is not counted.

    python3 benches/instructions.py              # summary
    python3 benches/instructions.py --keep DIR   # also keep the callgrind files (callgrind_annotate them)

Needs valgrind, wrk and nginx (Debian: apt-get install valgrind wrk nginx-light;
the script installs them when run as root) and a release build with line
tables (it runs cargo build with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
into target/profiling).
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import ROOT, free_port, nginx_command, start_nginx, wait_http  # noqa: E402

TOKEN = "x" * 1500


def ensure_tools():
    missing = [t for t in ("wrk", "nginx", "valgrind") if not shutil.which(t) and not os.path.exists(f"/usr/sbin/{t}")]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {', '.join(missing)}: apt-get install valgrind wrk nginx-light")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "valgrind", "wrk", "nginx-light"],
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def build():
    env = {**os.environ, "CARGO_PROFILE_RELEASE_DEBUG": "line-tables-only"}
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "goto-auth-proxy",
                    "--example", "minimal_proxy",
                    "--target-dir", os.path.join(ROOT, "target", "profiling")], cwd=ROOT, env=env, check=True)
    release = os.path.join(ROOT, "target", "profiling", "release")
    return os.path.join(release, "goto-auth-proxy"), os.path.join(release, "examples", "minimal_proxy")


def measure(name, command, url, out_dir, seconds):
    """Runs `command` under callgrind, loads `url` after a warm-up, returns (instructions, requests)."""
    out = os.path.join(out_dir, f"callgrind.{name}")
    process = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                f"--callgrind-out-file={out}.%p"] + command,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_http(url, timeout=120)
        for _ in range(200):
            wait_http(url)
        # Counting starts now: start-up and warm-up are left out.
        subprocess.run(["callgrind_control", "--instr=on", str(process.pid)], check=True, capture_output=True)
        out_text = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", url],
                                  capture_output=True, text=True, check=True).stdout
        requests = int(re.search(r"(\d+) requests in", out_text).group(1))
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        process.terminate()
        process.wait(timeout=60)
    dumps = sorted(glob.glob(f"{out}.{process.pid}.*"))
    if not dumps:
        sys.exit(f"{name}: callgrind wrote no dump")
    with open(dumps[0]) as f:
        totals = re.search(r"^(?:totals|summary):\s+(\d+)", f.read(), re.M)
    return int(totals.group(1)), requests


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="load time per proxy (under valgrind)")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files in DIR")
    args = parser.parse_args()
    ensure_tools()
    binary, minimal = build()
    work = tempfile.mkdtemp(prefix="goto-instructions-")
    processes = []
    try:
        up_port, ngx_port, gap_port, admin_port, min_port = (free_port() for _ in range(5))
        processes.append(start_nginx(work, "upstream", f"server {{ listen 127.0.0.1:{up_port}; "
                                     f"keepalive_requests 1000000; location / {{ return 200 'ok'; }} }}", 1))
        wait_http(f"http://127.0.0.1:{up_port}/")
        nginx = nginx_command(
            work, "nginx",
            f"""upstream backend {{ server 127.0.0.1:{up_port}; keepalive 16; }}
    server {{ listen 127.0.0.1:{ngx_port}; location / {{
        proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
        proxy_set_header Authorization "Bearer {TOKEN}"; }} }}""",
            1, directives="daemon off; master_process off;")
        results = {
            "goto-auth-proxy": measure(
                "goto-auth-proxy",
                [binary, "demo", "--listen", f"127.0.0.1:{gap_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
                 "--upstream", f"http://127.0.0.1:{up_port}", "--token-lifetime", "3600s"],
                f"http://127.0.0.1:{gap_port}/bench", work, args.seconds),
            "nginx": measure("nginx", nginx, f"http://127.0.0.1:{ngx_port}/bench", work, args.seconds),
            "minimal": measure("minimal", [minimal, "--per-core", f"127.0.0.1:{min_port}", f"http://127.0.0.1:{up_port}"],
                               f"http://127.0.0.1:{min_port}/bench", work, args.seconds),
        }
        print("user-space instructions per proxied request (callgrind, one keep-alive connection)")
        for name, (instructions, requests) in results.items():
            print(f"  {name:<16} {instructions / requests:>9.0f}   ({instructions} over {requests} requests)")
        per_request = {name: instructions / requests for name, (instructions, requests) in results.items()}
        for peer in ("nginx", "minimal"):
            print(f"  goto-auth-proxy / {peer}: {per_request['goto-auth-proxy'] / per_request[peer]:.2f}x")
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for path in glob.glob(os.path.join(work, "callgrind.*")):
                shutil.copy(path, args.keep)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
