//! The cache ([`conveyor_core::cache::Cache`]) and sorted sets ([`SortedSet`]) on the store.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use conveyor_core::cache::{add_in, incr_in, Cache, Ranked, SortedSet};

use super::*;

pub async fn cache_put_get_expire_forget_and_remember(b: Backend) {
    let cache = Cache::new(b.clone());
    let p = unique_name("cache");
    let key = format!("{p}:user:1");

    assert_eq!(cache.get::<Value>(&key).await.unwrap(), None, "a missing key");
    cache.put(&key, &json!({ "name": "Ada" }), None).await.unwrap();
    assert_eq!(cache.get::<Value>(&key).await.unwrap(), Some(json!({ "name": "Ada" })));
    cache.put(&key, &json!({ "name": "Grace" }), None).await.unwrap();
    assert_eq!(cache.get::<Value>(&key).await.unwrap(), Some(json!({ "name": "Grace" })), "put replaces");
    assert_eq!(cache.get::<u64>(&key).await.unwrap(), None, "a value that does not fit the type reads as missing");

    // A TTL: there until it passes, then gone.
    let ttl_key = format!("{p}:ttl");
    let put_at = Instant::now();
    cache.put(&ttl_key, &42u64, Some(Duration::from_millis(1_000))).await.unwrap();
    if put_at.elapsed() < Duration::from_millis(800) {
        assert_eq!(cache.get::<u64>(&ttl_key).await.unwrap(), Some(42), "within its TTL");
    }
    wait_until("the cached value expired", Duration::from_secs(5), || async { cache.get::<u64>(&ttl_key).await.unwrap().is_none() }).await;
    assert!(put_at.elapsed() >= Duration::from_millis(950), "a 1 s TTL expired after {:?}", put_at.elapsed());
    // Re-putting without a TTL makes it permanent again.
    cache.put(&ttl_key, &43u64, None).await.unwrap();
    assert_eq!(cache.get::<u64>(&ttl_key).await.unwrap(), Some(43));

    assert!(cache.forget(&key).await.unwrap(), "forgetting a key that is there");
    assert!(!cache.forget(&key).await.unwrap(), "forgetting it again");
    assert_eq!(cache.get::<Value>(&key).await.unwrap(), None);

    // forget_prefix: exactly the keys starting with the prefix.
    let family = format!("{p}:orders:");
    for k in ["1", "2", "2:items", ""] {
        cache.put(&format!("{family}{k}"), &k, None).await.unwrap();
    }
    let neighbours =
        [format!("{p}:orders"), format!("{p}:ordersx"), format!("{p}:order:1"), format!("{p}:orders;1"), format!("{p}:ORDERS:1")];
    for k in &neighbours {
        cache.put(k, &"keep", None).await.unwrap();
    }
    assert_eq!(cache.forget_prefix(&family).await.unwrap(), 4, "the four keys of the family");
    for k in ["1", "2", "2:items", ""] {
        assert_eq!(cache.get::<String>(&format!("{family}{k}")).await.unwrap(), None, "{family}{k} survived forget_prefix");
    }
    for k in &neighbours {
        assert_eq!(cache.get::<String>(k).await.unwrap().as_deref(), Some("keep"), "{k} does not start with {family}");
    }
    assert_eq!(cache.forget_prefix(&family).await.unwrap(), 0);

    // remember: computes on a miss, then serves the stored value.
    let computed = Arc::new(AtomicUsize::new(0));
    let compute = |v: u64| {
        let computed = computed.clone();
        move || async move {
            computed.fetch_add(1, SeqCst);
            Ok::<u64, BackendError>(v)
        }
    };
    let rkey = format!("{p}:report");
    assert_eq!(cache.remember(&rkey, None, compute(7)).await.unwrap(), 7);
    assert_eq!(cache.remember(&rkey, None, compute(8)).await.unwrap(), 7, "a hit returns the stored value");
    assert_eq!(cache.get::<u64>(&rkey).await.unwrap(), Some(7));
    assert_eq!(computed.load(SeqCst), 1, "computed once");
    cache.forget(&rkey).await.unwrap();
    assert_eq!(cache.remember(&rkey, None, compute(9)).await.unwrap(), 9, "a forgotten value is computed again");
    assert_eq!(computed.load(SeqCst), 2);
    // A failing computation stores nothing.
    let fkey = format!("{p}:failing");
    let failed = cache.remember::<u64, _, _>(&fkey, None, || async { Err(BackendError::Other("source down".into())) }).await;
    assert!(failed.is_err());
    assert_eq!(cache.get::<u64>(&fkey).await.unwrap(), None);
    // With a TTL, remember computes again once it passed.
    let tkey = format!("{p}:short");
    assert_eq!(cache.remember(&tkey, Some(Duration::from_millis(200)), compute(1)).await.unwrap(), 1);
    wait_until("the remembered value expired", Duration::from_secs(5), || async { cache.get::<u64>(&tkey).await.unwrap().is_none() }).await;
    assert_eq!(cache.remember(&tkey, Some(Duration::from_secs(60)), compute(2)).await.unwrap(), 2);
    assert_eq!(computed.load(SeqCst), 4);

    // prune deletes expired entries only.
    cache.put(&format!("{p}:gone"), &1u8, Some(Duration::from_millis(1))).await.unwrap();
    wait_until("the 1 ms entry expired", Duration::from_secs(5), || async {
        cache.get::<u8>(&format!("{p}:gone")).await.unwrap().is_none()
    })
    .await;
    assert!(cache.prune().await.unwrap() >= 1);
    assert_eq!(cache.get::<u64>(&ttl_key).await.unwrap(), Some(43), "prune keeps entries without a TTL");
}

