// A pfsyncd API client written the way a newcomer would: @grpc/grpc-js and
// @grpc/proto-loader with proto-loader's DEFAULT options, loading only proto/.
//
// Usage: node client.js HOST:PORT
// Prints one JSON document on stdout: what it listed, read, set, killed and checked.
// tests/test_api_node.py runs it against a real node and checks the node's real state.
//
// With default options, field names are camelCase (src_address -> srcAddress), 64-bit
// integers arrive as Long objects, enums as numbers, fields
// at their zero value are left out, and a oneof shows only its set member. State ids are
// hex text in the API, so they pass back unchanged: no rounding whatever the client does
// with numbers.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "proto");
// The health service's proto is not in proto/; @grpc/grpc-js users commonly write it
// inline. Same definition as grpc/health/v1/health.proto.
const HEALTH_PROTO = `
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
`;

function load(files, includeDirs) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(files, { includeDirs }));
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function listStates(client, request) {
  return new Promise((resolve, reject) => {
    const states = [];
    const call = client.ListStates(request);
    call.on("data", (chunk) => states.push(...chunk.states));
    call.on("error", reject);
    call.on("end", () => resolve(states));
  });
}

async function main() {
  const address = process.argv[2];
  if (!address) {
    console.error("usage: node client.js HOST:PORT");
    process.exit(2);
  }
  const creds = grpc.credentials.createInsecure();
  const pfsync = load(
    ["pfsync/v1/control.proto", "pfsync/v1/sysctl.proto", "pfsync/v1/tap.proto"],
    [PROTO_ROOT],
  ).pfsync.v1;
  const control = new pfsync.ControlService(address, creds);
  const sysctl = new pfsync.SysctlService(address, creds);
  const taps = new pfsync.TapService(address, creds);

  const fs = require("fs");
  const os = require("os");
  const healthFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "health-")), "health.proto");
  fs.writeFileSync(healthFile, HEALTH_PROTO);
  const health = new (load([healthFile], []).grpc.health.v1.Health)(address, creds);

  const out = {};

  // Health per service.
  out.health = {};
  for (const service of ["", "pfsync.v1.ControlService", "pfsync.v1.SysctlService"]) {
    out.health[service] = (await unary(health, "Check", { service })).status;
  }

  // Watch the table's changes (like conntrack -E) while the rest runs; the first
  // message (no events) says the watch is in place.
  const events = [];
  const watch = control.WatchStates({});
  await new Promise((resolve, reject) => {
    watch.once("data", resolve);
    watch.once("error", reject);
  });
  watch.on("data", (msg) => events.push(...msg.events));
  watch.on("error", () => {}); // cancelled at the end

  // List states; filter by a text address.
  const states = await listStates(control, {});
  out.states = states.map((s) => ({
    id: s.id,
    creatorid: s.creatorid,
    af: s.af,
    proto: s.proto,
    src_address: s.srcAddress,
    dst_address: s.dstAddress,
    src_port: s.srcPort,
    dst_port: s.dstPort,
    src_state: s.src.tcpState ?? s.src.udpState ?? s.src.icmpState,
    vestigial: Boolean(s.vestigial),
    // A uint64 counter with default options: a Long object; its text is exact.
    src_packets: String(s.src.packets),
    src_packets_type: typeof s.src.packets,
  }));
  const victim = states.find((s) => !s.vestigial && s.proto === 17) || states[0];
  out.by_address = (await listStates(control, { address: victim.srcAddress })).map((s) => s.id);

  // Read and set a sysctl.
  const name = "net.inet.tcp.mslt.remote";
  const before = (await unary(sysctl, "GetSysctl", { name })).node;
  const set = await unary(sysctl, "SetSysctl", { name, value: "42" });
  out.sysctl = {
    type: before.type,
    before: String(before.integer),
    previous: String(set.previous.integer),
    after: String(set.node.integer),
  };

  // Kill one state by its id (text, passed back unchanged).
  const found = await listStates(control, { id: victim.id, creatorid: victim.creatorid });
  const killed = await unary(control, "KillStates", { id: victim.id, creatorid: victim.creatorid });
  out.kill = { id: victim.id, creatorid: victim.creatorid, found: found.length, killed: killed.killed };
  out.after_kill = (await listStates(control, { id: victim.id, creatorid: victim.creatorid })).length;

  // Attach a tap to "inject", feed one frame, read it back from the packed records
  // (tap.proto: 20-byte little-endian header, then the frame).
  // Ethernet, IPv4 192.0.2.1:1234 -> 192.0.2.2:53, UDP "hihi" (tests/packets.py udp()).
  const frame = Buffer.from(
    "0000000000000000000000000800450000200000000040110000c0000201c000020204d20035000c000068696869",
    "hex",
  );
  const tap = taps.Attach({ interface: "inject", filter: "udp port 53", command: "client.js" });
  const tapped = await new Promise((resolve, reject) => {
    let attached = false;
    tap.on("data", (msg) => {
      if (!attached) {
        attached = true;
        unary(control, "Inject", { frames: [{ linktype: 1, data: frame }] }).catch(reject);
        return;
      }
      const rec = msg.records;
      resolve({
        frame_count: msg.frameCount,
        length: rec.readUInt32LE(8),
        caplen: rec.readUInt32LE(12),
        linktype: rec.readUInt16LE(16),
        same_bytes: rec.subarray(20, 20 + rec.readUInt32LE(12)).equals(frame),
        time_ms: Number(rec.readBigInt64LE(0) / 1000000n),
        captured: String(msg.counters.captured),
      });
    });
    tap.on("error", reject);
  });
  tap.cancel();
  out.tap = tapped;
  out.tap.now_ms = Date.now();

  // Bad input: one-line INVALID_ARGUMENT.
  try {
    await listStates(control, { address: "not-an-address" });
    out.bad_address = null;
  } catch (err) {
    out.bad_address = { code: err.code, details: err.details };
  }

  // The watch saw the kill (and the inserts of the injected frame's state).
  await new Promise((resolve) => setTimeout(resolve, 300));
  watch.cancel();
  out.events = events.map((e) => ({
    kind: e.kind,
    id: e.state.id,
    reason: e.reason || "",
    src_address: e.state.srcAddress,
  }));

  process.stdout.write(JSON.stringify(out, null, 2) + "\n");
  for (const client of [control, sysctl, taps, health]) client.close();
}

main().catch((err) => {
  console.error(`client.js: ${err.message}`);
  process.exit(1);
});
