// A faktory-worker process for the jobtypes named on the command line, each handled by the part
// of its name after the last dot:
//   ok    appends "<tag>:<i>\n" to the file named by env OUT (args [i, tag, ...])
//   slow  sleeps args[2] seconds, then does what ok does
//   boom  throws Error("boom <tag>:<i>")
// Each line is one write(2) on an O_APPEND descriptor.
//
// usage: node worker.js [--concurrency N] [--queue Q]... JOBTYPE...
// env:   FAKTORY_URL, OUT; NODE_PATH finds faktory-worker.
"use strict";
const fs = require("fs");
const faktory = require("faktory-worker");

function record(i, tag) {
  fs.appendFileSync(process.env.OUT, `${tag}:${i}\n`);
}

const HANDLERS = {
  ok: async (i, tag) => record(i, tag),
  slow: async (i, tag, seconds) => {
    await new Promise((resolve) => setTimeout(resolve, (seconds || 1) * 1000));
    record(i, tag);
  },
  boom: async (i, tag) => {
    throw new Error(`boom ${tag}:${i}`);
  },
};

async function main() {
  const argv = process.argv.slice(2);
  let concurrency = 4;
  const queues = [];
  const jobtypes = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--concurrency") concurrency = Number(argv[++i]);
    else if (argv[i] === "--queue") queues.push(argv[++i]);
    else jobtypes.push(argv[i]);
  }
  if (!jobtypes.length) throw new Error("usage: worker.js [--concurrency N] [--queue Q]... JOBTYPE...");
  for (const jobtype of jobtypes) {
    const handler = HANDLERS[jobtype.split(".").pop()];
    if (!handler) throw new Error(`no handler for ${jobtype}`);
    faktory.register(jobtype, handler);
  }
  const worker = await faktory.work({
    url: process.env.FAKTORY_URL,
    queues: queues.length ? queues : ["default"],
    concurrency,
    beatInterval: 1,
    timeout: 2,
  });
  worker.on("fail", ({ job, error }) => console.error(`FAIL ${job.jid} ${job.jobtype}: ${error.message}`));
  worker.on("error", (e) => console.error("worker error:", e));
  console.log(`worker ${worker.wid} running`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
