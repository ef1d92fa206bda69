#!/usr/bin/env python3
"""Faktory PUSHB throughput against a running Conveyor (no tokens, loopback).

usage: faktory-pushb.py BATCH CONNECTIONS BATCHES [PORT=7419]

Each connection sends BATCHES `PUSHB` commands of BATCH jobs (built before the clock starts, so
the client's JSON encoding is not measured) and checks every answer is `{}` (all accepted).
Prints the jobs pushed per second.
"""

import json
import socket
import sys
import threading
import time


def main():
    batch, connections, batches = (int(a) for a in sys.argv[1:4])
    port = int(sys.argv[4]) if len(sys.argv) > 4 else 7419
    lines = {
        c: [
            (
                "PUSHB "
                + json.dumps(
                    [{"jid": f"b{c:02d}{b:05d}{i:05d}", "jobtype": "bulk.job", "args": [i, "x"], "queue": "bulk"} for i in range(batch)],
                    separators=(",", ":"),
                )
                + "\r\n"
            ).encode()
            for b in range(batches)
        ]
        for c in range(connections)
    }

    def work(c):
        s = socket.create_connection(("127.0.0.1", port))
        f = s.makefile("rb")
        f.readline()  # +HI
        s.sendall(b'HELLO {"v":2}\r\n')
        assert f.readline() == b"+OK\r\n"
        for line in lines[c]:
            s.sendall(line)
            head = f.readline()
            if not head.startswith(b"$"):
                raise SystemExit(f"PUSHB failed: {head!r}")
            body = f.read(int(head[1:]) + 2)
            assert body.startswith(b"{}"), body[:200]

    threads = [threading.Thread(target=work, args=(c,)) for c in range(connections)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"PUSHB {batch * connections * batches / (time.time() - start):.0f} jobs/s")


if __name__ == "__main__":
    main()
