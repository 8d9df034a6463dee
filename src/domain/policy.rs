//! Regional policy as data (DESIGN §4): one TOML file per region under `config/policy/`, parsed
//! with unknown keys refused, then validated into a [`RegionPolicy`] whose amounts are [`Money`]
//! and whose dates are dates. A wrong file stops the gateway at start with the file and key named.

use super::credit::Period;
use super::money::Money;
use super::types::{Category, Channel, InstitutionKind, PersonCategory, Relation};
use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    region: String,
    name: String,
    accounts: AccountsFile,
    family: FamilyFile,
    pin: PinFile,
    no_pin: NoPinFile,
    channels: ChannelsFile,
    institution_kinds: BTreeMap<String, KindFile>,
    crediting: CreditingFile,
    interest: InterestFile,
}

/// Monthly crediting (DESIGN §1 "Money coming in"). Each region sets the keys its seed gives; a
/// key no region uses is refused like any unknown key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditingFile {
    employee_percent_of_base: String,
    retiree_monthly: Option<String>,
    retiree_monthly_under_70: Option<String>,
    retiree_monthly_from_70: Option<String>,
    mutual_aid_monthly: Option<String>,
    retiree_percent_of_average_pension: Option<String>,
    retiree_average_pension_2021: Option<String>,
    #[serde(default)]
    retiree_seventy_from: Seventy,
    rules_from: Option<String>,
    credit_by_day_of_month: Option<u32>,
}

/// From which month a retiree counts as 70 for the higher Beijing amount (000 §3 says only
/// "70周岁(含)以上"): the month of the 70th birthday (the default), or the month after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seventy {
    #[default]
    BirthdayMonth,
    MonthAfterBirthday,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InterestFile {
    method: InterestMethod,
    rate_kind: RateKind,
    settlement: InterestSettlement,
    rate_applies: RateApplies,
    rates: Vec<RateFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateFile {
    effective_from: String,
    annual_rate_percent: String,
}

/// How interest is computed: Σ daily closing balances × annual rate ÷ 360, half-up to the fen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterestMethod {
    DailyProduct,
}

/// Which bank rate applies: 活期 (000 §7) or 三个月整存整取 (001 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateKind {
    CurrentDeposit,
    #[serde(rename = "fixed_3_month")]
    Fixed3Month,
}

/// When interest is paid: 按季 (000 §7) or on 31 December (001 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterestSettlement {
    Quarterly,
    Yearly,
}

/// The region's crediting rules, validated: amounts are [`Money`], percentages are decimals in
/// 0..=100. `None` is a rule the region's seed does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crediting {
    pub employee_percent_of_base: Decimal,
    pub retiree_monthly: Option<Money>,
    pub retiree_monthly_under_70: Option<Money>,
    pub retiree_monthly_from_70: Option<Money>,
    pub mutual_aid_monthly: Option<Money>,
    pub retiree_percent_of_average_pension: Option<Decimal>,
    pub retiree_average_pension_2021: Option<Money>,
    pub retiree_seventy_from: Seventy,
    /// The first month these rules credit; a back payment for an earlier month is skipped
    /// (its rules are not in the file). `None`: every month.
    pub rules_from: Option<Period>,
    pub credit_by_day_of_month: Option<u32>,
}

/// One row of the dated rate table: in force from `effective_from` until the next row's date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterestRate {
    pub effective_from: NaiveDate,
    pub annual_rate_percent: Decimal,
}

/// Which day's rate a period's interest uses: each day its own (the rate in force that day), or
/// the rate in force on the settlement day for the whole period (001 §6: 执行结息日…利率).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateApplies {
    EachDay,
    SettlementDay,
}

