//! One-shot administration commands: `migrate`, `queue …`, `failed …`. Results go to stdout
//! (a table, or JSON with `--json`); errors to stderr.

use std::collections::HashMap;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use conveyor_core::backend::{FailedJob, Page, QueueStats};
use conveyor_core::job::{validate_queue_name, JobId};

use crate::cli::config::Config;
use crate::cli::run::open_backend;

#[derive(Subcommand)]
pub(crate) enum QueueCommand {
    /// Queues with pending, delayed, reserved, failed, paused, jobs per minute, oldest wait
    List(JsonFlag),
    /// Delete the pending and delayed jobs of a queue (or of every queue)
    Clear {
        #[arg(long)]
        queue: Option<String>,
    },
    /// Stop handing out jobs of a queue
    Pause { queue: String },
    /// Hand out jobs of a paused queue again
    Resume { queue: String },
}

#[derive(Subcommand)]
pub(crate) enum FailedCommand {
    /// Failed jobs, newest first
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 1)]
        page: u32,
        #[arg(long, default_value_t = 50)]
        per_page: u32,
        #[arg(long)]
        json: bool,
    },
    /// One failed job with its payload and error
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put failed jobs back on their queue (IDs, or `all`)
    Retry {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete a failed job
    Forget { id: String },
    /// Delete every failed job
    Flush,
}

#[derive(Args)]
pub(crate) struct JsonFlag {
    /// Print one JSON document
    #[arg(long)]
    json: bool,
}

pub(crate) async fn migrate(config: &Config) -> anyhow::Result<()> {
    // Opening the store applies the engine's migrations; then the applications' own.
    let backend = crate::cli::run::open_store(config).await?;
    backend.ping().await?;
    println!("migrated: {} store at {} is up to date", backend.name(), conveyor_core::redact::url(&config.database_url));
    Ok(())
}

pub(crate) async fn queue(config: &Config, cmd: QueueCommand) -> anyhow::Result<()> {
    if let QueueCommand::Pause { queue } | QueueCommand::Resume { queue } = &cmd {
        validate_queue_name(queue).map_err(|e| anyhow::anyhow!("queue {queue:?}: {e}"))?;
    }
    let backend = open_backend(config)?;
    match cmd {
        QueueCommand::List(f) => {
            let queues = backend.queues().await?;
            let workers = workers_per_queue(&backend.workers(std::time::Duration::from_secs(30)).await?);
            if f.json {
                let rows: Vec<serde_json::Value> = queues
                    .iter()
                    .map(|q| {
                        let mut v = serde_json::to_value(q).expect("queue stats serialize");
                        v["workers"] = workers.get(&q.queue).copied().unwrap_or(0).into();
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_queues(&queues, &workers);
            }
        }
        QueueCommand::Clear { queue } => {
            let names: Vec<String> = match queue {
                Some(q) => {
                    validate_queue_name(&q).map_err(|e| anyhow::anyhow!("--queue: {e}"))?;
                    vec![q]
                }
                None => backend.queues().await?.into_iter().map(|q| q.queue).collect(),
            };
            for q in names {
                let n = backend.clear(&q).await?;
                println!("cleared {n} jobs from {q}");
            }
        }
        QueueCommand::Pause { queue } => {
            backend.pause(&queue).await?;
            println!("paused {queue}");
        }
        QueueCommand::Resume { queue } => {
            backend.resume(&queue).await?;
            println!("resumed {queue}");
        }
    }
    Ok(())
}

/// Executors serving each queue across live workers (a pool over several queues counts for each).
fn workers_per_queue(workers: &[conveyor_core::backend::WorkerInfo]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for pool in workers.iter().flat_map(|w| &w.supervisors).flat_map(|s| &s.pools) {
        for q in &pool.queues {
            *out.entry(q.clone()).or_default() += pool.workers;
        }
    }
    out
}

fn print_queues(queues: &[QueueStats], workers: &HashMap<String, usize>) {
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10} {:>8}",
        "QUEUE", "PENDING", "DELAYED", "RESERVED", "FAILED", "PAUSED", "PER_MIN", "WAIT_S", "WORKERS"
    );
    for q in queues {
        println!(
            "{:<24} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10.1} {:>8}",
            q.queue,
            q.pending,
            q.delayed,
            q.reserved,
            q.failed,
            if q.paused { "yes" } else { "no" },
            q.per_minute,
            q.oldest_wait_s,
            workers.get(&q.queue).copied().unwrap_or(0)
        );
    }
    if queues.is_empty() {
        println!("(no queues yet)");
    }
}

