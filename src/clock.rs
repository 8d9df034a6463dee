//! Time. Business dates (the no-PIN daily ceiling, the PIN lock, family start dates) are
//! Asia/Shanghai calendar days. Tests move a [`Clock`] forward instead of sleeping.

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Asia::Shanghai;
use std::sync::atomic::{AtomicI64, Ordering};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    fn today(&self) -> NaiveDate {
        business_date(self.now())
    }
}

pub fn business_date(at: DateTime<Utc>) -> NaiveDate {
    at.with_timezone(&Shanghai).date_naive()
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Real time plus an offset that tests can advance.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_seconds: AtomicI64,
}

impl OffsetClock {
    pub fn advance_days(&self, days: i64) {
        self.offset_seconds.fetch_add(days * 86_400, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::seconds(self.offset_seconds.load(Ordering::SeqCst))
    }
}
