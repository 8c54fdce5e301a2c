//! The shared stores, against the servers `scripts/test-services` starts (`REDIS_URL`,
//! `REDIS_CLUSTER_URLS`, `POSTGRES_URL`). Without them, each function prints that its test is skipped and returns
//! `None`.

fn url(var: &str) -> Option<String> {
    super::server_url(var, "shared store")
}

#[cfg(feature = "redis")]
pub async fn redis() -> Option<tower_idempotency::RedisStore> {
    let url = url("REDIS_URL")?;
    Some(
        tower_idempotency::RedisStore::connect(&url)
            .await
            .expect("connect to REDIS_URL"),
    )
}

/// A store on the shared Redis Cluster.
#[cfg(feature = "redis")]
pub async fn redis_cluster() -> Option<tower_idempotency::RedisStore> {
    let urls = url("REDIS_CLUSTER_URLS")?;
    Some(
        tower_idempotency::RedisStore::connect_cluster(urls.split(','))
            .await
            .expect("connect to REDIS_CLUSTER_URLS"),
    )
}

#[cfg(feature = "postgres")]
pub async fn postgres() -> Option<tower_idempotency::PostgresStore> {
    let url = url("POSTGRES_URL")?;
    let store = tower_idempotency::PostgresStore::connect(&url)
        .await
        .expect("connect to POSTGRES_URL");
    store.migrate().await.expect("migrate");
    Some(store)
}

/// A `PostgresStore` on a pool of `max_connections`, `pipelined` of them shared by its single
/// statements, on the shared PostgreSQL, its table migrated.
#[cfg(feature = "postgres")]
pub async fn postgres_pipelined(
    max_connections: usize,
    pipelined: usize,
) -> Option<tower_idempotency::PostgresStore> {
    let url = url("POSTGRES_URL")?;
    let store = tower_idempotency::PostgresStore::builder()
        .max_connections(max_connections)
        .pipelined_connections(pipelined)
        .connect(&url)
        .await
        .expect("connect to POSTGRES_URL");
    store.migrate().await.expect("migrate");
    assert_eq!(store.pipelined_connections(), pipelined);
    Some(store)
}

/// A `SqlxStore` on a pool of its own, on the shared PostgreSQL.
#[cfg(feature = "sqlx")]
pub async fn sqlx() -> Option<tower_idempotency::SqlxStore> {
    let url = url("POSTGRES_URL")?;
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to POSTGRES_URL");
    let store = tower_idempotency::SqlxStore::new(pool);
    store.migrate().await.expect("migrate");
    Some(store)
}
