//! Test harness: a real gateway on 127.0.0.1:0 with its own data directory, reached over real gRPC.
//! One tokio runtime per test binary (`run`), shared by every test in it.
#![allow(dead_code)]

pub mod servers;

use std::sync::{Arc, LazyLock};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use yibao::app::{self, App};
use yibao::cache::BalanceCache;
use yibao::clock::OffsetClock;
use yibao::config::Config;
use yibao::pin::PinCost;
use yibao::rpc::pb::{self, *};

pub const OPERATOR_KEY: &str = "test-operator-key-0123456789";
pub const BEIJING: &str = "110000";
pub const HUNAN: &str = "430000";

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
});

/// Runs one test body on the binary's shared runtime.
pub fn run<F: std::future::Future<Output = ()>>(test: F) {
    RUNTIME.block_on(test)
}

/// Which backends a test gateway runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite ledger and in-process balances (the embedded default).
    Embedded,
    /// PostgreSQL ledger and Redis balances (production).
    Production,
}

/// Declares one `#[test]` per backend for each `async fn name(backend: Backend)` listed.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $name() { $crate::common::run($crate::$name($crate::common::Backend::Embedded)) } )*
        }
        mod production {
            $( #[test] fn $name() { $crate::common::run($crate::$name($crate::common::Backend::Production)) } )*
        }
    };
}

pub struct TestGateway {
    pub backend: Backend,
    pub config: Config,
    pub channel: Channel,
    /// `http://127.0.0.1:PORT`, for the `yibao` binary's client commands.
    pub server: String,
    pub clock: Arc<OffsetClock>,
    pub app: App,
    dir: Arc<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    server_task: Option<tokio::task::JoinHandle<()>>,
}

fn unique_name() -> String {
    format!("t{}_{}", std::process::id(), rand_suffix())
}