fn parse_id(id: &str) -> anyhow::Result<JobId> {
    id.parse::<JobId>().map_err(|_| anyhow::anyhow!("{id:?} is not a job id (expected a UUID)"))
}

pub(crate) async fn failed(config: &Config, cmd: FailedCommand) -> anyhow::Result<()> {
    let backend = open_backend(config)?;
    match cmd {
        FailedCommand::List { queue, page, per_page, json } => {
            if page == 0 || !(1..=1000).contains(&per_page) {
                bail!("--page starts at 1 and --per-page is 1 to 1000");
            }
            let list = backend.failed(queue.as_deref(), Page::new(page, per_page)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.items)?);
            } else {
                print_failed(&list.items, list.total);
            }
        }
        FailedCommand::Show { id, json } => {
            let id = parse_id(&id)?;
            let job = backend.failed_job(id).await?.with_context(|| format!("no failed job {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                println!(
                    "id:        {}\nqueue:     {}\nkind:      {}\nattempts:  {}/{}\nfailed at: {}\nerror:     {}\npayload:   {}",
                    job.id,
                    job.queue,
                    job.kind,
                    job.attempts,
                    job.max_attempts,
                    fmt_ms(job.failed_at),
                    job.error,
                    job.payload
                );
            }
        }
        FailedCommand::Retry { ids } => {
            if ids.len() == 1 && ids[0] == "all" {
                let n = backend.retry_all_failed(None).await?;
                println!("retried {n} failed jobs");
            } else {
                let parsed = ids.iter().map(|i| parse_id(i)).collect::<anyhow::Result<Vec<_>>>()?;
                let retried = backend.retry_failed(parsed.clone()).await?;
                for id in &retried {
                    println!("retried {id}");
                }
                let missing: Vec<String> = parsed.iter().filter(|id| !retried.contains(id)).map(|id| id.to_string()).collect();
                if !missing.is_empty() {
                    bail!("no failed job {}", missing.join(", "));
                }
            }
        }
        FailedCommand::Forget { id } => {
            let id = parse_id(&id)?;
            if !backend.forget_failed(id).await? {
                bail!("no failed job {id}");
            }
            println!("forgot {id}");
        }
        FailedCommand::Flush => {
            let n = backend.flush_failed(None).await?;
            println!("flushed {n} failed jobs");
        }
    }
    Ok(())
}

fn print_failed(items: &[FailedJob], total: u64) {
    println!("{:<36}  {:<16} {:<24} {:>8}  {:<20}  ERROR", "ID", "QUEUE", "KIND", "ATTEMPTS", "FAILED_AT");
    for j in items {
        let error: String = j.error.lines().next().unwrap_or_default().chars().take(60).collect();
        println!(
            "{:<36}  {:<16} {:<24} {:>8}  {:<20}  {}",
            j.id,
            j.queue,
            j.kind,
            format!("{}/{}", j.attempts, j.max_attempts),
            fmt_ms(j.failed_at),
            error
        );
    }
    println!("({} of {total} failed jobs)", items.len());
}

fn fmt_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::fmt_ms;

    #[test]
    fn failed_at_reads_as_utc_to_the_second() {
        assert_eq!(fmt_ms(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_ms(-1), "1969-12-31 23:59:59");
        assert_eq!(fmt_ms(1_767_323_045_678), "2026-01-02 03:04:05");
        assert_eq!(fmt_ms(i64::MAX), "");
    }
}
