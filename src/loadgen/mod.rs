//! The load generator behind `yibao bench`: an open-loop gRPC client. Requests are sent on a fixed
//! schedule (rate × duration) whatever the answers do, and each latency is measured from the
//! request's *scheduled* time, so a slow gateway shows up as latency instead of hiding as a lower
//! offered rate (no coordinated omission). Latencies go into an HDR histogram.
//!
//! It sets up its own people, balances, families, PINs and institution through the API (or reuses
//! a prefix set up before), then reports offered and achieved rate, p50 / p90 / p99 / p99.9 / max,
//! and errors by reason, as one summary line and a JSON file.

pub mod audit;
pub mod baseline;
mod setup;

use crate::rpc::pb;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub use setup::{names, setup, write_population, Names, Population};

/// The PIN every PIN-paying bench person gets.
pub const BENCH_PIN: &str = "284617";

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub server: String,
    /// Offered rate, requests per second.
    pub rate: f64,
    pub duration: Duration,
    /// gRPC connections, used round-robin.
    pub connections: usize,
    /// Share of requests on the hottest 1% of accounts (0.0–1.0).
    pub hot_share: f64,
    /// Share of requests paid by card + PIN (the rest by e-voucher, PIN-exempt).
    pub pin_share: f64,
    /// Share of requests by payers whose own account is empty, drawing on 1–3 family accounts.
    pub family_share: f64,
    /// Amount per settlement, yuan.
    pub amount: String,
    /// Unique per run: request ids are `<run_id>-<n>`.
    pub run_id: String,
    /// Requests in flight at most; beyond it a request counts as an error (CLIENT_OVERLOAD)
    /// rather than queueing silently in the client.
    pub in_flight_max: usize,
    /// Check the books of the hottest 1% of accounts after the run (`audit`).
    pub audit: bool,
}

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub scenario: String,
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub sent: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub duration_s: f64,
    pub connections: usize,
    /// The whole machine's CPU time per request answered OK, in ms, while the run sent and answered
    /// (Linux only: from /proc/stat, so it counts the server, its databases and this client, all
    /// on the same cores). Unlike a rate, it hardly moves with a noisy machine's spare capacity.
    pub cpu_ms_per_ok: Option<f64>,
    /// The machine's busy share of its CPU time over the same window, in percent.
    pub machine_busy_percent: Option<f64>,
    /// The share a hypervisor took from the machine's virtual cores over the same window, in
    /// percent: a run with much stolen had fewer cores than it seems.
    pub machine_stolen_percent: Option<f64>,
    /// How late the generator sent against its schedule (p99 and max, ms). Part of every latency
    /// above; large only when the machine starves the generator itself.
    pub sent_late_p99_ms: f64,
    pub sent_late_max_ms: f64,
    /// The books of the hottest 1% of accounts, when the run checked them (`--audit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<audit::AuditReport>,
}

impl Report {
    pub fn summary_line(&self) -> String {
        let errors: Vec<String> = self.errors.iter().map(|(reason, n)| format!("{reason}={n}")).collect();
        let cpu = match (self.cpu_ms_per_ok, self.machine_busy_percent, self.machine_stolen_percent) {
            (Some(per_ok), Some(busy), Some(stolen)) => {
                format!(" cpu {per_ok:.3} ms/ok (machine {busy:.0}% busy, {stolen:.0}% stolen)")
            }
            _ => String::new(),
        };
        let audit = self.audit.as_ref().map(|audit| format!(" {}", audit.summary())).unwrap_or_default();
        format!(
            "{}: offered {:.0}/s achieved {:.0}/s ok {}/{} p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms errors [{}]{cpu} sent late p99 {:.2} ms max {:.2} ms{audit}",
            self.scenario,
            self.offered_rate,
            self.achieved_rate,
            self.ok,
            self.sent,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            errors.join(" "),
            self.sent_late_p99_ms,
            self.sent_late_max_ms
        )
    }
}

/// CPU time of the whole machine so far, in clock ticks summed over its cores (/proc/stat). Busy
/// is user + nice + system + irq + softirq; idle, I/O wait and stolen are not; stolen is time the
/// hypervisor gave the virtual cores to someone else while they had work.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ticks {
    busy: u64,
    stolen: u64,
    all: u64,
    cores: usize,
}

