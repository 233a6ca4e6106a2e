//! The stream of events from the Kafka consumer to the shard, as length-prefixed frames on a
//! byte pipe (the consumer process's stdout, or an in-process duplex pipe in tests).
//!
//! Frame: one tag byte, a big-endian `u32` payload length, the payload. Records are binary
//! (topic, partition, offset, timestamp, key, value); partition lists and status are JSON.
//! Decoding never panics and rejects frames above [`MAX_FRAME`].

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted (a record of up to 64 MiB plus its header).
pub const MAX_FRAME: usize = 64 << 20;

const TAG_RECORD: u8 = b'R';
const TAG_PARTITIONS: u8 = b'P';
const TAG_STATUS: u8 = b'S';

/// A partition as assigned at the start of a consumer session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub topic: String,
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    /// Offset consumption starts at.
    pub start: i64,
    /// Timestamp (ms) of the first record of the log, when the log is not empty.
    pub first_record_ms: Option<i64>,
    /// The log is shorter than the resume position: the partition was recreated.
    pub recreated: bool,
}

/// Consumer health, sent about once a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub connected: bool,
    /// (topic, partition, records behind the high-water mark).
    pub lag: Vec<(String, i32, i64)>,
}

/// One consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Everything the consumer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Partitions(Vec<Assigned>),
    Status(Status),
    Record(Record),
}

/// A malformed frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed consumer frame: {0}")]
pub struct BadFrame(pub &'static str);

fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(b) => {
            out.extend_from_slice(&(b.len() as i32).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
}

/// Encodes a record frame.
pub fn encode_record(
    topic: &str,
    partition: i32,
    offset: i64,
    ts: Option<i64>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Vec<u8> {
    let mut p = Vec::with_capacity(
        40 + topic.len() + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len),
    );
    put_bytes(&mut p, Some(topic.as_bytes()));
    p.extend_from_slice(&partition.to_be_bytes());
    p.extend_from_slice(&offset.to_be_bytes());
    p.extend_from_slice(&ts.unwrap_or(i64::MIN).to_be_bytes());
    put_bytes(&mut p, key);
    put_bytes(&mut p, value);
    frame(TAG_RECORD, &p)
}

/// Encodes any event.
pub fn encode(e: &Event) -> Vec<u8> {
    match e {
        Event::Record(r) => encode_record(
            &r.topic,
            r.partition,
            r.offset,
            r.timestamp_ms,
            r.key.as_deref(),
            r.value.as_deref(),
        ),
        Event::Partitions(p) => frame(TAG_PARTITIONS, &serde_json::to_vec(p).unwrap_or_default()),
        Event::Status(s) => frame(TAG_STATUS, &serde_json::to_vec(s).unwrap_or_default()),
    }
}

fn frame(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + payload.len());
    f.push(tag);
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadFrame> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(BadFrame("truncated"))?;
        self.0 = rest;
        Ok(head)
    }
    fn i32(&mut self) -> Result<i32, BadFrame> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, BadFrame> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<Option<&'a [u8]>, BadFrame> {
        match self.i32()? {
            -1 => Ok(None),
            n if n < 0 => Err(BadFrame("negative length")),
            n => Ok(Some(self.take(n as usize)?)),
        }
    }
}

/// Decodes one frame's payload.
pub fn decode(tag: u8, payload: &[u8]) -> Result<Event, BadFrame> {
    match tag {
        TAG_RECORD => {
            let mut c = Cursor(payload);
            let topic = c.bytes()?.ok_or(BadFrame("no topic"))?;
            let topic = std::str::from_utf8(topic)
                .map_err(|_| BadFrame("topic not UTF-8"))?
                .to_owned();
            let partition = c.i32()?;
            let offset = c.i64()?;
            let ts = c.i64()?;
            let key = c.bytes()?.map(<[u8]>::to_vec);
            let value = c.bytes()?.map(<[u8]>::to_vec);
            if !c.0.is_empty() {
                return Err(BadFrame("trailing bytes"));
            }
            Ok(Event::Record(Record {
                topic,
                partition,
                offset,
                timestamp_ms: (ts != i64::MIN).then_some(ts),
                key,
                value,
            }))
        }
        TAG_PARTITIONS => serde_json::from_slice(payload)
            .map(Event::Partitions)
            .map_err(|_| BadFrame("partitions")),
        TAG_STATUS => serde_json::from_slice(payload)
            .map(Event::Status)
            .map_err(|_| BadFrame("status")),
        _ => Err(BadFrame("unknown tag")),
    }
}

/// Reads the next event; `Ok(None)` at a clean end of stream.
pub async fn read_event<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Event>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "consumer frame too large",
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    decode(head[0], &payload)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes an event.
pub async fn write_event<W: AsyncWrite + Unpin>(w: &mut W, e: &Event) -> std::io::Result<()> {
    w.write_all(&encode(e)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn events_round_trip_through_a_pipe() {
        let events = vec![
            Event::Partitions(vec![Assigned {
                topic: "trades".into(),
                partition: 2,
                low: 0,
                high: 10,
                start: 10,
                first_record_ms: Some(5),
                recreated: false,
            }]),
            Event::Status(Status {
                connected: true,
                lag: vec![("trades".into(), 2, 3)],
            }),
            Event::Record(Record {
                topic: "trades".into(),
                partition: 2,
                offset: 10,
                timestamp_ms: None,
                key: Some(b"BTC".to_vec()),
                value: None,
            }),
        ];
        let (mut a, mut b) = tokio::io::duplex(4096);
        for e in &events {
            write_event(&mut a, e).await.unwrap();
        }
        drop(a);
        let mut got = Vec::new();
        while let Some(e) = read_event(&mut b).await.unwrap() {
            got.push(e);
        }
        assert_eq!(got, events);
    }

    proptest! {
        #[test]
        fn decode_never_panics(tag in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(tag, &payload);
        }

        #[test]
        fn records_round_trip(
            topic in "[a-z]{1,10}", partition in any::<i32>(), offset in any::<i64>(),
            ts in proptest::option::of(0i64..i64::MAX),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
        ) {
            let f = encode_record(&topic, partition, offset, ts, key.as_deref(), value.as_deref());
            let e = decode(f[0], &f[5..]).unwrap();
            prop_assert_eq!(e, Event::Record(Record { topic, partition, offset, timestamp_ms: ts, key, value }));
        }
    }
}
