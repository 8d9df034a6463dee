//! Monthly crediting (划入), DESIGN §1 "Money coming in": what one account is owed for one month.
//! Pure: the ledger supplies the person and the month's contribution record, this says which
//! postings to make or why none.

use super::policy::{Crediting, RegionPolicy, Seventy};
use super::{AccountStatus, InsuranceStatus, Money, PersonCategory, SystemAccount, TxnKind};
use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;
use std::fmt;

/// A calendar month, `YYYY-MM` on the wire and in the ledger (text that sorts by time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    pub fn new(year: i32, month: u32) -> Option<Period> {
        ((1..=12).contains(&month) && (1900..=9999).contains(&year)).then_some(Period { year, month })
    }

    /// `YYYY-MM`, nothing else.
    pub fn parse(text: &str) -> Option<Period> {
        let bytes = text.as_bytes();
        if bytes.len() != 7
            || bytes[4] != b'-'
            || !text[..4].bytes().chain(text[5..].bytes()).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        Period::new(text[..4].parse().ok()?, text[5..].parse().ok()?)
    }

    pub fn of(day: NaiveDate) -> Period {
        Period { year: day.year(), month: day.month() }
    }

    pub fn first_day(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month, 1).expect("valid month")
    }

    pub fn next(self) -> Period {
        if self.month == 12 {
            Period { year: self.year + 1, month: 1 }
        } else {
            Period { year: self.year, month: self.month + 1 }
        }
    }

    pub fn last_day(self) -> NaiveDate {
        self.next().first_day().pred_opt().expect("valid day")
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// A month's contribution as recorded (RecordContribution): the base, whether it was paid in
/// full (足额, 001 §4), and the person's category when it was recorded, so a back payment is
/// credited by what the person was in that month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contribution {
    pub period: Period,
    pub base: Money,
    pub paid: bool,
    pub category: PersonCategory,
}

/// The person and account a month is credited to, as the ledger holds them at the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub birth_date: NaiveDate,
    pub category: PersonCategory,
    pub status: InsuranceStatus,
    pub account_status: AccountStatus,
    /// The business date the account was opened (here: a transfer in or an import opens it).
    pub account_opened: NaiveDate,
}

/// One posting a month's credit makes on the person's account; `amount` is positive and moves
/// between the account and `counterpart` (into the account for a credit, out of it for the
/// mutual-aid premium).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditLine {
    pub kind: TxnKind,
    pub amount: Money,
    pub counterpart: SystemAccount,
}

impl CreditLine {
    /// The signed change to the personal account.
    pub fn delta(&self) -> Money {
        match self.kind {
            TxnKind::MutualAid => self.amount.negated(),
            _ => self.amount,
        }
    }
}

/// Why a month is not credited. The name is stable: run reports count by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skip {
    AccountClosed,
    Terminated,
    Removed,
    Suspended,
    NoContribution,
    NotPaid,
    NothingToCredit,
    CategoryNotCredited,
    BeforePolicy,
    PensionNotSet,
    OpenedLater,
}

impl Skip {
    pub const ALL: &'static [Skip] = &[
        Skip::AccountClosed,
        Skip::Terminated,
        Skip::Removed,
        Skip::Suspended,
        Skip::NoContribution,
        Skip::NotPaid,
        Skip::NothingToCredit,
        Skip::CategoryNotCredited,
        Skip::BeforePolicy,
        Skip::PensionNotSet,
        Skip::OpenedLater,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Skip::AccountClosed => "ACCOUNT_CLOSED",
            Skip::Terminated => "TERMINATED",
            Skip::Removed => "REMOVED",
            Skip::Suspended => "SUSPENDED",
            Skip::NoContribution => "NO_CONTRIBUTION",
            Skip::NotPaid => "NOT_PAID",
            Skip::NothingToCredit => "NOTHING_TO_CREDIT",
            Skip::CategoryNotCredited => "CATEGORY_NOT_CREDITED",
            Skip::BeforePolicy => "BEFORE_POLICY",
            Skip::PensionNotSet => "PENSION_NOT_SET",
            Skip::OpenedLater => "OPENED_LATER",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Skip::AccountClosed => "the account is closed",
            Skip::Terminated => "the person's insurance is terminated",
            Skip::Removed => "the person was removed (减员) and no longer enjoys benefits",
            Skip::Suspended => "contributions are suspended and no paid month is recorded",
            Skip::NoContribution => "no contribution is recorded for the month",
            Skip::NotPaid => "the month's contribution is recorded as not paid",
            Skip::NothingToCredit => "the rule gives 0.00 for the month (a zero base)",
            Skip::CategoryNotCredited => "the person's category gets no account credit in this region",
            Skip::BeforePolicy => "the month is before the policy file's rules apply (crediting.rules_from)",
            Skip::PensionNotSet => "the region's retiree base (crediting.retiree_average_pension_2021) is not set",
            Skip::OpenedLater => "the account was opened after the month, and no contribution is recorded for it",
        }
    }
}