fn machine_ticks() -> Option<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = stat.lines();
    let fields: Vec<u64> =
        lines.next()?.strip_prefix("cpu ")?.split_whitespace().map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    let stolen = field(7);
    let all = busy + field(3) + field(4) + stolen;
    let cores = lines.filter(|line| line.starts_with("cpu")).count();
    Some(Ticks { busy, stolen, all, cores })
}

/// What the machine did between two `machine_ticks` readings `wall` apart.
#[derive(Debug, PartialEq)]
struct MachineCpu {
    /// Busy CPU time, ms.
    busy_ms: f64,
    /// Busy and stolen shares of all CPU time, percent.
    busy_percent: f64,
    stolen_percent: f64,
}

/// Ticks are counted in a unit /proc/stat does not name, so the busy share of all ticks is scaled
/// by the cores' wall time. `None` when no tick passed or the counters went back.
fn machine_cpu(before: Ticks, after: Ticks, wall: Duration) -> Option<MachineCpu> {
    let busy = after.busy.checked_sub(before.busy)? as f64;
    let stolen = after.stolen.checked_sub(before.stolen)? as f64;
    let all = after.all.checked_sub(before.all)? as f64;
    (all > 0.0).then(|| MachineCpu {
        busy_ms: busy / all * after.cores as f64 * wall.as_secs_f64() * 1000.0,
        busy_percent: busy / all * 100.0,
        stolen_percent: stolen / all * 100.0,
    })
}

struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    last_answer: Option<Instant>,
    drawn: audit::Drawn,
}

fn reason_of(status: &tonic::Status) -> String {
    let details = tonic_types::StatusExt::get_error_details(status);
    details.error_info().map(|info| info.reason.clone()).unwrap_or_else(|| format!("{:?}", status.code()))
}

/// A deterministic pseudo-random sequence (SplitMix64), so runs are repeatable.
pub struct Mix(u64);

