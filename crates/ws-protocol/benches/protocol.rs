//! Hot paths of the wire contract: decoding a client request, decoding a masked frame,
//! encoding a `message`.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ws_protocol::frame::{encode_masked_frame, Decoder, Flow, Limits, Role, OP_TEXT};
use ws_protocol::message::encode_message;
use ws_protocol::ClientMessage;

fn benches(c: &mut Criterion) {
    let sub = br#"{"type":"subscribe","channels":["trades.BTC-USD","book.BTC-USD"],"since":{"trades.BTC-USD":{"epoch":"bus-1","seq":41}}}"#;
    c.bench_function("decode subscribe request", |b| {
        b.iter(|| ClientMessage::decode(std::hint::black_box(sub)).unwrap())
    });

    let frame = encode_masked_frame(OP_TEXT, sub, [1, 2, 3, 4]).to_vec();
    let mut g = c.benchmark_group("frame decoder");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("masked text frame, whole in one read", |b| {
        b.iter_batched_ref(
            || {
                (
                    Decoder::new(Role::Server, Limits::new(65536)),
                    frame.clone(),
                )
            },
            |(d, buf)| d.feed(buf, &mut |_| Flow::Continue).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let data = r#"{"px":64012.5,"qty":0.3125,"side":"buy","ts":1795803982627}"#;
    c.bench_function("encode message frame json", |b| {
        b.iter(|| {
            encode_message(
                std::hint::black_box("trades.BTC-USD"),
                "bus-6b09cb4d-595fa714",
                1234567,
                data,
            )
        })
    });
}

criterion_group!(protocol, benches);
criterion_main!(protocol);