/// The region's interest rules, validated; `rates` in date order, no two periods overlapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    pub method: InterestMethod,
    pub rate_kind: RateKind,
    pub settlement: InterestSettlement,
    pub rate_applies: RateApplies,
    pub rates: Vec<InterestRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    categories: Vec<PersonCategory>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FamilyFile {
    relations: Vec<Relation>,
    start_date: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinFile {
    length: usize,
    lockout_failures: u32,
    weak: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoPinFile {
    tiers: Vec<TierFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    name: String,
    per_payment_max: String,
    daily_max: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsFile {
    pin_exempt: Vec<Channel>,
    registration_cap: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindFile {
    channels: Vec<Channel>,
    categories: Vec<Category>,
}

/// A no-PIN tier (限额免密): per payment and per Asia/Shanghai calendar day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoPinTier {
    pub name: String,
    pub per_payment_max: Money,
    pub daily_max: Money,
}

/// What an institution kind may take: channels and categories (001 §11, DESIGN §1 Paying 8).
#[derive(Debug, Clone, Default)]
pub struct KindRules {
    pub channels: Vec<Channel>,
    pub categories: Vec<Category>,
}

/// One region's validated policy.
#[derive(Debug, Clone)]
pub struct RegionPolicy {
    pub region: String,
    pub name: String,
    /// Person categories that get a personal account (residents never; Hunan flexible employees not).
    pub account_categories: Vec<PersonCategory>,
    pub family_relations: Vec<Relation>,
    /// First business date on which family accounts may be drawn (Beijing: 2022-12-01, 002 Q11).
    pub family_start_date: NaiveDate,
    pub pin_length: usize,
    /// Consecutive wrong PINs that lock PIN payments until the next Asia/Shanghai day.
    pub pin_lockout_failures: u32,
    pub weak_pins: Vec<String>,
    pub no_pin_tiers: Vec<NoPinTier>,
    pub pin_exempt_channels: Vec<Channel>,
    /// Registration payments above this need the PIN (or a tier that covers them).
    pub registration_cap: Money,
    pub kinds: HashMap<InstitutionKind, KindRules>,
    pub crediting: Crediting,
    pub interest: Interest,
}

impl RegionPolicy {
    pub fn tier(&self, name: &str) -> Option<&NoPinTier> {
        self.no_pin_tiers.iter().find(|tier| tier.name == name)
    }

    pub fn kind_rules(&self, kind: InstitutionKind) -> &KindRules {
        static NONE: std::sync::OnceLock<KindRules> = std::sync::OnceLock::new();
        self.kinds.get(&kind).unwrap_or_else(|| NONE.get_or_init(KindRules::default))
    }

    pub fn has_account(&self, category: PersonCategory) -> bool {
        self.account_categories.contains(&category)
    }

    /// A PIN is weak when policy lists it or it is one digit repeated or a run up or down.
    pub fn is_weak_pin(&self, pin: &str) -> bool {
        let digits = pin.as_bytes();
        let same = digits.windows(2).all(|w| w[0] == w[1]);
        let up = digits.windows(2).all(|w| w[1] == w[0] + 1);
        let down = digits.windows(2).all(|w| w[0] == w[1] + 1);
        same || up || down || self.weak_pins.iter().any(|weak| weak == pin)
    }
}

/// Every region's policy, keyed by region code.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    regions: HashMap<String, Arc<RegionPolicy>>,
}

/// A policy file that cannot be used; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("policy file {file}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub message: String,
}

impl Policies {
    /// Loads every `*.toml` in `dir`. Two files for one region, or none at all, is an error.
    pub fn load_dir(dir: &Path) -> Result<Policies, PolicyError> {
        let fail = |file: &Path, message: String| PolicyError { file: file.display().to_string(), message };
        let entries = std::fs::read_dir(dir).map_err(|e| fail(dir, format!("cannot read directory: {e}")))?;
        let mut paths: Vec<_> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect();
        paths.sort();
        let mut policies = Policies::default();
        for path in &paths {
            let text = std::fs::read_to_string(path).map_err(|e| fail(path, format!("cannot read: {e}")))?;
            let policy = RegionPolicy::parse(&text).map_err(|message| fail(path, message))?;
            if policies.regions.contains_key(&policy.region) {
                return Err(fail(
                    path,
                    format!("key `region`: region {} is already defined by another file", policy.region),
                ));
            }
            policies.regions.insert(policy.region.clone(), Arc::new(policy));
        }
        if policies.regions.is_empty() {
            return Err(fail(dir, "no policy files (*.toml) found".into()));
        }
        Ok(policies)
    }

    /// The policies shipped in `config/policy/`, compiled in so `yibao serve` works from any
    /// directory and tests need no files.
    pub fn builtin() -> Policies {
        let mut policies = Policies::default();
        for (file, text) in BUILTIN {
            let policy = RegionPolicy::parse(text).unwrap_or_else(|e| panic!("built-in policy {file}: {e}"));
            policies.regions.insert(policy.region.clone(), Arc::new(policy));
        }
        policies
    }

    pub fn region(&self, region: &str) -> Option<&Arc<RegionPolicy>> {
        self.regions.get(region)
    }

    pub fn regions(&self) -> impl Iterator<Item = &Arc<RegionPolicy>> {
        self.regions.values()
    }

    /// A payment of `amount` on `channel` needs no PIN in any region (a PIN-exempt channel, and
    /// registration only up to each region's cap): its authorisation never looks at the no-PIN tier.
    pub fn exempt_everywhere(&self, channel: Channel, amount: Money) -> bool {
        self.regions.values().all(|region| {
            region.pin_exempt_channels.contains(&channel)
                && !(channel == Channel::Registration && amount > region.registration_cap)
        })
    }
}

const BUILTIN: &[(&str, &str)] = &[
    ("beijing.toml", include_str!("../../config/policy/beijing.toml")),
    ("jilin.toml", include_str!("../../config/policy/jilin.toml")),
    ("hunan.toml", include_str!("../../config/policy/hunan.toml")),
];

impl RegionPolicy {
    /// Parses and validates one file's text; the error names the key at fault.
    pub fn parse(text: &str) -> Result<RegionPolicy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        if !super::types::is_region_code(&file.region) {
            return Err(format!("key `region`: {:?} is not a 6-digit region code", file.region));
        }
        let family_start_date = NaiveDate::parse_from_str(&file.family.start_date, "%Y-%m-%d")
            .map_err(|_| format!("key `family.start_date`: {:?} is not a date YYYY-MM-DD", file.family.start_date))?;
        if file.pin.length != 6 {
            return Err(format!(
                "key `pin.length`: {} (payment PINs are 6 digits, DESIGN §1 Paying 3; the seeds give no length)",
                file.pin.length
            ));
        }
        if file.pin.lockout_failures == 0 {
            return Err("key `pin.lockout_failures`: must be at least 1".into());
        }
        for weak in &file.pin.weak {
            if weak.len() != file.pin.length || !weak.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("key `pin.weak`: {weak:?} is not a {}-digit PIN", file.pin.length));
            }
        }
        let mut no_pin_tiers = Vec::new();
        for (i, tier) in file.no_pin.tiers.iter().enumerate() {
            let per_payment_max = money(&format!("no_pin.tiers[{i}].per_payment_max"), &tier.per_payment_max)?;
            let daily_max = money(&format!("no_pin.tiers[{i}].daily_max"), &tier.daily_max)?;
            if tier.name.is_empty() || tier.name == "NONE" {
                return Err(format!("key `no_pin.tiers[{i}].name`: {:?} is reserved or empty", tier.name));
            }
            if per_payment_max > daily_max {
                return Err(format!("key `no_pin.tiers[{i}]`: per_payment_max exceeds daily_max"));
            }
            if no_pin_tiers.iter().any(|t: &NoPinTier| t.name == tier.name) {
                return Err(format!("key `no_pin.tiers[{i}].name`: {:?} appears twice", tier.name));
            }
            no_pin_tiers.push(NoPinTier { name: tier.name.clone(), per_payment_max, daily_max });
        }
        let registration_cap = money("channels.registration_cap", &file.channels.registration_cap)?;
        let crediting = Crediting::parse(&file.crediting)?;
        let interest = Interest::parse(&file.interest)?;
        let mut kinds = HashMap::new();
        for (name, rules) in file.institution_kinds {
            let kind = InstitutionKind::parse(&name)
                .ok_or_else(|| format!("key `institution_kinds.{name}`: not an institution kind"))?;
            kinds.insert(kind, KindRules { channels: rules.channels, categories: rules.categories });
        }
        Ok(RegionPolicy {
            region: file.region,
            name: file.name,
            account_categories: file.accounts.categories,
            family_relations: file.family.relations,
            family_start_date,
            pin_length: file.pin.length,
            pin_lockout_failures: file.pin.lockout_failures,
            weak_pins: file.pin.weak,
            no_pin_tiers,
            pin_exempt_channels: file.channels.pin_exempt,
            registration_cap,
            kinds,
            crediting,
            interest,
        })
    }
}

