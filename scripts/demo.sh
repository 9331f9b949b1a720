#!/usr/bin/env bash
# The main job: two paired pfsyncd nodes keeping one state table. Node A captures the
# loopback interface (needs root) and replicates every state change to node B over
# pfsync/gRPC; B only listens to A. Real TCP/UDP connections made with the kernel's own
# stack show up on both; then A is killed (kill -9) and B still holds every connection.
# With --keep, B stays up at the end until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
keep=${1:-}
base=${PFSYNCD_DEMO_PORT:-7070}
a_ctl=127.0.0.1:$base a_sync=127.0.0.1:$((base + 1))
b_ctl=127.0.0.1:$((base + 2)) b_sync=127.0.0.1:$((base + 3))
bin=.venv/bin
# Loopback TIME_WAIT is 2 x 1 s; 2 x 5 s leaves time to watch the closed connections.
mslt="--sysctl net.inet.tcp.mslt.loopback=5"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

$bin/pfsyncd --hostid a1 --capture lo --control "$a_ctl" --sync-listen "$a_sync" $mslt &
pids+=($!)
a_pid=$!
$bin/pfsyncd --hostid b2 --control "$b_ctl" --sync-listen "$b_sync" --peer "$a_sync" $mslt &
pids+=($!)
for _ in $(seq 100); do
    $bin/pfctl -N "$b_ctl" -s sync 2>/dev/null | grep -q "pfsync: ready" && break
    sleep 0.1
done
if ! kill -0 "$a_pid" 2>/dev/null || ! $bin/pfctl -N "$a_ctl" -s sync >/dev/null 2>&1; then
    echo "demo: node A did not start (ports $base..$((base + 3)) in use? set PFSYNCD_DEMO_PORT)" >&2
    exit 1
fi

# Real connections: three stay open (ESTABLISHED), three close (TIME_WAIT records, 10 s
# here), one UDP exchange. The server port tells them apart below.
port_file=$(mktemp)
$bin/python - "$port_file" <<'PY' &
import socket, sys, threading, time
srv = socket.create_server(("127.0.0.1", 0))
port = srv.getsockname()[1]
kept = []
def serve():
    while True:
        conn, _ = srv.accept()
        data = conn.recv(1024)
        conn.sendall(data.upper())
        if data.startswith(b"bye"):
            conn.close()
        else:
            kept.append(conn)
threading.Thread(target=serve, daemon=True).start()
clients = []
for i in range(3):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"hello pf %d" % i)
    c.recv(1024)
    clients.append(c)
for i in range(3):
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"bye %d" % i)
        c.recv(1024)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
u.sendto(b"ping", ("127.0.0.1", port))
open(sys.argv[1], "w").write(str(port))
print(f"made 3 open and 3 closed TCP connections to port {port}, and one UDP datagram")
time.sleep(3600)  # keep the open connections open until the demo ends
PY
pids+=($!)
for _ in $(seq 100); do [ -s "$port_file" ] && break; sleep 0.1; done
port=$(cat "$port_file")
rm -f "$port_file"
sleep 0.5
show() { $bin/pfctl -N "$1" -s states | grep -E "[:.]$port( |$)" || true; }

echo "--- node A (capturing lo): pfctl -s states, the demo's connections"
show "$a_ctl"
echo "--- node B (its peer): the same states, replicated"
show "$b_ctl"
echo "--- pfctl -s sync on A (lag: from a change to B's acknowledgement) and on B"
$bin/pfctl -N "$a_ctl" -s sync
$bin/pfctl -N "$b_ctl" -s sync
echo "--- kill -9 node A (the active firewall dies)"
kill -9 "$a_pid"
wait "$a_pid" 2>/dev/null || true
sleep 0.5
echo "--- node B still holds every connection (the closed ones until their TIME_WAIT ends)"
show "$b_ctl"
$bin/pfctl -N "$b_ctl" -s sync | head -1
if [ "$keep" = "--keep" ]; then
    echo "node B running on $b_ctl (pfctl -N $b_ctl ...); Ctrl-C to stop"
    wait
fi
