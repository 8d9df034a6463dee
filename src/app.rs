//! Wiring: builds the gateway from a [`Config`], and serves it. The tower stack, top to bottom:
//!
//! 1. tonic's HTTP/2 server (TCP_NODELAY, keepalive, at most 4 MiB per message)
//! 2. `grpc.health.v1.Health`, kept current by a probe of the ledger and the cache every second
//! 3. server reflection v1 and v1alpha, so grpcurl-style tools work without the .proto files
//! 4. the four `yibao.v1` services; each handler authenticates its caller first

use crate::auth::Authenticator;
use crate::cache::memory::MemoryCache;
use crate::cache::redis::RedisCache;
use crate::cache::BalanceCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::policy::Policies;
use crate::gateway::Gateway;
use crate::ledger::postgres::PostgresLedger;
use crate::ledger::sqlite::SqliteLedger;
use crate::ledger::Ledger;
use crate::pin::PinHasher;
use crate::rpc::pb::{
    account_service_server::AccountServiceServer, admin_service_server::AdminServiceServer,
    reconciliation_service_server::ReconciliationServiceServer, settlement_service_server::SettlementServiceServer,
};
use crate::rpc::{pb, Services};
use crate::settle::commit::Committer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Ledger(#[from] crate::ledger::LedgerUnavailable),
    #[error("{0}")]
    Policy(#[from] crate::domain::policy::PolicyError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A built gateway and its callers' authenticator.
#[derive(Clone)]
pub struct App {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Authenticator>,
}

/// The pepper: from the config, or else a random one kept in `data_dir/pin_pepper` (created with
/// mode 0600) on first start — convenient for the embedded default; production passes it from a
/// file or the environment kept apart from the ledger's backups. Losing it makes every stored PIN
/// unverifiable.
fn pepper(config: &Config) -> Result<Vec<u8>, StartError> {
    if !config.pepper.is_empty() {
        return Ok(config.pepper.clone());
    }
    let path = config.data_dir.join("pin_pepper");
    if let Ok(existing) = std::fs::read(&path) {
        if !existing.is_empty() {
            return Ok(existing);
        }
    }
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&path)?, text.as_bytes())?;
    tracing::warn!(path = %path.display(), "generated a new PIN pepper; back it up with the ledger");
    Ok(text.into_bytes())
}

/// The region policies: from `policy_dir`, or the built-in files.
pub fn load_policies(config: &Config) -> Result<Policies, StartError> {
    Ok(match &config.policy_dir {
        Some(dir) => Policies::load_dir(dir)?,
        None => Policies::builtin(),
    })
}

/// The ledger: PostgreSQL when `ledger_url` is set, else the SQLite file in `data_dir` (created
/// with the directory if need be). Creates or migrates the schema.
pub async fn open_ledger(config: &Config) -> Result<Arc<dyn Ledger>, StartError> {
    std::fs::create_dir_all(&config.data_dir)?;
    Ok(match &config.ledger_url {
        Some(url) => Arc::new(PostgresLedger::connect(url).await?),
        None => Arc::new(SqliteLedger::open(&config.data_dir.join("ledger.db"))?),
    })
}

/// Builds the gateway: the PostgreSQL ledger when `ledger_url` is set, else the SQLite file in
/// `data_dir`; the Redis cache when `redis_url` is set, else balances in process.
pub async fn build(config: &Config, clock: Arc<dyn Clock>) -> Result<App, StartError> {
    build_with(config, clock, |cache| cache).await
}

/// `build`, with the balance cache passed through `wrap` first (tests put a cache that pauses or
/// fails on cue in front of the real one).
pub async fn build_with(
    config: &Config,
    clock: Arc<dyn Clock>,
    wrap: impl FnOnce(Arc<dyn BalanceCache>) -> Arc<dyn BalanceCache>,
) -> Result<App, StartError> {
    let policies = load_policies(config)?;
    let ledger = open_ledger(config).await?;
    let cache: Arc<dyn BalanceCache> = match &config.redis_url {
        Some(url) => Arc::new(
            RedisCache::connect(url, &config.redis_prefix).await.map_err(|e| StartError::Config(e.to_string()))?,
        ),
        None => Arc::new(MemoryCache::default()),
    };
    let cache = wrap(cache);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let pins =
        PinHasher::new(pepper(config)?, config.pin_cost, cores).map_err(|e| StartError::Config(e.to_string()))?;
    let committer = Committer::start(
        ledger.clone(),
        config.settings.batch_len_max,
        config.settings.commit_queue_max,
        std::time::Duration::from_millis(config.settings.commit_timeout_ms),
    );
    let gateway = Arc::new(Gateway {
        ledger: ledger.clone(),
        cache,
        committer,
        pins,
        policies,
        clock,
        settings: config.settings.clone(),
        admission: Arc::new(tokio::sync::Semaphore::new(config.settings.in_flight_max.max(1))),
        background: Default::default(),
    });
    crate::settle::sweeper::spawn(Arc::downgrade(&gateway), Duration::from_secs(1));
    let auth = Arc::new(Authenticator::new(ledger, config.operator_key.as_deref()));
    Ok(App { gateway, auth })
}

const SERVICE_NAMES: &[&str] = &[
    "yibao.v1.SettlementService",
    "yibao.v1.AccountService",
    "yibao.v1.AdminService",
    "yibao.v1.ReconciliationService",
];

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish, and returns.
pub async fn serve(
    app: App,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let probe_gateway = Arc::downgrade(&app.gateway);
    let probe = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut last: Option<bool> = None;
        loop {
            ticker.tick().await;
            let Some(gateway) = probe_gateway.upgrade() else {
                break;
            };
            let timeout = Duration::from_secs(2);
            let ledger_ok = matches!(tokio::time::timeout(timeout, gateway.ledger.ping()).await, Ok(Ok(())));
            let cache_ok = matches!(tokio::time::timeout(timeout, gateway.cache.ping()).await, Ok(Ok(())));
            let serving = ledger_ok && cache_ok;
            if last != Some(serving) {
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tracing::warn!(ledger_ok, cache_ok, "backend unreachable: health NOT_SERVING");
                    tonic_health::ServingStatus::NotServing
                };
                health.set_service_status("", status).await;
                for name in SERVICE_NAMES {
                    health.set_service_status(*name, status).await;
                }
                last = Some(serving);
            }
        }
    });
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("descriptor set is valid");
    let services = Services { gateway: app.gateway.clone(), auth: app.auth.clone() };
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SettlementServiceServer::new(services.clone()))
        .add_service(AccountServiceServer::new(services.clone()))
        .add_service(AdminServiceServer::new(services.clone()))
        .add_service(ReconciliationServiceServer::new(services))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await;
    probe.abort();
    result
}
