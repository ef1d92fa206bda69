"""A pyfaktory Consumer for the jobtypes named on the command line, each handled by the part of
its name after the last dot:
  ok    appends "<tag>:<i>\n" to the file named by env OUT (args [i, tag, ...])
  slow  sleeps args[2] seconds, then does what ok does
  boom  raises RuntimeError("boom <tag>:<i>")
Lines are written with one write(2) on an O_APPEND descriptor, so concurrent handler processes
never interleave them.

usage: worker.py [--concurrency N] [--queue Q]... JOBTYPE...
env:   FAKTORY_URL, OUT
"""

import argparse
import logging
import os
import sys
import time

from pyfaktory import Client, Consumer


def record(i, tag):
    fd = os.open(os.environ["OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag}:{i}\n".encode())
    finally:
        os.close(fd)


# pebble runs handlers in a process pool: module-level functions only.
def ok(i, tag, *_):
    record(i, tag)


def slow(i, tag, seconds=1, *_):
    time.sleep(seconds)
    record(i, tag)


def boom(i, tag, *_):
    raise RuntimeError(f"boom {tag}:{i}")


HANDLERS = {"ok": ok, "slow": slow, "boom": boom}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--queue", action="append")
    p.add_argument("jobtypes", nargs="+")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # pyfaktory documents 5-60 s but does not enforce it (its check builds a ValueError without
    # raising it): beat every second, so a killed worker is noticed quickly.
    with Client(faktory_url=os.environ["FAKTORY_URL"], role="consumer", beat_period=1) as client:
        consumer = Consumer(client=client, queues=a.queue or ["default"], concurrency=a.concurrency, grace_period=2)
        for jobtype in a.jobtypes:
            consumer.register(jobtype, HANDLERS[jobtype.rsplit(".", 1)[-1]])
        print(f"worker {client.worker_id} running", flush=True)
        consumer.run()


if __name__ == "__main__":
    main()
