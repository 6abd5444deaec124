use std::sync::atomic::AtomicU32;
use std::time::Duration;

use super::*;

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::new(s).expect("a valid key")
}

#[test]
fn keys_are_checked_as_the_mesh_checks_them() {
    assert_eq!(key("order-42").as_str(), "order-42");
    assert!(IdempotencyKey::new("").is_err());
    assert!(IdempotencyKey::new("two words").is_err());
    assert!(IdempotencyKey::new(&"k".repeat(MAX_IDEMPOTENCY_KEY + 1)).is_err());
    assert_ne!(IdempotencyKey::random(), IdempotencyKey::random());
    let mut headers = HeaderMap::new();
    assert_eq!(
        IdempotencyKey::of(&headers).expect("no key is no error"),
        None
    );
    headers.insert(IDEMPOTENCY_KEY, "k1".parse().expect("value"));
    assert_eq!(
        IdempotencyKey::of(&headers).expect("valid"),
        Some(key("k1"))
    );
    headers.append(IDEMPOTENCY_KEY, "k2".parse().expect("value"));
    assert!(matches!(
        IdempotencyKey::of(&headers),
        Err(DedupeError::BadKey(_))
    ));
}

/// Runs `key` through `dedupe`, counting the runs in `runs`; each run takes `ms`.
async fn run_once(dedupe: &Dedupe, k: &str, runs: &Arc<AtomicU32>, ms: u64) -> Once {
    let runs = runs.clone();
    dedupe
        .once(&key(k), || async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::io::Error>(Bytes::from(format!("run {n}")))
        })
        .await
        .expect("carried out")
}

#[tokio::test]
async fn a_key_runs_once_and_its_repeats_get_its_record() {
    let dedupe = Dedupe::new(MemoryStore::default());
    let runs = Arc::new(AtomicU32::new(0));
    let first = run_once(&dedupe, "a", &runs, 0).await;
    assert_eq!(
        (first.record.as_ref(), first.replayed),
        (&b"run 1"[..], false)
    );
    let again = run_once(&dedupe, "a", &runs, 0).await;
    assert_eq!(
        (again.record.as_ref(), again.replayed),
        (&b"run 1"[..], true)
    );
    let other = run_once(&dedupe, "b", &runs, 0).await;
    assert_eq!(
        (other.record.as_ref(), other.replayed),
        (&b"run 2"[..], false)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn repeats_that_arrive_while_the_first_runs_wait_for_it() {
    let dedupe = Dedupe::new(MemoryStore::default());
    let runs = Arc::new(AtomicU32::new(0));
    let all = futures_join(
        (0..8)
            .map(|_| {
                let (dedupe, runs) = (dedupe.clone(), runs.clone());
                tokio::spawn(async move { run_once(&dedupe, "same", &runs, 50).await })
            })
            .collect(),
    )
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(all.iter().all(|o| o.record.as_ref() == b"run 1"));
    assert_eq!(all.iter().filter(|o| !o.replayed).count(), 1);
    assert!(dedupe.running.lock().is_empty(), "nothing left running");
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<Once>>) -> Vec<Once> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn a_request_dropped_while_it_runs_leaves_nothing_behind_and_its_key_runs_again() {
    let dedupe = Dedupe::new(MemoryStore::default());
    let runs = Arc::new(AtomicU32::new(0));
    let first = {
        let (dedupe, runs) = (dedupe.clone(), runs.clone());
        tokio::spawn(async move { run_once(&dedupe, "gone", &runs, 10_000).await })
    };
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    first.abort();
    assert!(first.await.is_err(), "aborted");
    assert!(
        dedupe.running.lock().is_empty(),
        "the dropped request's entry is gone"
    );
    let again = run_once(&dedupe, "gone", &runs, 0).await;
    assert!(!again.replayed && again.record.as_ref() == b"run 2");
    assert!(dedupe.running.lock().is_empty());
}

#[tokio::test]
async fn a_failed_run_stores_nothing_and_the_key_runs_again() {
    let dedupe = Dedupe::new(MemoryStore::default());
    let failed = dedupe
        .once(&key("k"), || async { Err::<Bytes, _>("disk full") })
        .await;
    assert!(matches!(failed, Err(DedupeError::Run(ref e)) if e == "disk full"));
    let runs = Arc::new(AtomicU32::new(0));
    assert!(!run_once(&dedupe, "k", &runs, 0).await.replayed);
    let big = dedupe
        .once(&key("big"), || async {
            Ok::<_, std::io::Error>(Bytes::from(vec![0; MAX_RECORD + 1]))
        })
        .await;
    assert!(matches!(big, Err(DedupeError::TooLarge(_))));
}

#[test]
fn memory_keeps_at_most_its_capacity_for_at_most_its_ttl() {
    let store = MemoryStore::new(2, Duration::from_secs(3600));
    for k in ["a", "b", "c"] {
        assert!(store.put_first(&key(k), Bytes::from(k)).expect("put").1);
    }
    assert_eq!(store.len(), 2);
    assert_eq!(store.get(&key("a")).expect("get"), None, "the oldest went");
    let (kept, first) = store
        .put_first(&key("c"), Bytes::from("other"))
        .expect("put");
    assert_eq!((kept.as_ref(), first), (&b"c"[..], false));
    let big = MemoryStore::new(1000, Duration::from_secs(3600));
    for k in ["a", "b", "c"] {
        big.put_first(&key(k), Bytes::from(vec![0; MEMORY_STORE_BYTES / 3]))
            .expect("put");
    }
    assert_eq!(big.len(), 2, "at most MEMORY_STORE_BYTES of records");
    let short = MemoryStore::new(10, Duration::ZERO);
    short.put_first(&key("a"), Bytes::from("a")).expect("put");
    assert_eq!(short.get(&key("a")).expect("get"), None, "expired");
}

#[test]
fn instances_sharing_a_directory_store_agree_on_the_first_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hour = Duration::from_secs(3600);
    let one = DirStore::open(dir.path().join("keys"), hour).expect("open");
    let two = DirStore::open(dir.path().join("keys"), hour).expect("open");
    assert_eq!(one.get(&key("order-1")).expect("get"), None);
    let (a, first) = one
        .put_first(&key("order-1"), Bytes::from("from one"))
        .expect("put");
    assert!(first && a.as_ref() == b"from one");
    let (b, first) = two
        .put_first(&key("order-1"), Bytes::from("from two"))
        .expect("put");
    assert!(!first && b.as_ref() == b"from one");
    assert_eq!(
        two.get(&key("order-1")).expect("get").as_deref(),
        Some(&b"from one"[..])
    );
    let names: Vec<_> = std::fs::read_dir(dir.path().join("keys"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    // A file that holds another key's record is an error, never that record.
    let path = one.path_of(&key("order-2"));
    std::fs::write(&path, b"order-1\nforged").expect("write");
    assert!(one.get(&key("order-2")).is_err());
}

#[test]
fn a_directory_store_removes_records_older_than_its_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DirStore::open(dir.path(), Duration::from_secs(1)).expect("open");
    store.put_first(&key("old"), Bytes::from("x")).expect("put");
    let path = store.path_of(&key("old"));
    let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
    while path.exists() && std::time::SystemTime::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!path.exists(), "the record outlived its ttl");
    assert_eq!(store.get(&key("old")).expect("get"), None);
}