impl Mix {
    pub fn new(seed: u64) -> Mix {
        Mix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

pub async fn connect(server: &str, connections: usize) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let channel = Channel::from_shared(server.to_string())
            .map_err(|e| format!("bad server address {server}: {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot reach {server}: {e}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Runs the open-loop load against a set-up population and reports.
pub async fn run(scenario: &str, options: &LoadOptions, population: &Population) -> Result<Report, String> {
    let channels = connect(&options.server, options.connections).await?;
    let total = (options.rate * options.duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / options.rate);
    let tally = Arc::new(Mutex::new(Tally {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        ok: 0,
        errors: BTreeMap::new(),
        last_answer: None,
        drawn: audit::Drawn::default(),
    }));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(options.in_flight_max));
    let mut mix = Mix::new(0x5EED ^ total);
    let key = population.institution_key.clone();
    let books =
        if options.audit { Some(Arc::new(audit::Books::open(&channels[0], &key, population).await?)) } else { None };
    let cpu_before = machine_ticks();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // How late each request left against its schedule: the generator's own lag, part of every
    // latency (each is measured from the schedule), reported apart so that it can be seen.
    let mut late = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    // The schedule is kept by a thread that sleeps to each send time (the kernel's timer,
    // microseconds late at most when the machine has a core to spare): tokio's timer counts whole
    // milliseconds and rounds up, which sent every request 0-2 ms late, in bursts once a
    // millisecond, and charged that lag to the server. The thread is the one `run` is polled on
    // (a worker, or the thread blocking on the runtime), handed over to the pacing for the run, so
    // `run` needs the multi-thread runtime; the requests still run on the runtime's workers.
    tokio::task::block_in_place(|| {
        for n in 0..total {
            let scheduled = started + interval.mul_f64(n as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            let _ = late.record(Instant::now().saturating_duration_since(scheduled).as_micros().max(1) as u64);
            let request = population.request(options, &mut mix, n);
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                *tally.lock().unwrap().errors.entry("CLIENT_OVERLOAD".into()).or_default() += 1;
                continue;
            };
            let mut client = pb::settlement_service_client::SettlementServiceClient::new(
                channels[(n as usize) % channels.len()].clone(),
            );
            let (tally, key, books) = (tally.clone(), key.clone(), books.clone());
            let audited = books.as_ref().map(|_| (request.request_id.clone(), request.psn_no.clone()));
            tasks.spawn(async move {
                let mut request = tonic::Request::new(request);
                if let Ok(value) = format!("Bearer {key}").parse() {
                    request.metadata_mut().insert("authorization", value);
                }
                request.set_timeout(Duration::from_secs(30));
                let result = client.settle(request).await;
                let answered = Instant::now();
                let latency_us = answered.saturating_duration_since(scheduled).as_micros().max(1) as u64;
                drop(permit);
                let mut tally = tally.lock().unwrap();
                tally.last_answer = Some(tally.last_answer.map_or(answered, |last| last.max(answered)));
                if let (Some(books), Some((request_id, psn_no))) = (&books, &audited) {
                    let answer = result.as_ref().ok().map(|answer| answer.get_ref());
                    books.record(&mut tally.drawn, psn_no, request_id, answer);
                }
                match result {
                    Ok(_) => {
                        tally.ok += 1;
                        let _ = tally.histogram.record(latency_us.min(60_000_000));
                    }
                    Err(status) => *tally.errors.entry(reason_of(&status)).or_default() += 1,
                }
            });
            // Reap finished tasks as we go so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
    });
    while tasks.join_next().await.is_some() {}
    let cpu = cpu_before.zip(machine_ticks()).and_then(|(before, after)| machine_cpu(before, after, started.elapsed()));
    let drawn = std::mem::take(&mut tally.lock().unwrap().drawn);
    let audit = match books {
        Some(books) => Some(books.close(&channels[0], &key, drawn).await?),
        None => None,
    };
    let tally = tally.lock().unwrap();
    let elapsed =
        tally.last_answer.unwrap_or_else(Instant::now).saturating_duration_since(started).as_secs_f64().max(1e-9);
    let ms = |q: f64| tally.histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        scenario: scenario.to_string(),
        offered_rate: options.rate,
        achieved_rate: tally.ok as f64 / elapsed,
        sent: total,
        ok: tally.ok,
        errors: tally.errors.clone(),
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: tally.histogram.max() as f64 / 1000.0,
        duration_s: elapsed,
        connections: channels.len(),
        cpu_ms_per_ok: cpu.as_ref().filter(|_| tally.ok > 0).map(|cpu| cpu.busy_ms / tally.ok as f64),
        machine_busy_percent: cpu.as_ref().map(|cpu| cpu.busy_percent),
        machine_stolen_percent: cpu.as_ref().map(|cpu| cpu.stolen_percent),
        sent_late_p99_ms: late.value_at_quantile(0.99) as f64 / 1000.0,
        sent_late_max_ms: late.max() as f64 / 1000.0,
        audit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_cpu_is_the_busy_share_of_the_cores_wall_time() {
        // Two cores for half a second: 150 of 200 ticks busy is 75% of 1,000 ms of core time; 20
        // of them stolen is 10%.
        let before = Ticks { busy: 100, stolen: 30, all: 400, cores: 2 };
        let after = Ticks { busy: 250, stolen: 50, all: 600, cores: 2 };
        let cpu = machine_cpu(before, after, Duration::from_millis(500)).unwrap();
        assert_eq!(cpu, MachineCpu { busy_ms: 750.0, busy_percent: 75.0, stolen_percent: 10.0 });
        assert_eq!(machine_cpu(before, before, Duration::from_secs(1)), None, "no ticks");
        let back = Ticks { busy: 90, all: 500, ..before };
        assert_eq!(machine_cpu(before, back, Duration::from_secs(1)), None, "counters went back");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn machine_ticks_reads_this_machine() {
        let Ticks { busy, stolen, all, cores } = machine_ticks().expect("/proc/stat read");
        assert!(
            busy > 0 && busy + stolen <= all && cores >= 1,
            "busy {busy}, stolen {stolen} of {all} ticks on {cores} cores"
        );
    }
}
