//! Interest by the daily-product method (积数计息, DESIGN §1): Σ over the days of the period of the
//! day's closing balance × the annual rate ÷ 360, rounded half-up to the fen once, at the end.
//! Balances follow value dates: money counts from its value date on.
//!
//! Σ_d balance(d) × rate(d) is linear in the postings, so each posting (or the balance before the
//! period) contributes amount × W(first day it counts), where W(x) = Σ_{d=x}^{end} rate(d). The
//! ledger sums amounts per first day; this module knows the calendar and the rates.

use super::policy::{InterestRate, InterestSettlement, RateApplies};
use super::Money;
use chrono::{Datelike, Days, NaiveDate};
use rust_decimal::Decimal;

/// The interest period that ends on `as_of`, which must be a settlement date (quarter ends for
/// quarterly settlement, 31 December for yearly): (first day, last day).
pub fn period_ending(settlement: InterestSettlement, as_of: NaiveDate) -> Result<(NaiveDate, NaiveDate), String> {
    let ends: &[(u32, u32)] = match settlement {
        InterestSettlement::Quarterly => &[(3, 31), (6, 30), (9, 30), (12, 31)],
        InterestSettlement::Yearly => &[(12, 31)],
    };
    let Some(position) = ends.iter().position(|&(m, d)| as_of.month() == m && as_of.day() == d) else {
        let next = ends
            .iter()
            .map(|&(m, d)| NaiveDate::from_ymd_opt(as_of.year(), m, d).expect("valid end"))
            .find(|end| *end > as_of)
            .unwrap_or_else(|| NaiveDate::from_ymd_opt(as_of.year() + 1, ends[0].0, ends[0].1).expect("valid end"));
        return Err(format!("{as_of} is not a settlement date; the next is {next}"));
    };
    let start = if position == 0 {
        NaiveDate::from_ymd_opt(as_of.year(), 1, 1).expect("valid date")
    } else {
        let (m, d) = ends[position - 1];
        NaiveDate::from_ymd_opt(as_of.year(), m, d).expect("valid date").succ_opt().expect("valid date")
    };
    Ok((start, as_of))
}

/// The rate (percent) in force on `day`: the last row that starts on or before it.
pub fn rate_on(rates: &[InterestRate], day: NaiveDate) -> Option<Decimal> {
    rates.iter().rev().find(|r| r.effective_from <= day).map(|r| r.annual_rate_percent)
}

/// W for each day of `start..=end` (index 0 = `start`): Σ of the percent rates from that day to
/// the end. With [`RateApplies::SettlementDay`] every day takes the rate in force on `end`.
pub fn day_weights(
    rates: &[InterestRate],
    applies: RateApplies,
    start: NaiveDate,
    end: NaiveDate,
) -> Result<Vec<Decimal>, String> {
    let days = (end - start).num_days();
    if days < 0 {
        return Ok(Vec::new());
    }
    let no_rate = |day: NaiveDate| format!("no interest rate is in force on {day}");
    let mut weights = vec![Decimal::ZERO; days as usize + 1];
    let mut running = Decimal::ZERO;
    let fixed = match applies {
        RateApplies::SettlementDay => Some(rate_on(rates, end).ok_or_else(|| no_rate(end))?),
        RateApplies::EachDay => None,
    };
    for i in (0..=days as usize).rev() {
        let day = start.checked_add_days(Days::new(i as u64)).expect("date in range");
        let rate = match fixed {
            Some(rate) => rate,
            None => rate_on(rates, day).ok_or_else(|| no_rate(day))?,
        };
        running += rate;
        weights[i] = running;
    }
    Ok(weights)
}

/// Interest on an account whose money counts from the given days: `(first day, amount)` pairs,
/// where money from before the period counts from `start`. Half-up to the fen; never negative.
pub fn interest(amounts: &[(NaiveDate, Money)], weights: &[Decimal], start: NaiveDate) -> Money {
    let mut product = Decimal::ZERO;
    for (day, amount) in amounts {
        let index = (*day - start).num_days().max(0) as usize;
        if let Some(weight) = weights.get(index) {
            product += amount.as_decimal() * weight;
        }
    }
    let interest = product / Decimal::ONE_HUNDRED / Decimal::from(360);
    if interest.is_sign_negative() {
        return Money::ZERO;
    }
    Money::from_decimal_half_up(interest)
}

