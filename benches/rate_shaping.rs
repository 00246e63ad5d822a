//! Criterion benchmarks of rate shaping on the request path. Run with
//! `cargo bench --bench rate_shaping`.
//!
//! - `rate_shaping/api_of`: finding a request's API in its path, a
//!   trivial baseline to quote the others against;
//! - `rate_shaping/admit_under_limit`: one admission of a request under the
//!   limit, to a bucket that exists (the rate is so high that nothing ever
//!   waits);
//! - `rate_shaping/admit_off`: one admission with shaping off.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use goto_auth_proxy::proxy::rate::{api_of, Admitted, RateSettings, RateShaper};

const PATH: &str = "/G2M/rest/meetings?scheduled=true&page=2";

/// Polls an admission once: under the limit it is ready at once.
fn admit_now(admission: impl Future<Output = Result<Admitted, impl std::fmt::Debug>>) -> Admitted {
    let mut admission = pin!(admission);
    match admission
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(admitted) => admitted.expect("under the limit"),
        Poll::Pending => panic!("a request under the limit had to wait"),
    }
}

fn shaper(per_second: u32) -> RateShaper {
    RateShaper::new(RateSettings {
        per_second,
        burst: per_second,
        queue: 100,
        max_wait: Duration::from_secs(5),
    })
}

fn rate_shaping(c: &mut Criterion) {
    let under_limit = shaper(u32::MAX);
    let off = shaper(0);
    // The bucket exists before the first measurement.
    admit_now(under_limit.admit(api_of(PATH)));

    let mut group = c.benchmark_group("rate_shaping");
    group.bench_function("api_of", |b| b.iter(|| api_of(black_box(PATH))));
    group.bench_function("admit_under_limit", |b| {
        b.iter(|| admit_now(under_limit.admit(api_of(black_box(PATH)))))
    });
    group.bench_function("admit_off", |b| {
        b.iter(|| admit_now(off.admit(api_of(black_box(PATH)))))
    });
    group.finish();
}

criterion_group!(benches, rate_shaping);
criterion_main!(benches);