/// Whether the person has turned 70 for `period`'s crediting: from the month of the 70th
/// birthday, or from the month after it, as the policy file says.
pub fn is_seventy(birth_date: NaiveDate, period: Period, rule: Seventy) -> bool {
    let turns = Period { year: birth_date.year() + 70, month: birth_date.month() };
    match rule {
        Seventy::BirthdayMonth => period >= turns,
        Seventy::MonthAfterBirthday => period > turns,
    }
}

/// `amount × percent ÷ 100`, half-up to the fen.
fn percent_of(amount: Money, percent: Decimal) -> Money {
    Money::from_decimal_half_up(amount.as_decimal() * percent / Decimal::ONE_HUNDRED)
}

fn retiree_amount(rules: &Crediting, birth_date: NaiveDate, period: Period) -> Result<Money, Skip> {
    if let (Some(under), Some(from)) = (rules.retiree_monthly_under_70, rules.retiree_monthly_from_70) {
        return Ok(if is_seventy(birth_date, period, rules.retiree_seventy_from) { from } else { under });
    }
    if let Some(amount) = rules.retiree_monthly {
        return Ok(amount);
    }
    if let Some(percent) = rules.retiree_percent_of_average_pension {
        let base = rules.retiree_average_pension_2021.ok_or(Skip::PensionNotSet)?;
        return Ok(percent_of(base, percent));
    }
    Err(Skip::CategoryNotCredited)
}

