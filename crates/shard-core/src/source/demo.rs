//! A synthetic market-data feed for `--demo-feed`: random-walk trades and top-of-book
//! quotes on a fixed, documented set of channels.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use ws_protocol::ChannelName;

use super::bus::EmbeddedBus;

/// Ticks per second per channel unless configured otherwise (`demo_rate`).
pub const DEFAULT_RATE: u32 = 5;

/// The instruments of the demo feed.
pub const SYMBOLS: [&str; 3] = ["BTC-USD", "ETH-USD", "SOL-USD"];

/// Channels the demo feed publishes on: `trades.<symbol>` and `book.<symbol>`.
pub fn channels() -> Vec<String> {
    SYMBOLS
        .iter()
        .flat_map(|s| [format!("trades.{s}"), format!("book.{s}")])
        .collect()
}

/// Publishes `rate` ticks per second per channel until `shutdown`.
pub async fn run(bus: EmbeddedBus, rate: u32, shutdown: CancellationToken) {
    let mut prices = [64_000.0f64, 3_400.0, 150.0];
    let names: Vec<(ChannelName, ChannelName)> = SYMBOLS
        .iter()
        .filter_map(|s| {
            Some((
                ChannelName::new(&format!("trades.{s}")).ok()?,
                ChannelName::new(&format!("book.{s}")).ok()?,
            ))
        })
        .collect();
    let period = Duration::from_secs(1) / rate.max(1);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        for ((trades, book), px) in names.iter().zip(prices.iter_mut()) {
            let (step, qty, buy, spread) = {
                let mut rng = rand::rng();
                (
                    rng.random_range(-0.0005..0.0005),
                    rng.random_range(0.001..2.0),
                    rng.random_bool(0.5),
                    rng.random_range(0.5..2.0),
                )
            };
            *px *= 1.0 + step;
            let side = if buy { "buy" } else { "sell" };
            let trade = format!(
                r#"{{"px":{:.2},"qty":{qty:.4},"side":"{side}","ts":{ts}}}"#,
                *px
            );
            bus.publish(trades.clone(), &trade);
            let quote = format!(
                r#"{{"bid":{:.2},"ask":{:.2},"ts":{ts}}}"#,
                *px - spread,
                *px + spread
            );
            bus.publish(book.clone(), &quote);
        }
    }
}
