//! The Redis store on its own, against a real `redis-server`: keys, the
//! lease and its fencing, sealed records, and what happens when Redis goes
//! away and comes back.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::redis::RedisProcess;
use common::{wait_for, PATIENCE};
use goto_auth_proxy::metrics::Metrics;
use goto_auth_proxy::store::redis::{RedisOptions, RedisServer, RedisStore, LEASE_TTL};
use goto_auth_proxy::store::seal::Keyring;
use goto_auth_proxy::store::{
    Lease, LeaseGrant, PersistedState, SaveError, StateStore, StoreError,
};
use redis::AsyncCommands as _;
use secrecy::{ExposeSecret, SecretString};

const CLIENT_ID: &str = "client-for-redis-tests";
const TOKEN_URL: &str = "https://auth.example/oauth/token";

/// A replica's view: its own server handle, state file and keyring.
struct Replica {
    store: RedisStore,
    _dir: tempfile::TempDir,
}

fn replica(redis: &RedisProcess, keyring: Option<Keyring>) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    Replica {
        store: store_at(redis, CLIENT_ID, &dir.path().join("state.json"), keyring),
        _dir: dir,
    }
}

/// The store of the account with `client_id`, its copy in `state_file`.
fn store_at(
    redis: &RedisProcess,
    client_id: &str,
    state_file: &std::path::Path,
    keyring: Option<Keyring>,
) -> RedisStore {
    let url = SecretString::from(redis.url());
    let server = RedisServer::new(RedisOptions {
        url: &url,
        location: &redis.url(),
        password: None,
        extra_roots_pem: None,
        keyring: keyring.map(Arc::new),
    })
    .unwrap();
    let metrics = Arc::new(Metrics::new()).account("default");
    server.store(client_id, TOKEN_URL, state_file, metrics)
}

fn state(refresh_token: &str, access_token: &str) -> PersistedState {
    PersistedState {
        refresh_token: Some(SecretString::from(refresh_token)),
        refresh_token_first_seen: Some(1_800_000_000),
        principal: Some("ann@example.com".into()),
        access_token: Some(SecretString::from(access_token)),
        access_token_expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
        updated_at: unix_now(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn lease(store: &RedisStore) -> Lease {
    match store.lease().await.unwrap() {
        LeaseGrant::Held(lease) => lease,
        LeaseGrant::Elsewhere => panic!("the lease is held elsewhere"),
    }
}

/// Saves `state` on top of whatever is stored, under a lease of its own.
async fn save(store: &RedisStore, state: PersistedState) -> u64 {
    let based_on = store.load().await.unwrap().map_or(0, |s| s.version);
    let lease = lease(store).await;
    let version = store.save(state, based_on, &lease).await.unwrap();
    store.release(lease).await;
    version
}

fn refresh_token_of(state: &PersistedState) -> &str {
    state.refresh_token.as_ref().unwrap().expose_secret()
}

#[tokio::test]
async fn keys_are_namespaced_by_a_hash_and_hold_no_secret() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    let one = replica(&redis, None);
    save(&one.store, state("rt-secret-1", "at-secret-1")).await;
    let mut connection = redis.connection().await;
    let keys: Vec<String> = connection.keys("*").await.unwrap();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(key.starts_with("goto-auth-proxy:{"), "{key}");
        for secret in ["rt-secret", "at-secret", CLIENT_ID, "auth.example"] {
            assert!(!key.contains(secret), "{key} names {secret}");
        }
    }
    // Another client id is another namespace.
    let two = replica(&redis, None);
    assert!(two.store.location().contains("goto-auth-proxy:{"));
    let elsewhere = tempfile::tempdir().unwrap();
    let other = store_at(
        &redis,
        "another-client",
        &elsewhere.path().join("s.json"),
        None,
    );
    assert!(other.load().await.unwrap().is_none());
    assert_ne!(other.location(), one.store.location());
}

#[tokio::test]
async fn the_lease_is_exclusive_short_and_released_only_by_its_holder() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    let (one, two) = (replica(&redis, None), replica(&redis, None));
    let held = lease(&one.store).await;
    assert!(matches!(
        two.store.lease().await.unwrap(),
        LeaseGrant::Elsewhere
    ));
    let mut connection = redis.connection().await;
    let lease_keys: Vec<String> = connection.keys("goto-auth-proxy:*:lease").await.unwrap();
    let lease_key = &lease_keys[0];
    let ttl: i64 = connection.pttl(lease_key).await.unwrap();
    assert!(
        ttl > 0 && ttl <= LEASE_TTL.as_millis() as i64,
        "lease {lease_key} lives {ttl} ms"
    );
    assert!(LEASE_TTL <= Duration::from_secs(15));
    // A release by someone who does not hold it changes nothing.
    two.store.release(Lease::granted(held.fence)).await;
    assert!(matches!(
        two.store.lease().await.unwrap(),
        LeaseGrant::Elsewhere
    ));
    let fence = held.fence;
    one.store.release(held).await;
    let next = lease(&two.store).await;
    assert!(
        next.fence > fence,
        "fences grow: {fence} then {}",
        next.fence
    );
    two.store.release(next).await;
}

