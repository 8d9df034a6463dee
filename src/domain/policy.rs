//! Regional policy as data (DESIGN §4): one TOML file per region under `config/policy/`, parsed
//! with unknown keys refused, then validated into a [`RegionPolicy`] whose amounts are [`Money`]
//! and whose dates are dates. A wrong file stops the gateway at start with the file and key named.

use super::money::Money;
use super::types::{Category, Channel, InstitutionKind, PersonCategory, Relation};
use chrono::NaiveDate;
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
    // Crediting and interest rules belong to the money-in issue; kept as data until then.
    crediting: Option<toml::Table>,
    interest: Option<toml::Table>,
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
    pub crediting: toml::Table,
    pub interest: toml::Table,
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
        let money = |key: &str, text: &str| Money::parse(text).map_err(|e| format!("key `{key}`: {text:?} {e}"));
        if !super::types::is_region_code(&file.region) {
            return Err(format!("key `region`: {:?} is not a 6-digit region code", file.region));
        }
        let family_start_date = NaiveDate::parse_from_str(&file.family.start_date, "%Y-%m-%d")
            .map_err(|_| format!("key `family.start_date`: {:?} is not a date YYYY-MM-DD", file.family.start_date))?;
        if file.pin.length != 6 {
            return Err(format!("key `pin.length`: {} (payment PINs are 6 digits, 000 §12)", file.pin.length));
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
            crediting: file.crediting.unwrap_or_default(),
            interest: file.interest.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn weak_pins() {
        let policy = Policies::builtin().region("110000").unwrap().clone();
        for weak in ["000000", "111111", "123456", "654321"] {
            assert!(policy.is_weak_pin(weak), "{weak}");
        }
        assert!(!policy.is_weak_pin("284617"));
    }
}
