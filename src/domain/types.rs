//! The domain's vocabulary: channels, categories, statuses, relations, roles. Each enum has a
//! stable upper-case name used in the ledger's columns and in the policy files; the wire enums of
//! `yibao.v1` map onto these in `rpc::convert`.

/// Declares a fieldless enum with a stable name per variant, `name()` and `parse()`.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $name::parse(&text).ok_or_else(|| {
                    let names: Vec<&str> = $name::ALL.iter().map(|v| v.name()).collect();
                    serde::de::Error::custom(format!("unknown {} {text:?}, expected one of {}", stringify!($name), names.join(", ")))
                })
            }
        }
    };
}

named_enum!(
    /// How a payment reaches the gateway.
    Channel { Card = "CARD", EVoucher = "E_VOUCHER", Registration = "REGISTRATION", CrossRegion = "CROSS_REGION" }
);
named_enum!(
    /// What is paid for.
    Category {
        Outpatient = "OUTPATIENT", Inpatient = "INPATIENT", Pharmacy = "PHARMACY",
        Registration = "REGISTRATION", Premium = "PREMIUM",
    }
);
named_enum!(PayMode { Partial = "PARTIAL", FullOnly = "FULL_ONLY" });
named_enum!(AuthMethod { Pin = "PIN", NoPinLimit = "NO_PIN_LIMIT", ChannelExempt = "CHANNEL_EXEMPT" });
named_enum!(PersonCategory { Employee = "EMPLOYEE", Retiree = "RETIREE", Flexible = "FLEXIBLE", Resident = "RESIDENT" });
named_enum!(
    /// Insurance status (参保状态).
    InsuranceStatus { Active = "ACTIVE", Suspended = "SUSPENDED", Removed = "REMOVED", Terminated = "TERMINATED" }
);
named_enum!(AccountStatus { Open = "OPEN", Frozen = "FROZEN", Closed = "CLOSED" });
named_enum!(CardStatus { Normal = "NORMAL", Lost = "LOST" });
named_enum!(
    /// What the member is to the owner.
    Relation {
        Spouse = "SPOUSE", Parent = "PARENT", Child = "CHILD", Sibling = "SIBLING",
        Grandparent = "GRANDPARENT", Grandchild = "GRANDCHILD",
    }
);
named_enum!(InstitutionKind { Hospital = "HOSPITAL", Pharmacy = "PHARMACY", CrossRegionPlatform = "CROSS_REGION_PLATFORM" });
named_enum!(
    /// A caller's role; every API key has exactly one.
    Role { Institution = "INSTITUTION", Service = "SERVICE", Operator = "OPERATOR" }
);
named_enum!(
    /// Settlement status as stored; PLANNED exists only in PreSettle answers.
    SettlementStatus {
        Planned = "PLANNED", Settled = "SETTLED", Reversed = "REVERSED",
        PartiallyRefunded = "PARTIALLY_REFUNDED", Refunded = "REFUNDED",
    }
);
named_enum!(
    /// Kind of a ledger transaction, as a person sees it in their entries.
    TxnKind {
        Settlement = "SETTLEMENT", Refund = "REFUND", Reversal = "REVERSAL", Adjustment = "ADJUSTMENT",
        MonthlyCredit = "MONTHLY_CREDIT", MutualAid = "MUTUAL_AID", Interest = "INTEREST",
        TransferOut = "TRANSFER_OUT", TransferIn = "TRANSFER_IN", Withdrawal = "WITHDRAWAL",
        OpeningBalance = "OPENING_BALANCE",
    }
);
named_enum!(
    /// The ledger's system accounts: the other side of every personal posting.
    SystemAccount {
        PooledFund = "POOLED_FUND", Contributions = "CONTRIBUTIONS", InstitutionPayable = "INSTITUTION_PAYABLE",
        InterestExpense = "INTEREST_EXPENSE", TransferClearing = "TRANSFER_CLEARING",
        WithdrawalsPayable = "WITHDRAWALS_PAYABLE", MutualAidFund = "MUTUAL_AID_FUND",
        ManualAdjustment = "MANUAL_ADJUSTMENT", MigrationClearing = "MIGRATION_CLEARING",
    }
);

/// A 6-digit region code (admdvs), e.g. 110000 for Beijing.
pub fn is_region_code(text: &str) -> bool {
    text.len() == 6 && text.bytes().all(|b| b.is_ascii_digit())
}

/// Person numbers are what the national platform issues: 1–30 ASCII letters and digits.
pub fn is_psn_no(text: &str) -> bool {
    (1..=30).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `1101********1234`: enough for an operator to find the person, too little to identify them.
pub fn mask_psn_no(psn_no: &str) -> String {
    let chars: Vec<char> = psn_no.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for channel in Channel::ALL {
            assert_eq!(Channel::parse(channel.name()), Some(*channel));
        }
        assert_eq!(Relation::parse("PARENT"), Some(Relation::Parent));
        assert_eq!(Relation::parse("parent"), None);
    }

    #[test]
    fn masks_person_numbers() {
        assert_eq!(mask_psn_no("110101199001011234"), "1101**********1234");
        assert_eq!(mask_psn_no("P1"), "**");
    }
}