#[tokio::test]
async fn a_stale_lease_holders_write_is_refused_by_its_fence() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    let (slow, quick) = (replica(&redis, None), replica(&redis, None));
    let stale = lease(&slow.store).await;
    // The slow replica's lease runs out mid-refresh (as when it stalls).
    let mut connection = redis.connection().await;
    let keys: Vec<String> = connection.keys("goto-auth-proxy:*:lease").await.unwrap();
    let _: () = connection.del(&keys).await.unwrap();
    let newer = lease(&quick.store).await;
    let version = quick
        .store
        .save(state("rt-quick", "at-quick"), 0, &newer)
        .await
        .unwrap();
    quick.store.release(newer).await;
    // Based on the version now stored, so only the fence can refuse it.
    let refused = slow
        .store
        .save(state("rt-slow", "at-slow"), version, &stale)
        .await;
    match refused {
        Err(SaveError::Conflict(stored)) => assert_eq!(refresh_token_of(&stored.state), "rt-quick"),
        other => panic!("the stale write went through: {other:?}"),
    }
    let stored = quick.store.load().await.unwrap().unwrap();
    assert_eq!(refresh_token_of(&stored.state), "rt-quick");
    // And a write based on an older version is refused too.
    let current = lease(&slow.store).await;
    assert!(matches!(
        slow.store
            .save(state("rt-old", "at-old"), 0, &current)
            .await,
        Err(SaveError::Conflict(_))
    ));
    slow.store.release(current).await;
}

#[tokio::test]
async fn sealed_records_open_only_with_the_key() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    let key = || Keyring::from_keys(&[[0x5a; 32]]).unwrap();
    let sealed = replica(&redis, Some(key()));
    save(&sealed.store, state("rt-sealed-secret", "at-sealed-secret")).await;
    let mut connection = redis.connection().await;
    let keys: Vec<String> = connection.keys("goto-auth-proxy:*:state").await.unwrap();
    let data: String = connection.hget(&keys[0], "data").await.unwrap();
    for secret in ["rt-sealed-secret", "at-sealed-secret", "ann@example.com"] {
        assert!(
            !data.contains(secret),
            "{secret} is readable in Redis: {data}"
        );
    }
    assert!(data.contains(&key().key_ids()[0].to_owned()), "{data}");
    // The same key reads it; no key, or another key, does not.
    let stored = replica(&redis, Some(key()))
        .store
        .load()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refresh_token_of(&stored.state), "rt-sealed-secret");
    for keyring in [None, Some(Keyring::from_keys(&[[0x11; 32]]).unwrap())] {
        let error = replica(&redis, keyring).store.load().await.unwrap_err();
        assert!(matches!(error, StoreError::Unreadable { .. }), "{error}");
        assert!(!error.to_string().contains("rt-sealed"), "{error}");
    }
    // A rotated keyring (new key first) reads the old record and seals anew.
    let rotated = replica(
        &redis,
        Some(Keyring::from_keys(&[[0x77; 32], [0x5a; 32]]).unwrap()),
    );
    let stored = rotated.store.load().await.unwrap().unwrap();
    assert_eq!(refresh_token_of(&stored.state), "rt-sealed-secret");
    save(&rotated.store, state("rt-after-rotation", "at-2")).await;
    let data: String = connection.hget(&keys[0], "data").await.unwrap();
    let new_id = Keyring::from_keys(&[[0x77; 32]]).unwrap().key_ids()[0].to_owned();
    assert!(data.contains(&new_id), "{data}");
    // Altered in Redis: refused, not believed.
    let forged = data.replacen("\"ciphertext\":\"", "\"ciphertext\":\"AAAA", 1);
    let _: () = connection.hset(&keys[0], "data", forged).await.unwrap();
    assert!(matches!(
        rotated.store.load().await,
        Err(StoreError::Unreadable { .. })
    ));
    // An unsealed record is not trusted by a replica with a key.
    let plain = replica(&redis, None);
    let _: () = connection.del(&keys[0]).await.unwrap();
    save(&plain.store, state("rt-planted", "at-planted")).await;
    assert!(matches!(
        rotated.store.load().await,
        Err(StoreError::Unreadable { .. })
    ));
}

