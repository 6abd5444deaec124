//! How late tokio's timer ends a `sleep_until`, by the schedule's phase against the timer's
//! millisecond ticks: the load generator's pacing (`load::run`) sleeps until each request is
//! due, every 2 ms at 500 req/s, and must not count the timer's own lateness as the mesh's.
//!
//! `cargo run --release -p detour-kit --example timer_lag` prints, for schedules started 0 to
//! 0.9 ms apart, the median and p99 lateness and how many of 1,500 sleeps ended over 2 ms late.

use std::time::Duration;

use tokio::time::Instant;

#[tokio::main]
async fn main() {
    let interval = Duration::from_millis(2);
    for offset_us in (0..10u64).map(|t| t * 100) {
        let start = Instant::now() + Duration::from_micros(5_000 + offset_us);
        let mut lags: Vec<u64> = Vec::with_capacity(1500);
        for i in 0..1500u32 {
            let due = start + interval * i;
            tokio::time::sleep_until(due).await;
            lags.push(Instant::now().saturating_duration_since(due).as_micros() as u64);
        }
        lags.sort_unstable();
        let over = lags.iter().filter(|&&l| l > 2_000).count();
        println!(
            "offset +{offset_us:>3} us: p50 {:>5} us, p99 {:>5} us, over 2 ms: {over:>4} of 1500",
            lags[750], lags[1485]
        );
    }
}
