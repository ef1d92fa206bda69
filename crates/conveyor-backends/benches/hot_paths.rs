//! Criterion benchmarks of the SQLite backend's hot paths: a batched enqueue, and a
//! reserve-then-acknowledge cycle, each through the writer's group commit.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
use conveyor_core::backend::Queue;
use conveyor_core::backend::ReserveRequest;
use conveyor_core::job::{Completion, Outcome};
use conveyor_core::NewJob;

const BATCH: usize = 500;

fn jobs(n: usize) -> Vec<NewJob> {
    (0..n).map(|i| NewJob::raw("bench", format!("{{\"i\":{i}}}")).queue("bench")).collect()
}

fn backend(dir: &tempfile::TempDir) -> Arc<SqliteBackend> {
    let mut o = SqliteOptions::new(dir.path().join("bench.db").to_string_lossy().to_string());
    o.completed_history = 1_000;
    Arc::new(SqliteBackend::open(o).unwrap())
}

fn hot_paths(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&dir);

    let mut g = c.benchmark_group("sqlite");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("enqueue_batch_500", |bench| {
        bench.iter(|| rt.block_on(b.enqueue(jobs(BATCH))).unwrap());
    });
    rt.block_on(b.clear("bench")).unwrap();

    g.bench_function("reserve_and_ack_500", |bench| {
        bench.iter_batched(
            || rt.block_on(b.enqueue(jobs(BATCH))).unwrap(),
            |_| {
                rt.block_on(async {
                    let req =
                        ReserveRequest { queues: vec!["bench".into()], max: BATCH, lease: Duration::from_secs(30), worker: "bench".into() };
                    let got = b.reserve(req).await.unwrap();
                    let done: Vec<Completion> = got.iter().map(|j| Completion::of(j, Outcome::Completed)).collect();
                    b.complete(done).await.unwrap();
                })
            },
            criterion::BatchSize::PerIteration,
        );
    });
    g.finish();
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
