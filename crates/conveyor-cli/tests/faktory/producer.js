// Pushes COUNT jobs of JOBTYPE to QUEUE with faktory-worker: the first half one PUSH at a time,
// the rest in one PUSHB. Each job's args are [i, tag, sleep_s]. Prints one JSON line on stdout:
// {"pushed": n, "jids": [...], "bulk_rejected": {jid: reason}, "info": INFO}.
//
// usage: node producer.js JOBTYPE COUNT QUEUE [--tag T] [--sleep S] [--retry N] [--bad-jid]
// env:   FAKTORY_URL (tcp://:TOKEN@127.0.0.1:PORT); NODE_PATH finds faktory-worker.
// --bad-jid adds one job with the invalid jid "abc" (args [-1, tag, sleep]) to the bulk.
"use strict";
const crypto = require("crypto");
const faktory = require("faktory-worker");

function parse(argv) {
  const [jobtype, count, queue, ...rest] = argv;
  if (!jobtype || !count || !queue) throw new Error("usage: producer.js JOBTYPE COUNT QUEUE [options]");
  const a = { jobtype, count: Number(count), queue, tag: "t", sleep: 0, retry: undefined, badJid: false };
  for (let i = 0; i < rest.length; i++) {
    switch (rest[i]) {
      case "--tag": a.tag = rest[++i]; break;
      case "--sleep": a.sleep = Number(rest[++i]); break;
      case "--retry": a.retry = Number(rest[++i]); break;
      case "--bad-jid": a.badJid = true; break;
      default: throw new Error(`unknown option ${rest[i]}`);
    }
  }
  return a;
}

async function main() {
  const a = parse(process.argv.slice(2));
  const client = await faktory.connect({ url: process.env.FAKTORY_URL });
  try {
    const half = Math.floor(a.count / 2);
    const jids = [];
    let pushed = 0;
    for (let i = 0; i < half; i++) {
      const job = client.job(a.jobtype, i, a.tag, a.sleep);
      job.queue = a.queue;
      if (a.retry !== undefined) job.retry = a.retry;
      jids.push(await job.push());
      pushed += 1;
    }
    const bulk = [];
    const payload = (jid, i) => {
      const p = { jid, jobtype: a.jobtype, args: [i, a.tag, a.sleep], queue: a.queue };
      if (a.retry !== undefined) p.retry = a.retry;
      return p;
    };
    for (let i = half; i < a.count; i++) bulk.push(payload(crypto.randomUUID(), i));
    if (a.badJid) bulk.push(payload("abc", -1));
    const rejected = bulk.length ? await client.pushBulk(bulk) : {};
    for (const p of bulk) {
      if (!(p.jid in rejected)) {
        pushed += 1;
        jids.push(p.jid);
      }
    }
    const reasons = Object.fromEntries(Object.entries(rejected).map(([jid, r]) => [jid, r.reason]));
    const info = await client.info();
    process.stdout.write(JSON.stringify({ pushed, jids, bulk_rejected: reasons, info }) + "\n");
  } finally {
    await client.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
