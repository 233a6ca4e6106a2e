//! Cost of verifying one token (what ws-lb and the shard each spend per authenticated
//! connection), per algorithm, and of refusing the cheapest bad inputs.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth::{AuthConfig, Verifier};
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
}

criterion_group!(benches_group, benches);
criterion_main!(benches_group);