/// `forget_prefix` forgets every key that starts with the prefix, whatever characters follow it.
pub async fn cache_forget_prefix_forgets_keys_with_any_suffix(b: Backend) {
    let cache = Cache::new(b.clone());
    let family = format!("{}:", unique_name("cache-edge"));
    let suffixes = ["a", "\u{FFFF}", "\u{1F600}", "\u{10FFFF}", "\u{10FFFF}\u{10FFFF}", "\u{10FFFF}z"];
    for s in suffixes {
        cache.put(&format!("{family}{s}"), &s, None).await.unwrap();
    }
    let n = cache.forget_prefix(&family).await.unwrap();
    let mut left = Vec::new();
    for s in suffixes {
        if cache.get::<String>(&format!("{family}{s}")).await.unwrap().is_some() {
            left.push(s.escape_unicode().to_string());
        }
    }
    assert!(left.is_empty(), "forget_prefix({family:?}) forgot {n} of {} keys; left the keys with suffixes {left:?}", suffixes.len());
    assert_eq!(n, suffixes.len() as u64);
}

fn ranked(rank: u64, member: &str, score: f64) -> Ranked {
    Ranked { rank, member: member.to_string(), score }
}

pub async fn sorted_set_scores_ranks_and_ties(b: Backend) {
    let z = SortedSet::new(b.clone(), unique_name("zset"));
    assert!(z.is_empty().await.unwrap());
    assert_eq!(z.top(10).await.unwrap(), []);
    assert_eq!(z.incr("alice", 5.0).await.unwrap(), 5.0, "incr creates a member at delta");
    assert_eq!(z.incr("alice", 2.5).await.unwrap(), 7.5, "incr adds");
    assert_eq!(z.incr("bob", 7.5).await.unwrap(), 7.5);
    z.set("carol", 10.0).await.unwrap();
    z.set("dave", 3.0).await.unwrap();
    z.set("dave", 7.5).await.unwrap();
    assert_eq!(z.incr("erin", -1.0).await.unwrap(), -1.0);
    z.set("aaron", 7.5).await.unwrap();
    assert_eq!(z.len().await.unwrap(), 6);
    assert_eq!(z.score("dave").await.unwrap(), Some(7.5), "set replaces the score");
    assert_eq!(z.score("nobody").await.unwrap(), None);

    // Equal scores rank by member, ascending.
    let want = vec![
        ranked(1, "carol", 10.0),
        ranked(2, "aaron", 7.5),
        ranked(3, "alice", 7.5),
        ranked(4, "bob", 7.5),
        ranked(5, "dave", 7.5),
        ranked(6, "erin", -1.0),
    ];
    assert_eq!(z.top(10).await.unwrap(), want);
    assert_eq!(z.top(3).await.unwrap(), want[..3]);
    for r in &want {
        assert_eq!(z.rank(&r.member).await.unwrap().as_ref(), Some(r), "rank agrees with top");
    }
    assert_eq!(z.rank("nobody").await.unwrap(), None);

    assert!(z.remove("alice").await.unwrap());
    assert!(!z.remove("alice").await.unwrap(), "removing a missing member");
    assert_eq!(z.rank("bob").await.unwrap(), Some(ranked(3, "bob", 7.5)));
    assert_eq!(z.top(10).await.unwrap().iter().map(|r| r.member.as_str()).collect::<Vec<_>>(), ["carol", "aaron", "bob", "dave", "erin"]);
    // Fractional and negative increments keep ranks consistent.
    assert_eq!(z.incr("erin", 8.75).await.unwrap(), 7.75);
    assert_eq!(z.rank("erin").await.unwrap(), Some(ranked(2, "erin", 7.75)));

    // Sets are independent of each other.
    let other = SortedSet::new(b.clone(), unique_name("zset"));
    other.set("carol", 1.0).await.unwrap();
    assert_eq!(z.score("carol").await.unwrap(), Some(10.0));
    assert_eq!(other.top(10).await.unwrap(), [ranked(1, "carol", 1.0)]);
}