#[tokio::test]
async fn a_state_saved_while_redis_is_away_is_written_back_when_it_returns() {
    let Some(mut redis) = RedisProcess::start().await else {
        return;
    };
    let (away, other) = (replica(&redis, None), replica(&redis, None));
    let version = save(&away.store, state("rt-before", "at-before")).await;
    redis.kill();
    assert!(matches!(
        away.store.lease().await,
        Err(StoreError::Unavailable { .. })
    ));
    let saved = away
        .store
        .save(
            state("rt-rotated-alone", "at-alone"),
            version,
            &Lease::alone(),
        )
        .await
        .unwrap();
    assert_eq!(
        saved, version,
        "Redis gives the version when the state is written back"
    );
    // The replica reads its own newest state while Redis is away.
    let local = away.store.load().await.unwrap().unwrap();
    assert_eq!(refresh_token_of(&local.state), "rt-rotated-alone");
    redis.restart().await;
    wait_for("the state refreshed alone to reach Redis", || async {
        other.store.load().await.ok().flatten().is_some_and(|s| {
            refresh_token_of(&s.state) == "rt-rotated-alone" && s.version > version
        })
    })
    .await;
    // The other replica hears of it without asking.
    let heard = tokio::time::timeout(PATIENCE, other.store.changed(version))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refresh_token_of(&heard.state), "rt-rotated-alone");
}

#[tokio::test]
async fn a_newer_state_in_redis_wins_over_one_saved_alone() {
    let Some(mut redis) = RedisProcess::start().await else {
        return;
    };
    let (away, online) = (replica(&redis, None), replica(&redis, None));
    let version = save(&online.store, state("rt-1", "at-1")).await;
    // Two versions ahead in Redis, while `away` refreshed alone on version 1.
    save(&online.store, state("rt-2", "at-2")).await;
    save(&online.store, state("rt-3", "at-3")).await;
    redis.kill();
    away.store
        .save(state("rt-alone", "at-alone"), version, &Lease::alone())
        .await
        .unwrap();
    // Away, the replica's own state is what it reads.
    let own = away.store.load().await.unwrap().unwrap();
    assert_eq!(refresh_token_of(&own.state), "rt-alone");
    redis.restart().await;
    wait_for("the replica to take Redis's newer state", || async {
        away.store
            .load()
            .await
            .ok()
            .flatten()
            .is_some_and(|s| refresh_token_of(&s.state) == "rt-3")
    })
    .await;
    // A few rounds of watching later, Redis still holds the newer state.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stored = online.store.load().await.unwrap().unwrap();
    assert_eq!(refresh_token_of(&stored.state), "rt-3");
}

