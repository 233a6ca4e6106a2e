//! Every bad input of issue 16 item 5 against the verifier, with tokens made by
//! jsonwebtoken's encoder from the test-only keys in `testdata/`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn claims(sub: &str, channels: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() + 300, "iat": now(), "channels": channels})
}

fn hs(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs(key: &str, claims: &Value) -> String {
    let pem = std::fs::read(testdata(&format!("{key}.pem"))).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(key.into());
    encode(&h, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

fn es(claims: &Value) -> String {
    let pem = std::fs::read(testdata("ec1.pem")).unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ec1".into());
    encode(&h, claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
}

fn jwks(keys: &[&str]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            let text = std::fs::read_to_string(testdata(&format!("{k}.jwk.json"))).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

struct Files {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    jwks: PathBuf,
}

fn files(jwks_text: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hs256.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks_text).unwrap();
    Files {
        _dir: dir,
        secret,
        jwks: jwks_path,
    }
}

/// Rewrites `path` and moves its modification time forward so the change is seen whatever
/// the file system's timestamp granularity.
fn rewrite(path: &Path, text: &str) {
    let old = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_modified(old + Duration::from_secs(1)).unwrap();
}

fn verifier(f: &Files) -> Verifier {
    Verifier::new(AuthConfig {
        hs256_secret_file: Some(f.secret.clone()),
        jwks_file: Some(f.jwks.clone()),
        leeway: Duration::ZERO,
        ..AuthConfig::default()
    })
    .unwrap()
}

#[test]
fn accepts_each_algorithm_with_its_key() {
    let f = files(&jwks(&["rsa1", "ec1"]));
    let v = verifier(&f);
    for token in [
        hs(&claims("u1", &["orders.u1.*"])),
        rs("rsa1", &claims("u1", &["orders.u1.*"])),
        es(&claims("u1", &["orders.u1.*"])),
    ] {
        let id = v.verify(&token).unwrap();
        assert_eq!(id.sub, "u1");
        assert!(v.may_subscribe(Some(&id), "orders.u1.fills"));
        assert!(!v.may_subscribe(Some(&id), "orders.u2.fills"));
        assert!(!v.may_subscribe(None, "orders.u1.fills"));
    }
}

#[test]
fn malformed_tokens() {
    let f = files(&jwks(&["rsa1"]));
    let v = verifier(&f);
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    for bad in [
        String::new(),
        "abc".into(),
        "a.b.c".into(),
        format!("{}.{}", b64(r#"{"alg":"HS256"}"#), b64("{}")),
        format!("{}.{}.sig", b64("not json"), b64("{}")),
    ] {
        assert_eq!(v.verify(&bad), Err(AuthFailure::Malformed), "{bad:?}");
    }
    // The signature is checked before the claims are parsed: garbage claims under a forged
    // signature are a signature failure.
    let t = format!("{}.{}.sig", b64(r#"{"alg":"HS256"}"#), b64("not json"));
    assert_eq!(v.verify(&t), Err(AuthFailure::Signature));
    // A correctly signed token whose claims have the wrong shape.
    let t = hs(&json!({"sub": "u1", "exp": now() + 60, "channels": "orders.*"}));
    assert_eq!(v.verify(&t), Err(AuthFailure::Malformed));
    let t = hs(&json!({"sub": "u1", "exp": now() + 60, "channels": ["a*b"]}));
    assert_eq!(v.verify(&t), Err(AuthFailure::Malformed));
    // Required claims missing.
    let t = hs(&json!({"exp": now() + 60}));
    assert!(v.verify(&t).is_err());
    let t = hs(&json!({"sub": "u1"}));
    assert!(v.verify(&t).is_err());
}

#[test]
fn alg_none_is_refused_by_name() {
    let f = files(&jwks(&["rsa1"]));
    let v = verifier(&f);
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = b64(&claims("u1", &["*"]).to_string());
    for alg in ["none", "None", "NONE"] {
        let header = b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
        assert_eq!(
            v.verify(&format!("{header}.{payload}.")),
            Err(AuthFailure::AlgNone)
        );
        assert_eq!(
            v.verify(&format!("{header}.{payload}")),
            Err(AuthFailure::AlgNone)
        );
    }
}

#[test]
fn algorithm_confusion_is_refused() {
    // The classic attack: HS256 with the server's RSA *public* key as the HMAC secret.
    let public_pem = std::fs::read(testdata("rsa1.pub.pem")).unwrap();
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims("attacker", &["*"]),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    // Only a JWKS configured: no HS256 key exists, so the algorithm is refused outright.
    let f = files(&jwks(&["rsa1"]));
    let jwks_only = Verifier::new(AuthConfig {
        jwks_file: Some(f.jwks.clone()),
        ..AuthConfig::default()
    })
    .unwrap();
    assert_eq!(jwks_only.verify(&forged), Err(AuthFailure::Algorithm));
    // Both configured: the HS256 token is checked against the HS256 secret only.
    assert_eq!(verifier(&f).verify(&forged), Err(AuthFailure::Signature));
    // An RS256 token when only a secret is configured.
    let hs_only = Verifier::new(AuthConfig {
        hs256_secret_file: Some(f.secret.clone()),
        ..AuthConfig::default()
    })
    .unwrap();
    let t = rs("rsa1", &claims("u1", &[]));
    assert_eq!(hs_only.verify(&t), Err(AuthFailure::Algorithm));
    // Algorithms we do not serve at all.
    let t = encode(
        &Header::new(Algorithm::HS512),
        &claims("u1", &[]),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(verifier(&f).verify(&t), Err(AuthFailure::Algorithm));
}

#[test]
fn wrong_signature() {
    let f = files(&jwks(&["rsa1"]));
    let v = verifier(&f);
    let other = encode(
        &Header::new(Algorithm::HS256),
        &claims("u1", &[]),
        &EncodingKey::from_secret(b"another-secret-0123456789abcdef-012345"),
    )
    .unwrap();
    assert_eq!(v.verify(&other), Err(AuthFailure::Signature));
    // Signed by a key that is not in the JWKS (same kid as a known one).
    let pem = std::fs::read(testdata("rsa2.pem")).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa1".into());
    let t = encode(
        &h,
        &claims("u1", &[]),
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap();
    assert_eq!(v.verify(&t), Err(AuthFailure::Signature));
    // A tampered payload.
    let good = hs(&claims("u1", &["orders.u1.*"]));
    let mut parts: Vec<&str> = good.split('.').collect();
    let evil =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims("u1", &["*"]).to_string());
    parts[1] = &evil;
    assert_eq!(v.verify(&parts.join(".")), Err(AuthFailure::Signature));
}

#[test]
fn time_claims() {
    let f = files(&jwks(&["rsa1"]));
    let v = verifier(&f);
    let t = hs(&json!({"sub": "u1", "exp": now() - 10}));
    assert_eq!(v.verify(&t), Err(AuthFailure::Expired));
    let t = hs(&json!({"sub": "u1", "exp": now() + 600, "nbf": now() + 300}));
    assert_eq!(v.verify(&t), Err(AuthFailure::NotYetValid));
    let t = hs(&json!({"sub": "u1", "exp": now() + 600, "nbf": now() - 1}));
    assert!(v.verify(&t).is_ok());
}

#[test]
fn audience_and_issuer() {
    let f = files(&jwks(&["rsa1"]));
    let v = Verifier::new(AuthConfig {
        hs256_secret_file: Some(f.secret.clone()),
        audience: Some("odin-ws".into()),
        issuer: Some("https://auth.example".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let base = |aud: Option<&str>, iss: Option<&str>| {
        let mut c = claims("u1", &[]);
        if let Some(a) = aud {
            c["aud"] = a.into();
        }
        if let Some(i) = iss {
            c["iss"] = i.into();
        }
        hs(&c)
    };
    assert!(v
        .verify(&base(Some("odin-ws"), Some("https://auth.example")))
        .is_ok());
    let wrong_aud = base(Some("other"), Some("https://auth.example"));
    assert_eq!(v.verify(&wrong_aud), Err(AuthFailure::Audience));
    let no_aud = base(None, Some("https://auth.example"));
    assert_eq!(v.verify(&no_aud), Err(AuthFailure::Audience));
    let wrong_iss = base(Some("odin-ws"), Some("https://evil.example"));
    assert_eq!(v.verify(&wrong_iss), Err(AuthFailure::Issuer));
    let no_iss = base(Some("odin-ws"), None);
    assert_eq!(v.verify(&no_iss), Err(AuthFailure::Issuer));
    // Without a configured audience, a token meant for another service is refused.
    let plain = verifier(&f);
    assert_eq!(
        plain.verify(&base(Some("other"), None)),
        Err(AuthFailure::Audience)
    );
}

#[test]
fn oversized_tokens_are_not_parsed() {
    let f = files(&jwks(&["rsa1"]));
    let v = verifier(&f);
    let big = "a".repeat(100 * 1024);
    assert_eq!(v.verify(&big), Err(AuthFailure::TooLong));
    // A validly signed token just over the limit is refused too.
    let padding = "x".repeat(DEFAULT_MAX_TOKEN_LEN);
    let mut c = claims("u1", &[]);
    c["pad"] = padding.into();
    assert_eq!(v.verify(&hs(&c)), Err(AuthFailure::TooLong));
}

#[test]
fn refresh_must_keep_the_subject() {
    let f = files(&jwks(&["rsa1"]));
    let v = verifier(&f);
    let t = hs(&claims("u2", &[]));
    assert_eq!(v.verify_refresh(&t, "u1"), Err(AuthFailure::SubjectChanged));
    assert_eq!(v.verify_refresh(&t, "u2").unwrap().sub, "u2");
}

#[test]
fn missing_or_invalid_key_files_refuse_to_start() {
    let f = files("{not json");
    let err = Verifier::new(AuthConfig {
        jwks_file: Some(f.jwks.clone()),
        ..AuthConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("jwks.json") && err.contains("not a JWKS"),
        "{err}"
    );
    let err = Verifier::new(AuthConfig {
        jwks_file: Some(f.jwks.with_file_name("absent.json")),
        ..AuthConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("absent.json"), "{err}");
    for bad in [r#"{"keys":[]}"#, r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#] {
        rewrite(&f.jwks, bad);
        assert!(Verifier::new(AuthConfig {
            jwks_file: Some(f.jwks.clone()),
            ..AuthConfig::default()
        })
        .is_err());
    }
    // A JWK whose declared alg does not match its type.
    let mut k: Value =
        serde_json::from_str(&std::fs::read_to_string(testdata("rsa1.jwk.json")).unwrap()).unwrap();
    k["alg"] = "ES256".into();
    rewrite(&f.jwks, &json!({"keys": [k]}).to_string());
    assert!(Verifier::new(AuthConfig {
        jwks_file: Some(f.jwks.clone()),
        ..AuthConfig::default()
    })
    .is_err());
    // A short HS256 secret.
    rewrite(&f.secret, "short\n");
    assert!(Verifier::new(AuthConfig {
        hs256_secret_file: Some(f.secret.clone()),
        ..AuthConfig::default()
    })
    .is_err());
}

#[test]
fn rotation_keeps_the_last_good_keys() {
    let f = files(&jwks(&["rsa1"]));
    let v = verifier(&f);
    let old = rs("rsa1", &claims("u1", &[]));
    let new = rs("rsa2", &claims("u1", &[]));
    assert!(v.verify(&old).is_ok());
    assert_eq!(v.verify(&new), Err(AuthFailure::Algorithm));
    assert!(!v.reload_if_changed().unwrap());
    // During a rotation both keys are listed and both are valid.
    rewrite(&f.jwks, &jwks(&["rsa1", "rsa2"]));
    assert!(v.reload_if_changed().unwrap());
    assert!(v.verify(&old).is_ok());
    assert!(v.verify(&new).is_ok());
    // A broken file (half-written, or wrong) keeps the last good set.
    rewrite(&f.jwks, r#"{"keys": [ {"kty": "RSA""#);
    assert!(v.reload_if_changed().is_err());
    assert!(v.verify(&old).is_ok());
    assert!(v.verify(&new).is_ok());
    std::fs::remove_file(&f.jwks).unwrap();
    assert!(v.reload_if_changed().is_err());
    assert!(v.verify(&new).is_ok());
    // The old key retired.
    std::fs::write(&f.jwks, jwks(&["rsa2"])).unwrap();
    assert!(v.reload_if_changed().unwrap());
    assert_eq!(v.verify(&old), Err(AuthFailure::Algorithm));
    assert!(v.verify(&new).is_ok());
}

#[test]
fn public_channels_default_by_mode() {
    let off = Verifier::new(AuthConfig::default()).unwrap();
    assert!(!off.enabled());
    assert!(off.may_subscribe(None, "orders.u1"));
    let f = files(&jwks(&["rsa1"]));
    let on = verifier(&f);
    assert!(on.enabled());
    assert!(!on.allows_anonymous());
    assert!(!on.may_subscribe(None, "trades.BTC-USD"));
    let some = Verifier::new(AuthConfig {
        jwks_file: Some(f.jwks.clone()),
        public_channels: Some("trades.*,book.*".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    assert!(some.allows_anonymous());
    assert!(some.may_subscribe(None, "trades.BTC-USD"));
    assert!(!some.may_subscribe(None, "orders.u1"));
}

#[test]
fn every_failure_has_a_distinct_label() {
    let mut labels: Vec<&str> = AuthFailure::ALL.iter().map(|f| f.label()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), AuthFailure::ALL.len());
    for (i, f) in AuthFailure::ALL.iter().enumerate() {
        assert_eq!(f.index(), i);
    }
}

fn cached_verifier(f: &Files, entries: usize, bytes: usize) -> Verifier {
    Verifier::new(
        AuthConfig {
            hs256_secret_file: Some(f.secret.clone()),
            jwks_file: Some(f.jwks.clone()),
            leeway: Duration::ZERO,
            ..AuthConfig::default()
        }
        .with_cache(entries, bytes),
    )
    .unwrap()
}

#[test]
fn a_token_seen_before_is_a_cache_hit() {
    let f = files(&jwks(&["rsa1", "ec1"]));
    let v = cached_verifier(&f, 1000, 1 << 20);
    for (i, token) in [
        hs(&claims("u1", &["orders.u1.*"])),
        rs("rsa1", &claims("u1", &["orders.u1.*"])),
        es(&claims("u1", &["orders.u1.*"])),
    ]
    .iter()
    .enumerate()
    {
        let first = v.verify(token).unwrap();
        let again = v.verify(token).unwrap();
        assert_eq!(first, again);
        let s = v.cache_stats();
        assert_eq!((s.misses, s.hits), (i as u64 + 1, i as u64 + 1), "{s:?}");
        assert!(v.may_subscribe(Some(&again), "orders.u1.fills"));
        assert!(!v.may_subscribe(Some(&again), "orders.u2.fills"));
    }
    assert_eq!(v.cache_stats().entries, 3);
    // Without a cache every verification is a full one.
    let off = cached_verifier(&f, 0, 1 << 20);
    let t = hs(&claims("u1", &[]));
    assert!(off.verify(&t).is_ok() && off.verify(&t).is_ok());
    assert_eq!(off.cache_stats(), CacheStats::default());
}

#[test]
fn a_changed_byte_is_another_token() {
    let f = files(&jwks(&["rsa1"]));
    let v = cached_verifier(&f, 1000, 1 << 20);
    let good = rs("rsa1", &claims("u1", &["orders.u1.*"]));
    v.verify(&good).unwrap();
    // The cached token's header and claims under a broken signature, and its signature
    // under other claims: both verified in full, both refused.
    let mut sig_changed = good.clone().into_bytes();
    let last = sig_changed.len() - 2;
    sig_changed[last] = if sig_changed[last] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let sig_changed = String::from_utf8(sig_changed).unwrap();
    assert_eq!(v.verify(&sig_changed), Err(AuthFailure::Signature));
    let mut parts: Vec<&str> = good.split('.').collect();
    let evil =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims("u1", &["*"]).to_string());
    parts[1] = &evil;
    assert_eq!(v.verify(&parts.join(".")), Err(AuthFailure::Signature));
    let s = v.cache_stats();
    assert_eq!((s.hits, s.misses, s.entries), (0, 3, 1), "{s:?}");
}

#[test]
fn a_cache_hit_checks_the_time_again() {
    let f = files(&jwks(&["rsa1"]));
    let v = cached_verifier(&f, 1000, 1 << 20);
    let exp = now() + 300;
    let t = rs(
        "rsa1",
        &json!({"sub": "u1", "exp": exp, "nbf": now() - 10, "channels": ["*"]}),
    );
    v.verify(&t).unwrap();
    assert!(v.verify_at(&t, exp).0.is_ok(), "valid up to exp");
    assert_eq!(v.verify_at(&t, exp + 1).0, Err(AuthFailure::Expired));
    assert_eq!(
        v.verify_at(&t, now() - 3600).0,
        Err(AuthFailure::NotYetValid)
    );
    assert_eq!(v.cache_stats().hits, 3);
    // The leeway applies as in a full verification.
    let lenient = Verifier::new(
        AuthConfig {
            hs256_secret_file: Some(f.secret.clone()),
            leeway: Duration::from_secs(5),
            ..AuthConfig::default()
        }
        .with_cache(10, 1 << 20),
    )
    .unwrap();
    let t = hs(&json!({"sub": "u1", "exp": exp}));
    lenient.verify(&t).unwrap();
    assert!(lenient.verify_at(&t, exp + 5).0.is_ok());
    assert_eq!(lenient.verify_at(&t, exp + 6).0, Err(AuthFailure::Expired));
}

#[test]
fn a_cache_hit_checks_audience_and_issuer_again() {
    let f = files(&jwks(&["rsa1"]));
    let v = Verifier::new(AuthConfig {
        hs256_secret_file: Some(f.secret.clone()),
        audience: Some("odin-ws".into()),
        issuer: Some("https://auth.example".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let entry = |aud: Option<Value>, iss: Option<Value>| cache::Verified {
        identity: Identity {
            sub: "u1".into(),
            exp: now() + 60,
            channels: ChannelPatterns::none(),
        },
        nbf: None,
        aud: cache::Values::of(aud),
        iss: cache::Values::of(iss),
    };
    let (aud, iss) = (json!("odin-ws"), json!("https://auth.example"));
    assert_eq!(
        v.recheck(&entry(Some(aud.clone()), Some(iss.clone())), now()),
        Ok(())
    );
    assert_eq!(
        v.recheck(
            &entry(Some(json!(["x", "odin-ws"])), Some(iss.clone())),
            now()
        ),
        Ok(())
    );
    assert_eq!(
        v.recheck(&entry(Some(json!("other")), Some(iss.clone())), now()),
        Err(AuthFailure::Audience)
    );
    assert_eq!(
        v.recheck(&entry(None, Some(iss.clone())), now()),
        Err(AuthFailure::Audience)
    );
    assert_eq!(
        v.recheck(
            &entry(Some(aud.clone()), Some(json!("https://evil"))),
            now()
        ),
        Err(AuthFailure::Issuer)
    );
    assert_eq!(
        v.recheck(&entry(Some(aud.clone()), None), now()),
        Err(AuthFailure::Issuer)
    );
    // No audience configured: a token with one is refused, as in a full verification.
    let plain = verifier(&f);
    assert_eq!(
        plain.recheck(&entry(Some(aud), None), now()),
        Err(AuthFailure::Audience)
    );
    assert_eq!(plain.recheck(&entry(None, None), now()), Ok(()));
}

#[test]
fn a_key_rotation_empties_the_cache() {
    let f = files(&jwks(&["rsa1", "rsa2"]));
    let v = cached_verifier(&f, 1000, 1 << 20);
    let old = rs("rsa1", &claims("u1", &[]));
    let new = rs("rsa2", &claims("u1", &[]));
    let secret_token = hs(&claims("u1", &[]));
    for t in [&old, &new, &secret_token] {
        v.verify(t).unwrap();
        v.verify(t).unwrap();
    }
    assert_eq!(v.cache_stats().hits, 3);
    // rsa1 retired: its token is verified in full again, and refused.
    rewrite(&f.jwks, &jwks(&["rsa2"]));
    assert!(v.reload_if_changed().unwrap());
    assert_eq!(v.cache_stats().entries, 0);
    assert_eq!(v.verify(&old), Err(AuthFailure::Algorithm));
    assert!(v.verify(&new).is_ok());
    // The HS256 secret changed: tokens signed with the old one are refused.
    v.verify(&secret_token).unwrap();
    rewrite(&f.secret, "another-secret-0123456789abcdef-0123456789\n");
    assert!(v.reload_if_changed().unwrap());
    assert_eq!(v.verify(&secret_token), Err(AuthFailure::Signature));
    let s = v.cache_stats();
    assert_eq!((s.hits, s.misses), (3, 7), "{s:?}");
    // A broken file keeps the keys, and the cache with them.
    v.verify(&new).unwrap();
    rewrite(&f.jwks, "{broken");
    assert!(v.reload_if_changed().is_err());
    assert!(v.verify(&new).is_ok());
    assert_eq!(v.cache_stats().hits, 4);
}

#[test]
fn the_cache_is_bounded_and_only_holds_good_tokens() {
    let f = files(&jwks(&["rsa1"]));
    // In entries.
    let v = cached_verifier(&f, 8, 1 << 20);
    for i in 0..100 {
        v.verify(&hs(&claims(&format!("u{i}"), &["orders.*"])))
            .unwrap();
        assert!(v.cache_stats().entries <= 8);
    }
    // Recently used tokens stay.
    let keep = hs(&claims("keep", &[]));
    v.verify(&keep).unwrap();
    for i in 0..100 {
        v.verify(&hs(&claims(&format!("x{i}"), &[]))).unwrap();
        v.verify(&keep).unwrap();
    }
    assert_eq!(v.cache_stats().hits, 100);
    // In bytes: entitlements make entries large.
    let budget = 16 * 1024;
    let v = cached_verifier(&f, 100_000, budget);
    let many: Vec<String> = (0..40).map(|i| format!("orders.desk-{i:03}.*")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for i in 0..200 {
        v.verify(&hs(&claims(&format!("u{i}"), &many))).unwrap();
        let s = v.cache_stats();
        assert!(s.bytes <= budget, "{s:?}");
    }
    assert!(v.cache_stats().entries >= 3, "{:?}", v.cache_stats());
    // An entry larger than half the budget is not cached at all.
    let huge: Vec<String> = (0..250).map(|i| format!("orders.desk-{i:03}.*")).collect();
    let huge: Vec<&str> = huge.iter().map(String::as_str).collect();
    let small = cached_verifier(&f, 100, budget);
    let t = hs(&claims("big", &huge));
    assert!(small.verify(&t).is_ok() && small.verify(&t).is_ok());
    assert_eq!(small.cache_stats().entries, 0);
    // Refused tokens never enter.
    let v = cached_verifier(&f, 1000, 1 << 20);
    for i in 0..50 {
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims(&format!("u{i}"), &["*"]),
            &EncodingKey::from_secret(b"another-secret-0123456789abcdef-012345"),
        )
        .unwrap();
        assert_eq!(v.verify(&forged), Err(AuthFailure::Signature));
        let expired = hs(&json!({"sub": format!("u{i}"), "exp": now() - 60}));
        assert_eq!(v.verify(&expired), Err(AuthFailure::Expired));
    }
    let s = v.cache_stats();
    assert_eq!((s.entries, s.bytes, s.hits), (0, 0, 0), "{s:?}");
}
