//! Baselines measured in the same run as the scenarios, so the figures are ratios that survive a
//! noisy machine: argon2 verifications per second at the configured cost, and a tonic no-op
//! `Settle` (same service, same messages, no work) — the framework's ceiling on this box. The
//! PostgreSQL one-row-commit baseline is pgbench (scripts/bench.sh).

use crate::pin::{PinCost, PinHasher, Secret};
use crate::rpc::pb::{self, settlement_service_server::SettlementService};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// argon2id verifications per second on `threads` concurrent workers for `duration`.
pub async fn argon2_rate(cost: PinCost, threads: usize, duration: Duration) -> Result<f64, String> {
    let hasher = PinHasher::new(b"bench-pepper".to_vec(), cost, threads).map_err(|e| e.to_string())?;
    let pin = Secret::new(super::BENCH_PIN);
    let phc = hasher.hash(&pin).await.map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..threads {
        let (hasher, pin, phc, done) = (hasher.clone(), pin.clone(), phc.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while started.elapsed() < duration {
                if hasher.verify(&pin, &phc).await.unwrap_or(false) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for worker in workers {
        worker.await.map_err(|e| e.to_string())?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Answers `Settle` at once with a settlement of the usual shape; nothing else.
#[derive(Clone, Default)]
pub struct NoopSettlement;

#[tonic::async_trait]
impl SettlementService for NoopSettlement {
    async fn pre_settle(&self, _: Request<pb::SettleRequest>) -> Result<Response<pb::Settlement>, Status> {
        Err(Status::unimplemented("no-op"))
    }

    async fn settle(&self, request: Request<pb::SettleRequest>) -> Result<Response<pb::Settlement>, Status> {
        let request = request.into_inner();
        Ok(Response::new(pb::Settlement {
            setl_id: "S20261122120000ffffffffffffffff".into(),
            request_id: request.request_id,
            psn_no: request.psn_no.clone(),
            status: pb::SettlementStatus::Settled as i32,
            amount: request.amount.clone(),
            acct_pay: request.amount,
            acct_mulaid_pay: "0.00".into(),
            psn_cash_pay: "0.00".into(),
            balc: "99998.77".into(),
            debits: vec![pb::Debit {
                owner_psn_no: request.psn_no,
                amount: "1.23".into(),
                family: false,
                refunded: "0.00".into(),
            }],
            auth_method: pb::AuthMethod::ChannelExempt as i32,
            institution_code: "B0".into(),
            refunded_amount: "0.00".into(),
            refundable_amount: "1.23".into(),
            channel: request.channel,
            category: request.category,
            settled_at: Some(prost_types::Timestamp { seconds: 1_795_000_000, nanos: 0 }),
            ..Default::default()
        }))
    }

    async fn reverse(&self, _: Request<pb::ReverseRequest>) -> Result<Response<pb::Settlement>, Status> {
        Err(Status::unimplemented("no-op"))
    }

    async fn refund(&self, _: Request<pb::RefundRequest>) -> Result<Response<pb::Refund>, Status> {
        Err(Status::unimplemented("no-op"))
    }

    async fn get_settlement(&self, _: Request<pb::GetSettlementRequest>) -> Result<Response<pb::Settlement>, Status> {
        Err(Status::unimplemented("no-op"))
    }
}

/// Starts the no-op server on 127.0.0.1:0 with the gateway's transport settings.
pub async fn spawn_noop_server() -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(pb::settlement_service_server::SettlementServiceServer::new(NoopSettlement))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Ok(address)
}
