#!/usr/bin/env bash
# The main job: a pfsyncd node tracking real traffic. Starts a node capturing the
# loopback interface (needs root), makes a few real TCP/UDP connections with the kernel's
# own stack, shows what pfctl sees, and stops. With --keep the node stays up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
keep=${1:-}
addr=127.0.0.1:${PFSYNCD_DEMO_PORT:-7070}
.venv/bin/pfsyncd --capture lo --control "$addr" &
node=$!
trap 'kill $node 2>/dev/null; wait $node 2>/dev/null || true' EXIT
for _ in $(seq 50); do .venv/bin/pfctl -N "$addr" -s info >/dev/null 2>&1 && break; sleep 0.1; done
.venv/bin/python - <<'PY'
import socket, threading
srv = socket.create_server(("127.0.0.1", 0))
port = srv.getsockname()[1]
def serve():
    for _ in range(3):
        conn, _ = srv.accept()
        conn.sendall(conn.recv(1024).upper())
        conn.close()
threading.Thread(target=serve, daemon=True).start()
for i in range(3):
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"hello pf %d" % i)
        c.recv(1024)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"ping", ("127.0.0.1", 9))
print(f"made 3 TCP connections to port {port} and sent one UDP datagram")
PY
sleep 0.5
echo "--- pfctl -s states -v"
.venv/bin/pfctl -N "$addr" -s states -v
echo "--- pfctl -s info"
.venv/bin/pfctl -N "$addr" -s info
echo "--- pfsysctl: the closed connections are vestigial records (loopback: TIME_WAIT 2 s)"
.venv/bin/pfsysctl -N "$addr" net.inet.tcp.vtw.stats.ins net.inet.tcp.vtw.stats.class.ipv4.loopback
sleep 2.5
echo "--- 2.5 s later: the records expired"
.venv/bin/pfsysctl -N "$addr" net.inet.tcp.vtw.stats.del net.inet.tcp.vtw.stats.class.ipv4.loopback.inuse
.venv/bin/pfctl -N "$addr" -s states
if [ "$keep" = "--keep" ]; then
    echo "node running on $addr (pfctl -N $addr ...); Ctrl-C to stop"
    wait $node
fi