pub async fn sorted_set_rebuild_is_atomic_and_incr_in_follows_the_transaction(b: Backend) {
    let name = unique_name("zset");
    let z = SortedSet::new(b.clone(), &name);
    let a: Vec<(String, f64)> = (0..30).map(|i| (format!("a{i:02}"), i as f64)).collect();
    let bb: Vec<(String, f64)> = (0..20).map(|i| (format!("b{i:02}"), (i % 4) as f64)).collect();
    let top_of = |entries: &[(String, f64)]| {
        let mut v = entries.to_vec();
        v.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        v.into_iter().enumerate().map(|(i, (m, s))| ranked(i as u64 + 1, &m, s)).collect::<Vec<_>>()
    };
    let (top_a, top_b) = (top_of(&a), top_of(&bb));
    z.rebuild(a.clone()).await.unwrap();
    assert_eq!(z.top(100).await.unwrap(), top_a);

    // Readers see the old set or the new one, never a mix or an empty set.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (z, stop, top_a, top_b) = (z.clone(), stop.clone(), top_a.clone(), top_b.clone());
        tokio::spawn(async move {
            let (mut reads, mut torn) = (0usize, Vec::new());
            while !stop.load(SeqCst) {
                let top = z.top(100).await.unwrap();
                reads += 1;
                if top != top_a && top != top_b && torn.len() < 3 {
                    torn.push(top.iter().map(|r| r.member.clone()).collect::<Vec<_>>());
                }
                tokio::task::yield_now().await;
            }
            (reads, torn)
        })
    };
    for i in 0..20 {
        z.rebuild(if i % 2 == 0 { bb.clone() } else { a.clone() }).await.unwrap();
    }
    stop.store(true, SeqCst);
    let (reads, torn) = reader.await.unwrap();
    assert!(reads > 0);
    assert!(torn.is_empty(), "a reader saw a half-rebuilt set ({reads} reads): {torn:?}");
    assert_eq!(z.top(100).await.unwrap(), top_a);
    z.rebuild(vec![]).await.unwrap();
    assert!(z.is_empty().await.unwrap(), "rebuilding with nothing empties the set");

    // incr_in: with the transaction or not at all.
    z.set("alice", 1.0).await.unwrap();
    let (set, table) = (name.clone(), table_name());
    create_notes_table(&b, &table).await;
    let sql = insert_note_sql(&table);
    let err = b
        .transact(move |tx| -> Result<(), BackendError> {
            tx.execute(&sql, &[SqlValue::from("order 1")])?;
            let inside = incr_in(tx, &set, "alice", 100.0)?;
            let created = incr_in(tx, &set, "zoe", 5.0)?;
            Err(BackendError::Other(format!("rolled back at {inside} and {created}")))
        })
        .await
        .expect_err("the closure's error");
    assert!(err.to_string().contains("rolled back at 101 and 5"), "incr_in returns the new score inside the transaction: {err}");
    assert_eq!(z.score("alice").await.unwrap(), Some(1.0), "a rolled-back incr_in changes nothing");
    assert_eq!(z.score("zoe").await.unwrap(), None, "a rolled-back incr_in creates nothing");
    assert_eq!(count_all_notes(&b, &table).await, 0);
    let (set, sql) = (name.clone(), insert_note_sql(&table));
    let score = b
        .transact(move |tx| {
            tx.execute(&sql, &[SqlValue::from("order 2")])?;
            incr_in(tx, &set, "alice", 100.0)
        })
        .await
        .unwrap();
    assert_eq!(score, 101.0);
    assert_eq!(z.score("alice").await.unwrap(), Some(101.0));
    assert_eq!(count_all_notes(&b, &table).await, 1);

    // add_in: the same without reading the score back.
    let set = name.clone();
    let err = b
        .transact(move |tx| -> Result<(), BackendError> {
            add_in(tx, &set, "alice", 7.0)?;
            Err(BackendError::Other("rolled back".into()))
        })
        .await;
    assert!(err.is_err());
    assert_eq!(z.score("alice").await.unwrap(), Some(101.0), "a rolled-back add_in changes nothing");
    let set = name.clone();
    b.transact(move |tx| {
        add_in(tx, &set, "alice", 7.0)?;
        add_in(tx, &set, "bea", 2.0)
    })
    .await
    .unwrap();
    assert_eq!(z.score("alice").await.unwrap(), Some(108.0));
    assert_eq!(z.score("bea").await.unwrap(), Some(2.0), "add_in creates a member");
}