/// A gateway configuration on `backend`: a fresh database and a fresh Redis key prefix for
/// production, so tests running in parallel never see each other's data.
pub async fn config(dir: &TempDir, backend: Backend) -> Config {
    let (ledger_url, redis_url, redis_prefix) = match backend {
        Backend::Embedded => (None, None, "yb:".to_string()),
        Backend::Production => {
            let name = unique_name();
            let url = servers::fresh_database(&name).await;
            (Some(url), Some(servers::SERVERS.redis_url.clone()), format!("{name}:"))
        }
    };
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ledger_url,
        redis_url,
        redis_prefix,
        operator_key: Some(OPERATOR_KEY.into()),
        pepper: b"test-pepper".to_vec(),
        pin_cost: PinCost::TEST,
        ..Config::embedded(dir.path().to_path_buf())
    }
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        TestGateway::start_with(Backend::Embedded).await
    }

    /// A gateway on `backend` with its configuration adjusted by `adjust` (e.g. a short hold lease).
    pub async fn start_adjusted(backend: Backend, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut config = config(&dir, backend).await;
        adjust(&mut config);
        TestGateway::start_in(dir, Arc::new(OffsetClock::default()), backend, config).await
    }

    /// A gateway on an existing configuration (e.g. the ledger and Redis another gateway used).
    pub async fn start_with_config(backend: Backend, config: Config) -> TestGateway {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        TestGateway::start_in(dir, Arc::new(OffsetClock::default()), backend, config).await
    }

    /// A gateway on `config` whose balance cache is `wrap`ped (see `app::build_with`).
    pub async fn start_wrapped(
        backend: Backend,
        config: Config,
        wrap: impl FnOnce(Arc<dyn BalanceCache>) -> Arc<dyn BalanceCache>,
    ) -> TestGateway {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let clock = Arc::new(OffsetClock::default());
        let app = app::build_with(&config, clock.clone(), wrap).await.expect("gateway builds");
        TestGateway::serve(dir, clock, backend, config, app).await
    }

    pub async fn start_with(backend: Backend) -> TestGateway {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let config = config(&dir, backend).await;
        TestGateway::start_in(dir, Arc::new(OffsetClock::default()), backend, config).await
    }

    async fn start_in(dir: Arc<TempDir>, clock: Arc<OffsetClock>, backend: Backend, config: Config) -> TestGateway {
        let app = app::build(&config, clock.clone()).await.expect("gateway builds");
        TestGateway::serve(dir, clock, backend, config, app).await
    }

    async fn serve(
        dir: Arc<TempDir>,
        clock: Arc<OffsetClock>,
        backend: Backend,
        config: Config,
        app: App,
    ) -> TestGateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let serving = app.clone();
        let server = tokio::spawn(async move {
            app::serve(serving, listener, async {
                let _ = stop.await;
            })
            .await
            .expect("serve");
        });
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.expect("connect");
        TestGateway {
            backend,
            config,
            channel,
            server: format!("http://{address}"),
            clock,
            app,
            dir,
            shutdown: Some(shutdown),
            server_task: Some(server),
        }
    }

    /// Stops this gateway gracefully and starts a new one on the same ledger (and, in production,
    /// the same Redis); the embedded in-process cache starts empty.
    pub async fn restart(mut self) -> TestGateway {
        let (dir, clock, config) = (self.dir.clone(), self.clock.clone(), self.config.clone());
        self.stop().await;
        TestGateway::start_in(dir, clock, self.backend, config).await
    }

    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server_task.take() {
            let _ = server.await;
        }
    }

    pub fn settlement(&self) -> settlement_service_client::SettlementServiceClient<Channel> {
        settlement_service_client::SettlementServiceClient::new(self.channel.clone())
    }
    pub fn account(&self) -> account_service_client::AccountServiceClient<Channel> {
        account_service_client::AccountServiceClient::new(self.channel.clone())
    }
    pub fn admin(&self) -> admin_service_client::AdminServiceClient<Channel> {
        admin_service_client::AdminServiceClient::new(self.channel.clone())
    }

    /// A person in `region` with an opening balance (credited by an operator adjustment).
    pub async fn person(&self, psn_no: &str, region: &str, category: pb::PersonCategory, balance: &str) {
        let request = pb::UpsertPersonRequest {
            psn_no: psn_no.into(),
            name: format!("name of {psn_no}"),
            birth_date: "1980-01-01".into(),
            region: region.into(),
            category: category as i32,
            status: pb::InsuranceStatus::Active as i32,
        };
        self.admin().upsert_person(auth(request, OPERATOR_KEY)).await.expect("upsert person");
        if balance != "0.00" && balance != "0" {
            self.credit(psn_no, balance).await;
        }
    }

    pub async fn employee(&self, psn_no: &str, balance: &str) {
        self.person(psn_no, BEIJING, pb::PersonCategory::Employee, balance).await
    }

    pub async fn credit(&self, psn_no: &str, amount: &str) {
        let request = pb::AdjustRequest {
            request_id: format!("credit-{psn_no}-{amount}-{}", rand_suffix()),
            psn_no: psn_no.into(),
            amount: amount.into(),
            direction: pb::AdjustDirection::Credit as i32,
            reason: "test opening balance".into(),
            value_date: String::new(),
        };
        self.admin().adjust(auth(request, OPERATOR_KEY)).await.expect("credit");
    }

    pub async fn institution(&self, code: &str, kind: pb::InstitutionKind) -> String {
        let request = pb::RegisterInstitutionRequest {
            code: code.into(),
            name: format!("institution {code}"),
            kind: kind as i32,
            region: BEIJING.into(),
        };
        self.admin()
            .register_institution(auth(request, OPERATOR_KEY))
            .await
            .expect("register institution")
            .into_inner()
            .api_key
    }

    pub async fn hospital(&self) -> String {
        self.institution("H001", pb::InstitutionKind::Hospital).await
    }

    /// `owner` registers `member` (who is the owner's `relation`).
    pub async fn family(&self, owner: &str, member: &str, relation: pb::Relation) {
        let request = pb::RegisterFamilyMemberRequest {
            owner_psn_no: owner.into(),
            member_psn_no: member.into(),
            relation: relation as i32,
        };
        self.account().register_family_member(auth(request, OPERATOR_KEY)).await.expect("register family");
    }

    pub async fn set_pin(&self, psn_no: &str, pin: &str) {
        let request = pb::SetPinRequest { psn_no: psn_no.into(), new_pin: pin.into() };
        self.account().set_pin(auth(request, OPERATOR_KEY)).await.expect("set pin");
    }

    /// (balance, available) as the gateway reports them.
    pub async fn balance(&self, psn_no: &str) -> (String, String) {
        let balance = self
            .account()
            .get_balance(auth(pb::GetBalanceRequest { psn_no: psn_no.into() }, OPERATOR_KEY))
            .await
            .expect("balance")
            .into_inner();
        (balance.balance, balance.available)
    }

    pub async fn balance_of(&self, psn_no: &str) -> String {
        self.balance(psn_no).await.0
    }

    pub async fn settle(&self, key: &str, request: pb::SettleRequest) -> Result<pb::Settlement, Status> {
        self.settlement().settle(auth(request, key)).await.map(|r| r.into_inner())
    }

    /// Waits (bounded) until no hold is open on these people's accounts, then checks that every
    /// cached balance equals the ledger's.
    pub async fn assert_quiet_cache_equals_ledger(&self, psn_nos: &[String]) {
        let gateway = &self.app.gateway;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        for psn_no in psn_nos {
            let account = gateway.ledger.person(psn_no).await.unwrap().unwrap().account.unwrap().id;
            loop {
                let cached = gateway.cache.get(account).await.expect("cache reachable");
                let (ledger_balance, ledger_seq) = gateway.ledger.account_balance(account).await.unwrap().unwrap();
                match cached {
                    None => break, // not cached: the next use loads the ledger's balance
                    Some(c) if c.held.is_zero() && c.balance == ledger_balance && c.seq == ledger_seq => break,
                    Some(c) => {
                        assert!(
                            c.balance.saturating_sub(c.held) <= ledger_balance || c.seq < ledger_seq,
                            "{psn_no}: cache overstates: {c:?} vs ledger {ledger_balance}"
                        );
                        assert!(
                            std::time::Instant::now() < deadline,
                            "{psn_no}: cache {c:?} never settled to ledger {ledger_balance}@{ledger_seq}"
                        );
                        // The sweeper runs every second; holds resolve after their lease and grace.
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }

    /// Money is conserved and the books balance: personal + system = 0, every transaction sums to
    /// zero, every stored balance equals the sum of its postings.
    pub async fn assert_books_balance(&self) {
        let trial = self.app.gateway.ledger.trial_balance().await.expect("trial balance");
        assert_eq!(trial.personal.checked_add(trial.system), Some(yibao::domain::Money::ZERO), "{trial:?}");
        assert_eq!(trial.unbalanced_txns, 0, "{trial:?}");
        assert_eq!(trial.drifted_accounts, 0, "{trial:?}");
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A request with `authorization: Bearer <key>`.
pub fn auth<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

/// A settle request with the common defaults: outpatient by e-voucher, partial.
pub fn settle_request(request_id: &str, psn_no: &str, amount: &str) -> pb::SettleRequest {
    pb::SettleRequest {
        request_id: request_id.into(),
        psn_no: psn_no.into(),
        amount: amount.into(),
        channel: pb::Channel::EVoucher as i32,
        category: pb::Category::Outpatient as i32,
        mode: pb::PayMode::Partial as i32,
        ec_token: "ec-token".into(),
        ..Default::default()
    }
}

pub fn card_request(request_id: &str, psn_no: &str, amount: &str, pin: &str) -> pb::SettleRequest {
    pb::SettleRequest {
        channel: pb::Channel::Card as i32,
        pin: pin.into(),
        ec_token: String::new(),
        ..settle_request(request_id, psn_no, amount)
    }
}

/// The `ErrorInfo` reason of a status (and that its domain is ours).
pub fn reason(status: &Status) -> String {
    let details = tonic_types::StatusExt::get_error_details(status);
    let info = details.error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "yibao.v1");
    info.reason.clone()
}

/// Asserts the code and reason of a failed call.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, expected_reason: &str) -> Status {
    let status = result.expect_err("the call must be refused");
    assert_eq!((status.code(), reason(&status).as_str()), (code, expected_reason), "{status:?}");
    status
}

pub fn debits(settlement: &pb::Settlement) -> Vec<(String, String, bool)> {
    settlement.debits.iter().map(|d| (d.owner_psn_no.clone(), d.amount.clone(), d.family)).collect()
}