/// What `subject`'s account is credited for `period`, given that month's contribution record.
///
/// Employees (and flexible employees where they have an account) are credited a percentage of
/// the base of a month paid in full; retirees the region's fixed amount unless the month is
/// recorded unpaid, less the mutual-aid premium where the region deducts one (a posting of its
/// own). A removed or terminated person, or a closed account, gets nothing.
pub fn credit_for_month(
    policy: &RegionPolicy,
    subject: &Subject,
    period: Period,
    contribution: Option<&Contribution>,
) -> Result<Vec<CreditLine>, Skip> {
    let rules = &policy.crediting;
    if subject.account_status == AccountStatus::Closed {
        return Err(Skip::AccountClosed);
    }
    match subject.status {
        InsuranceStatus::Terminated => return Err(Skip::Terminated),
        InsuranceStatus::Removed => return Err(Skip::Removed),
        InsuranceStatus::Active | InsuranceStatus::Suspended => {}
    }
    if rules.rules_from.is_some_and(|from| period < from) {
        return Err(Skip::BeforePolicy);
    }
    let category = contribution.map_or(subject.category, |c| c.category);
    if !policy.has_account(category) {
        return Err(Skip::CategoryNotCredited);
    }
    let mut lines = Vec::with_capacity(2);
    match category {
        PersonCategory::Retiree => {
            match contribution {
                Some(c) if !c.paid => return Err(Skip::NotPaid),
                None if subject.status == InsuranceStatus::Suspended => return Err(Skip::Suspended),
                // A month before the account existed here was credited where the person was then
                // (a transfer in, an imported account), or is an operator's mistyped month.
                None if subject.account_opened > period.last_day() => return Err(Skip::OpenedLater),
                _ => {}
            }
            let amount = retiree_amount(rules, subject.birth_date, period)?;
            lines.push(CreditLine { kind: TxnKind::MonthlyCredit, amount, counterpart: SystemAccount::PooledFund });
            if let Some(premium) = rules.mutual_aid_monthly.filter(|premium| !premium.is_zero()) {
                lines.push(CreditLine {
                    kind: TxnKind::MutualAid,
                    amount: premium,
                    counterpart: SystemAccount::MutualAidFund,
                });
            }
        }
        PersonCategory::Employee | PersonCategory::Flexible => {
            let contribution = contribution.ok_or(Skip::NoContribution)?;
            if !contribution.paid {
                return Err(Skip::NotPaid);
            }
            let amount = percent_of(contribution.base, rules.employee_percent_of_base);
            lines.push(CreditLine { kind: TxnKind::MonthlyCredit, amount, counterpart: SystemAccount::Contributions });
        }
        PersonCategory::Resident => return Err(Skip::CategoryNotCredited),
    }
    if lines[0].amount.is_zero() {
        return Err(Skip::NothingToCredit);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::Policies;

    fn policy(region: &str) -> std::sync::Arc<RegionPolicy> {
        Policies::builtin().region(region).expect("region").clone()
    }

    fn subject(category: PersonCategory, birth: &str) -> Subject {
        Subject {
            birth_date: NaiveDate::parse_from_str(birth, "%Y-%m-%d").unwrap(),
            category,
            status: InsuranceStatus::Active,
            account_status: AccountStatus::Open,
            account_opened: NaiveDate::from_ymd_opt(2022, 1, 1).unwrap(),
        }
    }

    fn month(text: &str) -> Period {
        Period::parse(text).unwrap()
    }

    fn paid(period: &str, base: &str, category: PersonCategory) -> Contribution {
        Contribution { period: month(period), base: Money::parse(base).unwrap(), paid: true, category }
    }

    fn amounts(lines: &[CreditLine]) -> Vec<(TxnKind, String, SystemAccount)> {
        lines.iter().map(|l| (l.kind, l.delta().to_string(), l.counterpart)).collect()
    }

    #[test]
    fn periods_parse_and_step() {
        assert_eq!(month("2025-01").to_string(), "2025-01");
        assert_eq!(month("2024-12").next(), month("2025-01"));
        assert_eq!(month("2024-02").last_day(), NaiveDate::from_ymd_opt(2024, 2, 29).unwrap());
        for bad in ["2025-13", "2025-00", "2025-1", "25-01", "2025/01", "2025-01-01", "+025-01", ""] {
            assert_eq!(Period::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_beijing_employee_gets_two_percent_of_the_base_half_up() {
        let bj = policy("110000");
        let who = subject(PersonCategory::Employee, "1985-03-02");
        let lines =
            credit_for_month(&bj, &who, month("2025-01"), Some(&paid("2025-01", "12345.67", PersonCategory::Employee)));
        // 12,345.67 × 2% = 246.9134 → 246.91
        assert_eq!(
            amounts(&lines.unwrap()),
            vec![(TxnKind::MonthlyCredit, "246.91".into(), SystemAccount::Contributions)]
        );
        // 5,360.25 × 2% = 107.205 → 107.21 (half-up, not to even)
        let lines =
            credit_for_month(&bj, &who, month("2025-01"), Some(&paid("2025-01", "5360.25", PersonCategory::Employee)));
        assert_eq!(lines.unwrap()[0].amount.to_string(), "107.21");
    }

    #[test]
    fn a_beijing_retiree_gets_110_from_the_month_of_the_70th_birthday_less_the_mutual_aid() {
        let bj = policy("110000");
        let who = subject(PersonCategory::Retiree, "1955-06-18");
        let before = credit_for_month(&bj, &who, month("2025-05"), None).unwrap();
        assert_eq!(
            amounts(&before),
            vec![
                (TxnKind::MonthlyCredit, "100.00".into(), SystemAccount::PooledFund),
                (TxnKind::MutualAid, "-3.00".into(), SystemAccount::MutualAidFund),
            ]
        );
        let birthday_month = credit_for_month(&bj, &who, month("2025-06"), None).unwrap();
        let mut moved_in = who.clone();
        moved_in.account_opened = NaiveDate::from_ymd_opt(2025, 7, 2).unwrap();
        assert_eq!(credit_for_month(&bj, &moved_in, month("2025-06"), None), Err(Skip::OpenedLater));
        assert!(credit_for_month(&bj, &moved_in, month("2025-07"), None).is_ok());
        assert_eq!(birthday_month[0].amount.to_string(), "110.00");
        assert_eq!(birthday_month[1].delta().to_string(), "-3.00");
        assert!(is_seventy(who.birth_date, month("2025-07"), Seventy::MonthAfterBirthday));
        assert!(!is_seventy(who.birth_date, month("2025-06"), Seventy::MonthAfterBirthday));
    }

    #[test]
    fn hunan_retirees_get_75_and_flexible_employees_no_account() {
        let hn = policy("430000");
        let lines = credit_for_month(&hn, &subject(PersonCategory::Retiree, "1950-01-01"), month("2025-03"), None);
        assert_eq!(amounts(&lines.unwrap()), vec![(TxnKind::MonthlyCredit, "75.00".into(), SystemAccount::PooledFund)]);
        let flexible = subject(PersonCategory::Flexible, "1990-01-01");
        let contribution = paid("2025-03", "5000.00", PersonCategory::Flexible);
        assert_eq!(
            credit_for_month(&hn, &flexible, month("2025-03"), Some(&contribution)),
            Err(Skip::CategoryNotCredited)
        );
    }

    #[test]
    fn jilin_retirees_get_2_8_percent_of_the_configured_pension_and_nothing_until_it_is_set() {
        let mut jl = (*policy("220000")).clone();
        let who = subject(PersonCategory::Retiree, "1955-01-01");
        assert_eq!(credit_for_month(&jl, &who, month("2025-03"), None), Err(Skip::PensionNotSet));
        // A made-up figure (no seed gives it): 3,218.45 × 2.8% = 90.1166 → 90.12
        jl.crediting.retiree_average_pension_2021 = Some(Money::parse("3218.45").unwrap());
        let lines = credit_for_month(&jl, &who, month("2025-03"), None).unwrap();
        assert_eq!(amounts(&lines), vec![(TxnKind::MonthlyCredit, "90.12".into(), SystemAccount::PooledFund)]);
    }

    #[test]
    fn a_month_not_paid_is_not_credited_and_statuses_decide() {
        let bj = policy("110000");
        let mut who = subject(PersonCategory::Employee, "1985-03-02");
        let period = month("2025-02");
        assert_eq!(credit_for_month(&bj, &who, period, None), Err(Skip::NoContribution));
        let mut unpaid = paid("2025-02", "8000.00", PersonCategory::Employee);
        unpaid.paid = false;
        assert_eq!(credit_for_month(&bj, &who, period, Some(&unpaid)), Err(Skip::NotPaid));
        let zero = paid("2025-02", "0", PersonCategory::Employee);
        assert_eq!(credit_for_month(&bj, &who, period, Some(&zero)), Err(Skip::NothingToCredit));
        // Suspended now, but the month was paid (a back payment): credited.
        who.status = InsuranceStatus::Suspended;
        let back = paid("2025-02", "8000.00", PersonCategory::Employee);
        assert_eq!(credit_for_month(&bj, &who, period, Some(&back)).unwrap()[0].amount.to_string(), "160.00");
        let mut retiree = subject(PersonCategory::Retiree, "1950-01-01");
        retiree.status = InsuranceStatus::Suspended;
        assert_eq!(credit_for_month(&bj, &retiree, period, None), Err(Skip::Suspended));
        for (status, skip) in
            [(InsuranceStatus::Removed, Skip::Removed), (InsuranceStatus::Terminated, Skip::Terminated)]
        {
            who.status = status;
            assert_eq!(credit_for_month(&bj, &who, period, Some(&back)), Err(skip));
        }
        who.status = InsuranceStatus::Active;
        who.account_status = AccountStatus::Closed;
        assert_eq!(credit_for_month(&bj, &who, period, Some(&back)), Err(Skip::AccountClosed));
        who.account_status = AccountStatus::Frozen;
        assert!(credit_for_month(&bj, &who, period, Some(&back)).is_ok(), "a frozen account still takes credits");
    }

    #[test]
    fn a_back_payment_is_credited_by_what_the_person_was_that_month() {
        let bj = policy("110000");
        // Retired since; the month paid for was worked as an employee.
        let who = subject(PersonCategory::Retiree, "1960-05-05");
        let back = paid("2024-11", "9000.00", PersonCategory::Employee);
        let lines = credit_for_month(&bj, &who, month("2024-11"), Some(&back)).unwrap();
        assert_eq!(amounts(&lines), vec![(TxnKind::MonthlyCredit, "180.00".into(), SystemAccount::Contributions)]);
        // Months before the file's rules (Beijing: 2022-09, 000 §21) are not credited by them.
        let old = paid("2022-08", "9000.00", PersonCategory::Employee);
        assert_eq!(credit_for_month(&bj, &who, month("2022-08"), Some(&old)), Err(Skip::BeforePolicy));
    }
}