/// A percentage written as a decimal string, within 0..=100.
fn percent(key: &str, text: &str) -> Result<Decimal, String> {
    let value: Decimal = text.parse().map_err(|_| format!("key `{key}`: {text:?} is not a decimal number"))?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(format!("key `{key}`: {text:?} is negative"));
    }
    if value > Decimal::ONE_HUNDRED {
        return Err(format!("key `{key}`: {text:?} is above 100"));
    }
    Ok(value)
}

/// An amount written as a yuan string; the error names the key.
fn money(key: &str, text: &str) -> Result<Money, String> {
    Money::parse(text).map_err(|e| format!("key `{key}`: {text:?} {e}"))
}

fn optional_money(key: &str, text: &Option<String>) -> Result<Option<Money>, String> {
    text.as_deref().map(|text| money(key, text)).transpose()
}

impl Crediting {
    fn parse(file: &CreditingFile) -> Result<Crediting, String> {
        let day = file.credit_by_day_of_month;
        if let Some(day) = day.filter(|day| !(1..=28).contains(day)) {
            return Err(format!("key `crediting.credit_by_day_of_month`: {day} is not a day 1..=28"));
        }
        Ok(Crediting {
            employee_percent_of_base: percent("crediting.employee_percent_of_base", &file.employee_percent_of_base)?,
            retiree_monthly: optional_money("crediting.retiree_monthly", &file.retiree_monthly)?,
            retiree_monthly_under_70: optional_money(
                "crediting.retiree_monthly_under_70",
                &file.retiree_monthly_under_70,
            )?,
            retiree_monthly_from_70: optional_money(
                "crediting.retiree_monthly_from_70",
                &file.retiree_monthly_from_70,
            )?,
            mutual_aid_monthly: optional_money("crediting.mutual_aid_monthly", &file.mutual_aid_monthly)?,
            retiree_percent_of_average_pension: file
                .retiree_percent_of_average_pension
                .as_deref()
                .map(|text| percent("crediting.retiree_percent_of_average_pension", text))
                .transpose()?,
            retiree_average_pension_2021: optional_money(
                "crediting.retiree_average_pension_2021",
                &file.retiree_average_pension_2021,
            )?,
            retiree_seventy_from: file.retiree_seventy_from,
            rules_from: file
                .rules_from
                .as_deref()
                .map(|text| {
                    Period::parse(text)
                        .ok_or_else(|| format!("key `crediting.rules_from`: {text:?} is not a month YYYY-MM"))
                })
                .transpose()?,
            credit_by_day_of_month: day,
        })
    }
}

