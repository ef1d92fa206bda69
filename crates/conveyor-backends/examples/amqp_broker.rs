//! What the RabbitMQ broker itself carries on this machine, with a plain client and none of
//! Conveyor: persistent messages with publisher confirms into a durable priority queue (the
//! arguments Conveyor declares), consumed with manual acknowledgements. The yardstick for the
//! queue on RabbitMQ (`make bench-amqp`): `make bench-amqp-broker`.
//!
//! `cargo run --release -p conveyor-backends --example amqp_broker -- [JOBS] [PUBLISHERS] [CONSUMERS]`
//! (defaults 100,000, 4, 4); `AMQP_URL` as for `bench-amqp`.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

/// Publishes in windows of this many unconfirmed messages per publisher, as Conveyor's enqueue
/// waits for a batch's confirms.
const WINDOW: usize = 1_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("JOBS PUBLISHERS CONSUMERS are numbers")).collect();
    let jobs = args.first().copied().unwrap_or(100_000);
    let publishers = args.get(1).copied().unwrap_or(4).max(1);
    let consumers = args.get(2).copied().unwrap_or(4).max(1);
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = format!("broker-bench-{}", std::process::id());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let admin = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongInt(9));
    admin.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args).await?;

    // Publish: each publisher its own channel with confirms, windows of WINDOW in flight.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let (queue, n) = (queue.clone(), jobs / publishers + usize::from(p < jobs % publishers));
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < n {
                let mut confirms = Vec::with_capacity(WINDOW);
                for i in sent..(sent + WINDOW).min(n) {
                    let body = format!(r#"{{"id":"{p}-{i}","queue":"bench","priority":0}}"#);
                    let props =
                        BasicProperties::default().with_delivery_mode(2).with_priority(4).with_content_type("application/json".into());
                    confirms.push(
                        ch.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), props).await?,
                    );
                }
                sent += confirms.len();
                for c in confirms {
                    if let Confirmation::Nack(_) = c.await? {
                        panic!("the broker refused a message");
                    }
                }
            }
            Ok::<_, lapin::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let published = started.elapsed();

    // Consume: manual acknowledgements, prefetch 1,000 per consumer.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..consumers {
        let ch = conn.create_channel().await?;
        ch.basic_qos(1_000, BasicQosOptions::default()).await?;
        let n = jobs / consumers + usize::from(c < jobs % consumers);
        let mut consumer = ch
            .basic_consume(queue.as_str().into(), format!("c{c}").as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < n {
                let delivery = consumer.next().await.expect("the consumer ended")?;
                delivery.ack(BasicAckOptions::default()).await?;
                got += 1;
            }
            ch.close(200, "done".into()).await?;
            Ok::<_, lapin::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let consumed = started.elapsed();
    admin.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    println!(
        "broker: jobs={jobs} publish_per_s={:.0} (persistent, confirmed, {publishers} publishers) consume_per_s={:.0} (manual acks, {consumers} consumers)",
        jobs as f64 / published.as_secs_f64(),
        jobs as f64 / consumed.as_secs_f64()
    );
    Ok(())
}