#[tokio::test]
async fn a_state_saved_alone_survives_a_restart_of_the_replica() {
    let Some(mut redis) = RedisProcess::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let open =
        |redis: &RedisProcess| store_at(redis, CLIENT_ID, &dir.path().join("state.json"), None);
    let before = open(&redis);
    let version = save(&before, state("rt-1", "at-1")).await;
    redis.kill();
    let mut rotated = state("rt-rotated-alone", "at-alone");
    rotated.refresh_token_first_seen = Some(1_800_000_001);
    before
        .save(rotated, version, &Lease::alone())
        .await
        .unwrap();
    drop(before);
    redis.restart().await;
    // The replica starts again: the state in its file reaches Redis.
    let after = open(&redis);
    let other = replica(&redis, None);
    wait_for(
        "the state refreshed alone before the restart to reach Redis",
        || async {
            other.store.load().await.ok().flatten().is_some_and(|s| {
                refresh_token_of(&s.state) == "rt-rotated-alone" && s.version > version
            })
        },
    )
    .await;
    drop(after);
}

#[tokio::test]
async fn a_record_redis_lost_is_put_back_from_a_replicas_copy() {
    let Some(mut redis) = RedisProcess::start().await else {
        return;
    };
    let one = replica(&redis, None);
    save(&one.store, state("rt-kept", "at-kept")).await;
    redis.wipe().await;
    let fresh = replica(&redis, None);
    wait_for("the record to be restored", || async {
        let mut connection = redis.connection().await;
        let keys: Vec<String> = connection.keys("goto-auth-proxy:*:state").await.unwrap();
        !keys.is_empty()
            && fresh
                .store
                .load()
                .await
                .ok()
                .flatten()
                .is_some_and(|s| refresh_token_of(&s.state) == "rt-kept")
    })
    .await;
}

#[tokio::test]
async fn a_held_lease_is_renewed_past_its_first_grant() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    let (holder, other) = (replica(&redis, None), replica(&redis, None));
    let held = lease(&holder.store).await;
    // A refresh that takes longer than one grant (a slow token endpoint).
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(2)).await;
    assert!(
        matches!(other.store.lease().await.unwrap(), LeaseGrant::Elsewhere),
        "the holder's lease is still held after {LEASE_TTL:?}"
    );
    holder.store.release(held).await;
    let next = lease(&other.store).await;
    other.store.release(next).await;
    // Dropped without a release (a refresher cancelled mid-refresh): no
    // more renewals, so the lease runs out by itself.
    let abandoned = lease(&holder.store).await;
    drop(abandoned);
    wait_for("an abandoned lease to run out", || async {
        match other.store.lease().await {
            Ok(LeaseGrant::Held(lease)) => {
                other.store.release(lease).await;
                true
            }
            _ => false,
        }
    })
    .await;
}

#[tokio::test]
async fn a_state_written_without_a_notification_is_found_by_the_timed_reread() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    let (writer, reader) = (replica(&redis, None), replica(&redis, None));
    let version = save(&writer.store, state("rt-announced", "at-1")).await;
    let heard = tokio::time::timeout(PATIENCE, reader.store.changed(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(heard.version, version);
    // A newer record lands without a PUBLISH (as when the notification was
    // sent while the subscriber was away): only the re-read finds it.
    let mut connection = redis.connection().await;
    let keys: Vec<String> = connection.keys("goto-auth-proxy:*:state").await.unwrap();
    let data = serde_json::json!({
        "updated_at": unix_now(),
        "secrets": {"refresh_token": "rt-unannounced"},
    })
    .to_string();
    let _: () = connection
        .hset_multiple(
            &keys[0],
            &[
                ("version", (version + 1).to_string()),
                ("fence", "0".to_owned()),
                ("data", data),
            ],
        )
        .await
        .unwrap();
    let found = tokio::time::timeout(PATIENCE, reader.store.changed(version))
        .await
        .expect("the timed re-read finds the unannounced state")
        .unwrap();
    assert_eq!(refresh_token_of(&found.state), "rt-unannounced");
}