impl Interest {
    fn parse(file: &InterestFile) -> Result<Interest, String> {
        if file.rates.is_empty() {
            return Err("key `interest.rates`: at least one rate is needed".into());
        }
        let mut rates: Vec<InterestRate> = Vec::with_capacity(file.rates.len());
        for (i, rate) in file.rates.iter().enumerate() {
            let key = format!("interest.rates[{i}]");
            let effective_from = NaiveDate::parse_from_str(&rate.effective_from, "%Y-%m-%d").map_err(|_| {
                format!("key `{key}.effective_from`: {:?} is not a date YYYY-MM-DD", rate.effective_from)
            })?;
            if let Some(previous) = rates.last().filter(|previous| previous.effective_from >= effective_from) {
                return Err(format!(
                    "key `{key}.effective_from`: {effective_from} overlaps the period in force from {} \
                     (list the rates in date order, one per start date)",
                    previous.effective_from
                ));
            }
            let annual_rate_percent = percent(&format!("{key}.annual_rate_percent"), &rate.annual_rate_percent)?;
            rates.push(InterestRate { effective_from, annual_rate_percent });
        }
        Ok(Interest {
            method: file.method,
            rate_kind: file.rate_kind,
            settlement: file.settlement,
            rate_applies: file.rate_applies,
            rates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_payments_no_region_asks_a_pin_for_are_exempt_everywhere() {
        let policies = Policies::builtin();
        let yuan = |text| Money::parse(text).unwrap();
        assert!(policies.exempt_everywhere(Channel::EVoucher, yuan("9999.99")));
        assert!(policies.exempt_everywhere(Channel::CrossRegion, yuan("9999.99")));
        assert!(!policies.exempt_everywhere(Channel::Card, yuan("0.01")));
        // Registration is exempt up to each region's cap: Hunan's 50.00 is the lowest.
        assert!(policies.exempt_everywhere(Channel::Registration, yuan("50.00")));
        assert!(!policies.exempt_everywhere(Channel::Registration, yuan("50.01")));
    }

    #[test]
    fn builtin_policies_load() {
        let policies = Policies::builtin();
        let beijing = policies.region("110000").expect("beijing");
        assert_eq!(beijing.family_start_date, NaiveDate::from_ymd_opt(2022, 12, 1).unwrap());
        assert!(beijing.pin_exempt_channels.contains(&Channel::EVoucher));
        assert!(!beijing.pin_exempt_channels.contains(&Channel::Card));
        let hunan = policies.region("430000").expect("hunan");
        assert!(!hunan.has_account(PersonCategory::Flexible));
        assert!(policies.region("220000").is_some());
    }

    #[test]
    fn unknown_key_is_named() {
        let text = include_str!("../../config/policy/beijing.toml").replace("[pin]", "[pin]\nlokout = 3");
        let error = RegionPolicy::parse(&text).unwrap_err();
        assert!(error.contains("lokout"), "{error}");
    }

    #[test]
    fn bad_amount_is_named() {
        let text =
            include_str!("../../config/policy/beijing.toml").replace("registration_cap = \"", "registration_cap = \"-");
        let error = RegionPolicy::parse(&text).unwrap_err();
        assert!(error.contains("channels.registration_cap"), "{error}");
    }

    #[test]
    fn crediting_and_interest_are_typed() {
        let policies = Policies::builtin();
        let beijing = policies.region("110000").unwrap();
        assert_eq!(beijing.crediting.employee_percent_of_base, Decimal::from(2));
        assert_eq!(beijing.crediting.retiree_monthly_from_70, Some(Money::parse("110.00").unwrap()));
        assert_eq!(beijing.interest.settlement, InterestSettlement::Quarterly);
        let jilin = policies.region("220000").unwrap();
        assert_eq!(jilin.interest.rate_kind, RateKind::Fixed3Month);
        assert_eq!(jilin.interest.rates[0].annual_rate_percent, "1.10".parse::<Decimal>().unwrap());
        assert_eq!(policies.region("430000").unwrap().crediting.retiree_monthly, Some(Money::parse("75.00").unwrap()));
    }

    #[test]
    fn a_wrong_crediting_or_interest_key_is_named() {
        let beijing = include_str!("../../config/policy/beijing.toml");
        let cases = [
            (
                beijing.replace("employee_percent_of_base", "employe_percent_of_base"),
                "unknown field `employe_percent_of_base`",
            ),
            (
                beijing.replace("annual_rate_percent = \"0.35\"", "annual_rate_percent = \"-0.35\""),
                "interest.rates[0].annual_rate_percent",
            ),
            (
                beijing.replace("mutual_aid_monthly = \"3.00\"", "mutual_aid_monthly = \"-3\""),
                "crediting.mutual_aid_monthly",
            ),
            (beijing.replace("settlement = \"quarterly\"", "settlement = \"monthly\""), "unknown variant `monthly`"),
            (beijing.replace("[interest]", "[interest]\nrate = \"1\""), "unknown field `rate`"),
            (
                beijing.replace(
                    "rates = [{ effective_from = \"2015-10-24\", annual_rate_percent = \"0.35\" }]",
                    "rates = [{ effective_from = \"2015-10-24\", annual_rate_percent = \"0.35\" },\n\
                     { effective_from = \"2015-10-24\", annual_rate_percent = \"0.30\" }]",
                ),
                "interest.rates[1].effective_from",
            ),
            (
                beijing.replace("credit_by_day_of_month = 5", "credit_by_day_of_month = 31"),
                "crediting.credit_by_day_of_month",
            ),
        ];
        for (text, key) in cases {
            assert_ne!(text, beijing, "the case for {key} changed nothing");
            let error = RegionPolicy::parse(&text).unwrap_err();
            assert!(error.contains(key), "{key}: {error}");
        }
    }

    #[test]
    fn weak_pins() {
        let policy = Policies::builtin().region("110000").unwrap().clone();
        for weak in ["000000", "111111", "123456", "654321"] {
            assert!(policy.is_weak_pin(weak), "{weak}");
        }
        assert!(!policy.is_weak_pin("284617"));
    }
}
