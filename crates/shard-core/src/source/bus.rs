//! The embedded in-process bus: publishing without Kafka (local runs, tests, the demo feed,
//! `POST /publish`).
//!
//! Each channel is numbered from 1 in the bus's epoch, which is fresh for every process
//! start, so positions from an earlier run are never mistaken for current ones. The hub
//! numbers each message under the channel's lock ([`Hub::publish_next`]), so messages of one
//! channel are numbered and fanned out in order even with concurrent publishers, different
//! channels publish in parallel, and the bus keeps no state per channel: a channel the hub
//! has forgotten (memory budget) costs nothing here, and its numbering resumes above every
//! number it was given before.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use ws_protocol::{ChannelName, Position};

use super::{MessageSource, SourceError, SourceStatus};
use crate::hub::Hub;

/// The embedded bus. Cheap to clone; clones publish into the same sequence space.
#[derive(Debug, Clone)]
pub struct EmbeddedBus {
    inner: Arc<BusInner>,
}

#[derive(Debug)]
struct BusInner {
    hub: Arc<Hub>,
    epoch: Arc<str>,
    status: Arc<SourceStatus>,
}

/// A fresh epoch name for this process: start time and a random suffix.
pub fn fresh_epoch() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("bus-{secs:x}-{:08x}", rand::random::<u32>())
}

impl EmbeddedBus {
    /// A bus publishing into `hub` under `epoch`.
    pub fn new(hub: Arc<Hub>, epoch: &str) -> Self {
        hub.set_default_epoch(epoch);
        Self {
            inner: Arc::new(BusInner {
                hub,
                epoch: Arc::from(epoch),
                status: SourceStatus::new("embedded", false),
            }),
        }
    }

    /// The bus's epoch.
    pub fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    /// Publishes `data_json` (one valid JSON value) on `channel`; returns its position.
    pub fn publish(&self, channel: ChannelName, data_json: &str) -> Position {
        let inner = &self.inner;
        let seq =
            inner
                .hub
                .publish_next(&channel, &inner.epoch, data_json, Some(SystemTime::now()));
        Position {
            epoch: inner.epoch.to_string(),
            seq,
        }
    }
}

impl MessageSource for EmbeddedBus {
    fn status(&self) -> Arc<SourceStatus> {
        self.inner.status.clone()
    }

    /// The bus has no input of its own: publishers call [`EmbeddedBus::publish`]. Running it
    /// just keeps it alive until shutdown.
    async fn run(self, _hub: Arc<Hub>, shutdown: CancellationToken) -> Result<(), SourceError> {
        shutdown.cancelled().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HubConfig;

    #[test]
    fn numbers_each_channel_from_one() {
        let hub = Hub::new(HubConfig::default(), 1, "x");
        let bus = EmbeddedBus::new(hub.clone(), "e1");
        let a = ChannelName::new("a").unwrap();
        let b = ChannelName::new("b").unwrap();
        assert_eq!(bus.publish(a.clone(), "1").seq, 1);
        assert_eq!(bus.publish(a.clone(), "2").seq, 2);
        assert_eq!(bus.publish(b.clone(), "3").seq, 1);
        assert_eq!(
            hub.position(&a),
            Some(Position {
                epoch: "e1".into(),
                seq: 2
            })
        );
        assert_ne!(fresh_epoch(), fresh_epoch());
    }
}
