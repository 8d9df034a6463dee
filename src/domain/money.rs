//! Money: yuan with exactly two decimals, on `rust_decimal`, never a float.
//!
//! Amounts cross every module boundary as [`Money`]. Wire input is parsed strictly by
//! [`Money::parse`]: ASCII digits, optionally a point and one or two more digits; no sign, no
//! exponent, no spaces, no leading zeros, and at most [`Money::INPUT_MAX`]. Ledger storage uses
//! whole fen (`i64`), converted exactly by [`Money::from_fen`] / [`Money::to_fen`].

use rust_decimal::Decimal;
use std::fmt;

/// An amount of yuan, scale 2. May be negative only as a signed ledger delta; input never is.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

/// Why a wire amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("is empty")]
    Empty,
    #[error("must be digits with at most two decimals, like 12.30 (no sign, exponent or spaces)")]
    Malformed,
    #[error("has more than two decimals")]
    TooPrecise,
    #[error("exceeds the maximum of {0}")]
    TooLarge(Money),
    #[error("must be greater than zero")]
    NotPositive,
}

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);
    /// The largest amount one request may carry: 1,000,000.00 yuan. Far above any personal account
    /// balance, low enough that sums of many amounts never approach `i64` fen.
    pub const INPUT_MAX: Money = Money(Decimal::from_parts(100_000_000, 0, 0, false, 2));

    /// Parses a wire amount strictly (see the module docs). Zero is allowed; callers that need a
    /// positive amount use [`Money::parse_positive`].
    pub fn parse(text: &str) -> Result<Money, MoneyError> {
        if text.is_empty() {
            return Err(MoneyError::Empty);
        }
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(whole) || (whole.len() > 1 && whole.starts_with('0')) {
            return Err(MoneyError::Malformed);
        }
        if let Some(fraction) = fraction {
            if !all_digits(fraction) {
                return Err(MoneyError::Malformed);
            }
            if fraction.len() > 2 {
                return Err(MoneyError::TooPrecise);
            }
        }
        // At most 7 integer digits can be within INPUT_MAX; refuse longer before any arithmetic.
        if whole.len() > 7 {
            return Err(MoneyError::TooLarge(Money::INPUT_MAX));
        }
        let mut fen: i64 = whole.parse::<i64>().map_err(|_| MoneyError::Malformed)? * 100;
        if let Some(fraction) = fraction {
            let digits: i64 = fraction.parse().map_err(|_| MoneyError::Malformed)?;
            fen += if fraction.len() == 1 { digits * 10 } else { digits };
        }
        let money = Money::from_fen(fen);
        if money > Money::INPUT_MAX {
            return Err(MoneyError::TooLarge(Money::INPUT_MAX));
        }
        Ok(money)
    }

    /// [`Money::parse`], refusing zero.
    pub fn parse_positive(text: &str) -> Result<Money, MoneyError> {
        let money = Money::parse(text)?;
        if money.is_zero() {
            return Err(MoneyError::NotPositive);
        }
        Ok(money)
    }

    pub fn from_fen(fen: i64) -> Money {
        Money(Decimal::new(fen, 2))
    }

    /// Whole fen. Exact: every `Money` has scale 2 by construction.
    pub fn to_fen(self) -> i64 {
        let mut value = self.0;
        value.rescale(2);
        i64::try_from(value.mantissa()).expect("money within i64 fen")
    }

    /// From a decimal computed elsewhere (interest, percentages): rounds half-up (away from zero)
    /// to the fen, as the policy documents require.
    pub fn from_decimal_half_up(value: Decimal) -> Money {
        let mut rounded = value.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        rounded.rescale(2);
        Money(rounded)
    }

    /// From a ledger value (NUMERIC(18,2) or its text): exact, any sign, at most two decimals.
    pub fn from_ledger(value: Decimal) -> Option<Money> {
        (value.scale() <= 2).then(|| Money::normalized(value))
    }

    pub fn from_ledger_text(text: &str) -> Option<Money> {
        text.parse::<Decimal>().ok().and_then(Money::from_ledger)
    }

    pub fn as_decimal(self) -> Decimal {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    pub fn is_negative(self) -> bool {
        self.0.is_sign_negative() && !self.0.is_zero()
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money::normalized)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money::normalized)
    }

    /// `self - other`, never below zero.
    pub fn saturating_sub(self, other: Money) -> Money {
        if other >= self {
            Money::ZERO
        } else {
            self.checked_sub(other).expect("no overflow when other < self")
        }
    }

    pub fn negated(self) -> Money {
        Money::normalized(-self.0)
    }

    pub fn sum<I: IntoIterator<Item = Money>>(items: I) -> Money {
        items.into_iter().fold(Money::ZERO, |total, item| total.checked_add(item).expect("money sum within range"))
    }

    fn normalized(mut value: Decimal) -> Money {
        value.rescale(2);
        if value.is_zero() {
            value.set_sign_positive(true);
        }
        Money(value)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut value = self.0;
        value.rescale(2);
        write!(f, "{value}")
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "¥{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!(Money::parse("12.30").unwrap().to_fen(), 1230);
        assert_eq!(Money::parse("12.3").unwrap().to_fen(), 1230);
        assert_eq!(Money::parse("12").unwrap().to_fen(), 1200);
        assert_eq!(Money::parse("0").unwrap().to_fen(), 0);
        assert_eq!(Money::parse("0.05").unwrap().to_fen(), 5);
        assert_eq!(Money::parse("1000000.00").unwrap(), Money::INPUT_MAX);
        assert_eq!(Money::parse("12.3").unwrap().to_string(), "12.30");
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "-1", "+1", "1e3", "1E3", " 1", "1 ", "1.", ".5", "01", "00.10", "1,000", "1.2.3", "NaN", "inf", "１",
            "0x10", "1_000",
        ] {
            assert_eq!(Money::parse(bad), Err(MoneyError::Malformed), "{bad:?}");
        }
        assert_eq!(Money::parse(""), Err(MoneyError::Empty));
        assert_eq!(Money::parse("1.234"), Err(MoneyError::TooPrecise));
        assert_eq!(Money::parse("1000000.01"), Err(MoneyError::TooLarge(Money::INPUT_MAX)));
        assert_eq!(Money::parse("99999999999999999999999"), Err(MoneyError::TooLarge(Money::INPUT_MAX)));
        assert_eq!(Money::parse_positive("0.00"), Err(MoneyError::NotPositive));
    }

    #[test]
    fn rounds_half_up_to_the_fen() {
        use std::str::FromStr;
        let round = |s: &str| Money::from_decimal_half_up(Decimal::from_str(s).unwrap()).to_string();
        assert_eq!(round("246.9134"), "246.91");
        assert_eq!(round("0.005"), "0.01");
        assert_eq!(round("0.004999"), "0.00");
        assert_eq!(round("2.675"), "2.68");
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(fen in 0i64..=100_000_000) {
            let money = Money::from_fen(fen);
            prop_assert_eq!(Money::parse(&money.to_string()).unwrap(), money);
            prop_assert_eq!(money.to_fen(), fen);
        }

        #[test]
        fn arithmetic_matches_integer_fen(a in 0i64..=100_000_000, b in 0i64..=100_000_000) {
            let (x, y) = (Money::from_fen(a), Money::from_fen(b));
            prop_assert_eq!(x.checked_add(y).unwrap().to_fen(), a + b);
            prop_assert_eq!(x.checked_sub(y).unwrap().to_fen(), a - b);
            prop_assert_eq!(x.saturating_sub(y).to_fen(), (a - b).max(0));
            prop_assert_eq!(x.negated().to_fen(), -a);
        }

        #[test]
        fn never_accepts_text_with_a_sign_or_exponent(s in "[+-eE ]?[0-9]{1,4}([.][0-9]{0,3})?[eE+-]?") {
            let accepted = Money::parse(&s).is_ok();
            let clean = s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
            if accepted { prop_assert!(clean); }
        }
    }
}
