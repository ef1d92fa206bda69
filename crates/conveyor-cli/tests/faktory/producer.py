"""Pushes COUNT jobs of JOBTYPE to QUEUE with pyfaktory: the first half one PUSH at a time, the
rest in one PUSHB. Each job's args are [i, tag, sleep_s]. Prints one JSON line on stdout:
{"pushed": n, "jids": [...], "bulk_rejected": {jid: reason}, "info": INFO}.

usage: producer.py JOBTYPE COUNT QUEUE [--tag T] [--sleep S] [--retry N] [--bad-jid]
env:   FAKTORY_URL (tcp://:TOKEN@127.0.0.1:PORT)
--bad-jid adds one job with the invalid jid "abc" (args [-1, tag, sleep]) to the bulk, built
without pydantic's validation, for the server to reject.
"""

import argparse
import json
import os

from pyfaktory import Client, Job, Producer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("jobtype")
    p.add_argument("count", type=int)
    p.add_argument("queue")
    p.add_argument("--tag", default="t")
    p.add_argument("--sleep", type=float, default=0)
    p.add_argument("--retry", type=int)
    p.add_argument("--bad-jid", action="store_true")
    a = p.parse_args()

    extra = {} if a.retry is None else {"retry": a.retry}

    def job(i):
        return Job(jobtype=a.jobtype, args=[i, a.tag, a.sleep], queue=a.queue, **extra)

    with Client(faktory_url=os.environ["FAKTORY_URL"], role="producer") as client:
        producer = Producer(client=client)
        jobs = [job(i) for i in range(a.count)]
        half = a.count // 2
        pushed, jids = 0, []
        for j in jobs[:half]:
            producer.push(j)
            pushed += 1
            jids.append(j.jid)
        bulk = jobs[half:]
        if a.bad_jid:
            bulk.append(
                Job.model_construct(
                    jid="abc", jobtype=a.jobtype, args=[-1, a.tag, a.sleep], queue=a.queue, **extra
                )
            )
        rejected = producer.push_bulk(bulk) if bulk else {}
        for j in bulk:
            if j.jid not in rejected:
                pushed += 1
                jids.append(j.jid)
        info = client.info()
    print(json.dumps({"pushed": pushed, "jids": jids, "bulk_rejected": rejected, "info": info}), flush=True)


if __name__ == "__main__":
    main()
