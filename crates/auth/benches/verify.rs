//! Cost of verifying one token (what ws-lb and the shard each spend per authenticated
//! connection), per algorithm, and of refusing the cheapest bad inputs.
//!
//! Beside each algorithm, ring's bare signature check of the same signature over the same
//! bytes (group `ring`): the floor any JWT library on ring pays. The difference is our
//! verifier's own work (base64, JSON claims, key lookup); when a run's ratio between the two
//! changes, the machine's load changed, not the code.
//!
//! Criterion times with the wall clock, so on a shared machine a run also counts the time the
//! thread waited for a core. The groups `verify-cpu` and `ring-cpu` repeat the same calls
//! timed with the thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`): what a verification
//! costs the process, whatever else runs on the box.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth::{AuthConfig, Verifier};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

const SECRET: &str = "bench-secret-0123456789abcdef-0123456789";

fn testdata(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hs256.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let jwks = dir.path().join("jwks.json");
    let keys: Vec<serde_json::Value> = ["rsa1", "ec1"]
        .iter()
        .map(|k| {
            let text = std::fs::read_to_string(testdata(&format!("{k}.jwk.json"))).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect();
    std::fs::write(&jwks, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    let v = Verifier::new(AuthConfig {
        hs256_secret_file: Some(secret),
        jwks_file: Some(jwks),
        ..AuthConfig::default()
    })
    .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"sub": "user-42", "exp": now + 3600, "iat": now,
        "channels": ["orders.user-42.*", "balances.user-42", "fills.user-42.*"]});
    let mut rs = Header::new(Algorithm::RS256);
    rs.kid = Some("rsa1".into());
    let mut es = Header::new(Algorithm::ES256);
    es.kid = Some("ec1".into());
    let tokens = [
        (
            "HS256",
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap(),
        ),
        (
            "RS256 (2048-bit)",
            encode(
                &rs,
                &claims,
                &EncodingKey::from_rsa_pem(&std::fs::read(testdata("rsa1.pem")).unwrap()).unwrap(),
            )
            .unwrap(),
        ),
        (
            "ES256",
            encode(
                &es,
                &claims,
                &EncodingKey::from_ec_pem(&std::fs::read(testdata("ec1.pem")).unwrap()).unwrap(),
            )
            .unwrap(),
        ),
        ("refused: alg none", "eyJhbGciOiJub25lIn0.e30.".to_owned()),
        ("refused: 100 KB", "a".repeat(100 * 1024)),
    ];
    let mut g = c.benchmark_group("verify");
    g.measurement_time(Duration::from_secs(3));
    for (name, token) in &tokens {
        g.bench_function(*name, |b| b.iter(|| v.verify(std::hint::black_box(token))));
    }
    g.finish();
    let mut g = c.benchmark_group("verify-cpu");
    g.measurement_time(Duration::from_secs(3));
    for (name, token) in &tokens[..3] {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                cpu_time(|| {
                    for _ in 0..iters {
                        let _ = std::hint::black_box(v.verify(std::hint::black_box(token)));
                    }
                })
            });
        });
    }
    g.finish();
    ring_alone(c, &tokens[0].1, &tokens[1].1, &tokens[2].1);
}

/// The calling thread's CPU time spent in `f`.
fn cpu_time(f: impl FnOnce()) -> Duration {
    fn now() -> Duration {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(
            u64::try_from(t.tv_sec).unwrap(),
            u32::try_from(t.tv_nsec).unwrap(),
        )
    }
    let start = now();
    f();
    now() - start
}

/// The signed bytes and the signature of a compact JWS.
fn split(token: &str) -> (&[u8], Vec<u8>) {
    let (signed, sig) = token.rsplit_once('.').unwrap();
    (signed.as_bytes(), URL_SAFE_NO_PAD.decode(sig).unwrap())
}

fn jwk_field(name: &str, field: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(testdata(&format!("{name}.jwk.json"))).unwrap();
    let jwk: serde_json::Value = serde_json::from_str(&text).unwrap();
    URL_SAFE_NO_PAD
        .decode(jwk[field].as_str().unwrap())
        .unwrap()
}

fn ring_alone(c: &mut Criterion, hs: &str, rs: &str, es: &str) {
    use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
    let mut g = c.benchmark_group("ring");
    g.measurement_time(Duration::from_secs(3));
    let (hs_msg, hs_sig) = split(hs);
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    g.bench_function("HMAC-SHA256 verify", |b| {
        b.iter(|| ring::hmac::verify(&hmac, hs_msg, &hs_sig).unwrap());
    });
    let (rs_msg, rs_sig) = split(rs);
    let rsa = RsaPublicKeyComponents {
        n: jwk_field("rsa1", "n"),
        e: jwk_field("rsa1", "e"),
    };
    g.bench_function("RSA-2048 PKCS#1 SHA-256 verify", |b| {
        b.iter(|| {
            rsa.verify(&signature::RSA_PKCS1_2048_8192_SHA256, rs_msg, &rs_sig)
                .unwrap();
        });
    });
    let (es_msg, es_sig) = split(es);
    let mut point = vec![4u8];
    point.extend(jwk_field("ec1", "x"));
    point.extend(jwk_field("ec1", "y"));
    let ec = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point);
    g.bench_function("ECDSA P-256 SHA-256 verify", |b| {
        b.iter(|| ec.verify(es_msg, &es_sig).unwrap());
    });
    g.finish();
    let mut g = c.benchmark_group("ring-cpu");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("RSA-2048 PKCS#1 SHA-256 verify", |b| {
        b.iter_custom(|iters| {
            cpu_time(|| {
                for _ in 0..iters {
                    let r = rsa.verify(&signature::RSA_PKCS1_2048_8192_SHA256, rs_msg, &rs_sig);
                    std::hint::black_box(r).unwrap();
                }
            })
        });
    });
    g.bench_function("ECDSA P-256 SHA-256 verify", |b| {
        b.iter_custom(|iters| {
            cpu_time(|| {
                for _ in 0..iters {
                    std::hint::black_box(ec.verify(es_msg, &es_sig)).unwrap();
                }
            })
        });
    });
    g.finish();
}

criterion_group!(benches_group, benches);
criterion_main!(benches_group);
