//! Per-token costs: the streamed body path, ours against the seed's, on the
//! same 200-token vLLM stream in the same run.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::StreamExt;
use infergate_benches::{vllm_frames, SeedAccumulator};
use infergate_sidecar::sse::SseScan;
use infergate_sidecar::stream::{End, Observed, OnEnd};
use sha2::{Digest, Sha256};

struct Keep;

impl OnEnd for Keep {
    fn on_end(self, end: End) {
        black_box(end.response_sha256);
    }
}

fn upstream(
    frames: Vec<Bytes>,
) -> impl http_body::Body<Data = Bytes, Error = hyper::Error> + Unpin {
    http_body_util::StreamBody::new(futures_util::stream::iter(
        frames.into_iter().map(|f| Ok(http_body::Frame::data(f))),
    ))
}

fn sse_passthrough(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let frames = vllm_frames(200);
    let mut g = c.benchmark_group("sse_200_tokens");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("infergate_incremental", |b| {
        b.iter_batched(
            || frames.clone(),
            |frames| {
                rt.block_on(async {
                    let mut s = Observed::new(
                        upstream(frames),
                        Box::pin(tokio::time::sleep(Duration::from_secs(60))),
                        Duration::from_secs(60),
                        Duration::from_secs(30),
                        Keep,
                    );
                    while let Some(chunk) = s.next().await {
                        black_box(chunk.unwrap());
                    }
                })
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("seed_mutex_vec", |b| {
        b.iter_batched(
            || frames.clone(),
            |frames| {
                rt.block_on(async {
                    let acc = SeedAccumulator::default();
                    let mut s = futures_util::stream::iter(frames);
                    while let Some(chunk) = s.next().await {
                        black_box(acc.pass(&chunk));
                    }
                    black_box(acc.finish());
                })
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn per_frame(c: &mut Criterion) {
    let frames = vllm_frames(1);
    let frame = &frames[1];
    let mut g = c.benchmark_group("per_frame");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("sha256_update", |b| {
        let mut h = Sha256::new();
        b.iter(|| h.update(black_box(frame)))
    });
    g.bench_function("sse_scan_feed", |b| {
        let mut scan = SseScan::default();
        scan.feed(&frames[0]);
        b.iter(|| scan.feed(black_box(frame)))
    });
    g.finish();
}

criterion_group!(benches, sse_passthrough, per_frame);
criterion_main!(benches);
