//! Credential benchmarks:
//! - the swap of one placeholder into an intercepted request's headers (`Vault::inject`),
//!   against the same request through a vault with no credentials (goal: at most 1 µs more);
//! - masking a 1 MiB response streamed in 16 KiB chunks (`scan::Replacer`), against copying
//!   the same chunks (the masked path must stay within 10% of the proxy's unmasked
//!   throughput; this isolates the masker's own cost).
//!
//! Run: `AYA_BUILD_SKIP=1 cargo bench -p enforcer --bench credentials`.

use std::{hint::black_box, os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use enforcer::{
    agents::{Agent, Caller, Origin},
    config::Config,
    credentials::{
        Vault,
        scan::{Piece, Replacer},
    },
    policy::Policy,
};
use http::{HeaderMap, HeaderValue};

const SECRET: &str = "sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH";

fn caller() -> Caller {
    let policy = Policy::from_yaml(b"rules: []\n", "bench").unwrap();
    Caller {
        agent: Arc::new(Agent::new(
            "bench".into(),
            1,
            Origin::Configured,
            PathBuf::from("bench.yaml"),
            PathBuf::from("/"),
            Arc::new(policy),
        )),
        pid: 1,
        comm: Arc::from("bench"),
        exe: None,
    }
}

/// A request head like an SDK's: ten headers, one of them the credential.
fn head(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("host", "api.openai.com"),
        ("user-agent", "OpenAI/Python 1.51.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/json"),
        ("x-stainless-lang", "python"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-runtime", "CPython"),
        ("content-length", "512"),
    ] {
        h.insert(n, HeaderValue::from_static(v));
    }
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    h
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("openai");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "state_dir: {}\nagents:\n  - name: bench\n    policy: p.yaml\n    credentials:\n      \
         - name: openai\n        secret_file: openai\n        env: OPENAI_API_KEY\n        \
         hosts: [api.openai.com]\n        placeholder_prefix: \"sk-\"\n",
        dir.path().display()
    );
    let config = Config::parse(&text, &dir.path().join("c.yaml"), dir.path()).unwrap();
    let vault = Vault::new(&config).unwrap();
    let placeholder = vault.env_of("bench")[0].1.clone();
    let empty = Vault::empty();
    let who = caller();
    let with = head(&placeholder);
    c.bench_function("credentials/inject_one", |b| {
        b.iter(|| {
            let mut h = with.clone();
            let mut target = String::from("/v1/chat/completions");
            let i = vault.inject(&who, "api.openai.com", &mut h, &mut target);
            black_box((i.is_ok(), h))
        })
    });
    c.bench_function("credentials/inject_none", |b| {
        b.iter(|| {
            let mut h = with.clone();
            let mut target = String::from("/v1/chat/completions");
            let i = empty.inject(&who, "api.openai.com", &mut h, &mut target);
            black_box((i.is_ok(), h))
        })
    });

    // 1 MiB of SSE-like text in 16 KiB chunks, the secret in it twice.
    let mut body = Vec::with_capacity(1 << 20);
    while body.len() < (1 << 20) {
        body.extend_from_slice(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\n\n",
        );
    }
    body.truncate(1 << 20);
    // Once inside a chunk, once across a chunk boundary.
    body[1000..1000 + SECRET.len()].copy_from_slice(SECRET.as_bytes());
    let across = 16 * 1024 - 20;
    body[across..across + SECRET.len()].copy_from_slice(SECRET.as_bytes());
    let chunks: Vec<bytes::Bytes> = body
        .chunks(16 * 1024)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let mut g = c.benchmark_group("credentials/stream_1mib");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("masked", |b| {
        b.iter(|| {
            let mut r = Replacer::new(vec![(
                Piece::plain(SECRET.as_bytes()),
                Piece::plain(placeholder.as_bytes()),
            )])
            .unwrap();
            let mut n = 0;
            for c in &chunks {
                n += r.push(c).len();
            }
            black_box(n + r.finish().len())
        })
    });
    g.bench_function("copied", |b| {
        b.iter(|| {
            let mut n = 0;
            for c in &chunks {
                n += bytes::Bytes::copy_from_slice(c).len();
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