/// The settlement period that `day` falls in.
pub fn period_containing(settlement: InterestSettlement, day: NaiveDate) -> (NaiveDate, NaiveDate) {
    let mut end = day;
    loop {
        if let Ok(period) = period_ending(settlement, end) {
            return period;
        }
        end = end.succ_opt().expect("date in range");
    }
}

/// Interest from `from` through `through` when an account closes mid-period (001 §6: 在办理停退保时
/// 同步计息结算): each settlement period on the way on its own, the last one cut at `through` (and,
/// for [`RateApplies::SettlementDay`], at the rate in force on `through`), each rounded half-up.
pub fn interest_between(
    amounts: &[(NaiveDate, Money)],
    rates: &[InterestRate],
    applies: RateApplies,
    settlement: InterestSettlement,
    from: NaiveDate,
    through: NaiveDate,
) -> Result<Money, String> {
    let mut total = Money::ZERO;
    let mut start = from;
    while start <= through {
        let end = period_containing(settlement, start).1.min(through);
        let weights = day_weights(rates, applies, start, end)?;
        let counted: Vec<(NaiveDate, Money)> =
            amounts.iter().filter(|(day, _)| *day <= end).map(|&(day, amount)| (day.max(start), amount)).collect();
        total = total.checked_add(interest(&counted, &weights, start)).expect("interest in range");
        start = end.succ_opt().expect("date in range");
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    fn money(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    fn rate(from: &str, percent: &str) -> InterestRate {
        InterestRate { effective_from: day(from), annual_rate_percent: percent.parse().unwrap() }
    }

    #[test]
    fn periods_end_on_settlement_dates() {
        assert_eq!(
            period_ending(InterestSettlement::Quarterly, day("2025-03-31")),
            Ok((day("2025-01-01"), day("2025-03-31")))
        );
        assert_eq!(
            period_ending(InterestSettlement::Quarterly, day("2025-09-30")),
            Ok((day("2025-07-01"), day("2025-09-30")))
        );
        assert_eq!(
            period_ending(InterestSettlement::Yearly, day("2025-12-31")),
            Ok((day("2025-01-01"), day("2025-12-31")))
        );
        assert_eq!(
            period_ending(InterestSettlement::Quarterly, day("2025-05-15")),
            Err("2025-05-15 is not a settlement date; the next is 2025-06-30".into())
        );
        assert_eq!(
            period_ending(InterestSettlement::Yearly, day("2025-06-30")),
            Err("2025-06-30 is not a settlement date; the next is 2025-12-31".into())
        );
    }

    /// Beijing, Q1 2025 at 活期 0.35%: 1,000.00 held all quarter, 500.00 more from 15 February, a
    /// payment of 123.45 on 20 March. Daily product: 1,000.00 × 90 + 500.00 × 45 − 123.45 × 12 =
    /// 111,018.60; × 0.35% ÷ 360 = 1.07934… → 1.08.
    #[test]
    fn a_beijing_quarter() {
        let rates = [rate("2015-10-24", "0.35")];
        let (start, end) = period_ending(InterestSettlement::Quarterly, day("2025-03-31")).unwrap();
        let weights = day_weights(&rates, RateApplies::EachDay, start, end).unwrap();
        assert_eq!(weights.len(), 90);
        let amounts = [
            (day("2024-11-03"), money("1000.00")),
            (day("2025-02-15"), money("500.00")),
            (day("2025-03-20"), money("123.45").negated()),
        ];
        assert_eq!(interest(&amounts, &weights, start).to_string(), "1.08");
    }

    /// Jilin, 2025, a made-up rate change on 20 May (1.10% → 0.90%): 10,000.00 all year and
    /// 2,000.00 more from 1 July (184 days).
    /// Each day at its rate: 10,000.00 × (139 × 1.10% + 226 × 0.90%) ÷ 360 = 98.972…, plus
    /// 2,000.00 × 184 × 0.90% ÷ 360 = 9.20: 108.17.
    /// At the settlement day's rate (001 §6 执行结息日…利率): (10,000.00 × 365 + 2,000.00 × 184)
    /// × 0.90% ÷ 360 = 100.45.
    #[test]
    fn a_jilin_year_with_a_rate_change_read_both_ways() {
        let rates = [rate("2015-10-24", "1.10"), rate("2025-05-20", "0.90")];
        let (start, end) = period_ending(InterestSettlement::Yearly, day("2025-12-31")).unwrap();
        let amounts = [(day("2020-01-01"), money("10000.00")), (day("2025-07-01"), money("2000.00"))];
        let each_day = day_weights(&rates, RateApplies::EachDay, start, end).unwrap();
        assert_eq!(interest(&amounts, &each_day, start).to_string(), "108.17");
        let settlement_day = day_weights(&rates, RateApplies::SettlementDay, start, end).unwrap();
        assert_eq!(interest(&amounts, &settlement_day, start).to_string(), "100.45");
    }

    /// Half-up at the last step: a product whose interest is exactly x.xx5.
    #[test]
    fn rounds_half_up_once() {
        let rates = [rate("2015-10-24", "0.36")];
        let start = day("2025-01-01");
        // 0.36% ÷ 360 = 0.00001 per yuan-day: 1,500.00 × 1 day → 0.015 → 0.02.
        let weights = day_weights(&rates, RateApplies::EachDay, start, start).unwrap();
        assert_eq!(interest(&[(start, money("1500.00"))], &weights, start).to_string(), "0.02");
        assert_eq!(interest(&[(start, money("1499.00"))], &weights, start).to_string(), "0.01");
    }

    /// Jilin, a transfer out on 15 September 2025: interest from 1 January through 14 September
    /// (257 days) at the rate in force on the 14th (0.90% after a made-up change on 20 May):
    /// 10,000.00 × 257 × 0.90% ÷ 360 = 64.25; 2,000.00 more from 1 July (76 days) adds 3.80.
    #[test]
    fn a_mid_year_closure_settles_interest_to_the_day_before() {
        let rates = [rate("2015-10-24", "1.10"), rate("2025-05-20", "0.90")];
        let amounts = [(day("2025-01-01"), money("10000.00")), (day("2025-07-01"), money("2000.00"))];
        let through = day("2025-09-14");
        assert_eq!(period_containing(InterestSettlement::Yearly, through), (day("2025-01-01"), day("2025-12-31")));
        let paid = interest_between(
            &amounts,
            &rates,
            RateApplies::SettlementDay,
            InterestSettlement::Yearly,
            day("2025-01-01"),
            through,
        );
        assert_eq!(paid.unwrap().to_string(), "68.05");
        // Beijing, quarterly, an account never paid interest closing on 3 April: Q1 whole, then
        // 1–2 April. 1,000.00 × 90 × 0.35% ÷ 360 = 0.875 → 0.88; × 2 days = 0.0194… → 0.02.
        let rates = [rate("2015-10-24", "0.35")];
        let amounts = [(day("2025-01-01"), money("1000.00"))];
        let paid = interest_between(
            &amounts,
            &rates,
            RateApplies::EachDay,
            InterestSettlement::Quarterly,
            day("2025-01-01"),
            day("2025-04-02"),
        );
        assert_eq!(paid.unwrap().to_string(), "0.90");
    }

    #[test]
    fn a_day_without_a_rate_is_an_error() {
        let rates = [rate("2025-02-01", "0.35")];
        let start = day("2025-01-01");
        assert_eq!(
            day_weights(&rates, RateApplies::EachDay, start, day("2025-03-31")),
            Err("no interest rate is in force on 2025-01-31".into())
        );
    }
}
