//! The deduction plan: which account gives how much. Pure; no I/O.
//!
//! Order of deduction (000 §10, 002 Q13): the payer's own account first, then family accounts in the
//! payer's chosen order; each gives as much as it has, up to what is still owed. A medical settlement
//! leaves the rest to cash; a full-only payment (premiums, 002 Q6) is all or nothing.

use super::money::Money;
use super::types::PayMode;

/// How much each source gives, in the order given, and what is left to cash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One entry per source, same order as the input; zero where a source gives nothing.
    pub draws: Vec<Money>,
    /// Sum of `draws`.
    pub total: Money,
    /// `amount - total`: the patient pays this in cash (`psn_cash_pay`).
    pub cash: Money,
}

/// A full-only payment the sources cannot cover: how much they could have given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insufficient {
    pub available: Money,
}

/// Plans `amount` over `available` (per source, in deduction order). Negative availability (never
/// expected) counts as zero.
pub fn plan(amount: Money, mode: PayMode, available: &[Money]) -> Result<Plan, Insufficient> {
    let mut owed = amount;
    let mut draws = Vec::with_capacity(available.len());
    for &have in available {
        let have = if have.is_negative() { Money::ZERO } else { have };
        let take = owed.min(have);
        owed = owed.checked_sub(take).expect("take <= owed");
        draws.push(take);
    }
    let total = Money::sum(draws.iter().copied());
    if mode == PayMode::FullOnly && !owed.is_zero() {
        return Err(Insufficient { available: total });
    }
    let plan = Plan { draws, total, cash: owed };
    debug_assert_eq!(plan.total.checked_add(plan.cash), Some(amount));
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn yuan(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    #[test]
    fn own_account_first_then_family_in_order() {
        let plan = plan(yuan("100"), PayMode::Partial, &[yuan("30"), yuan("50"), yuan("40")]).unwrap();
        assert_eq!(plan.draws, vec![yuan("30"), yuan("50"), yuan("20")]);
        assert_eq!(plan.cash, Money::ZERO);
    }

    #[test]
    fn partial_leaves_the_rest_to_cash() {
        let plan = plan(yuan("100"), PayMode::Partial, &[yuan("30.5")]).unwrap();
        assert_eq!(plan.total, yuan("30.50"));
        assert_eq!(plan.cash, yuan("69.50"));
    }

    #[test]
    fn full_only_is_all_or_nothing() {
        assert_eq!(
            plan(yuan("100"), PayMode::FullOnly, &[yuan("60"), yuan("39.99")]),
            Err(Insufficient { available: yuan("99.99") })
        );
        assert!(plan(yuan("100"), PayMode::FullOnly, &[yuan("60"), yuan("40")]).is_ok());
    }

    proptest! {
        #[test]
        fn splits_sum_respect_balances_and_order(
            amount in 0i64..2_000_000,
            balances in proptest::collection::vec(0i64..1_000_000, 0..5),
            full_only in any::<bool>(),
        ) {
            let available: Vec<Money> = balances.iter().map(|&b| Money::from_fen(b)).collect();
            let mode = if full_only { PayMode::FullOnly } else { PayMode::Partial };
            let total_available: i64 = balances.iter().sum();
            match plan(Money::from_fen(amount), mode, &available) {
                Ok(plan) => {
                    prop_assert_eq!(plan.draws.len(), available.len());
                    prop_assert_eq!(Money::sum(plan.draws.iter().copied()), plan.total);
                    prop_assert_eq!(plan.total.to_fen() + plan.cash.to_fen(), amount);
                    prop_assert_eq!(plan.total.to_fen(), amount.min(total_available));
                    for (draw, have) in plan.draws.iter().zip(&available) {
                        prop_assert!(draw <= have);
                        prop_assert!(!draw.is_negative());
                    }
                    // Order: a later source gives only when every earlier one gave all it had.
                    for i in 1..plan.draws.len() {
                        if !plan.draws[i].is_zero() {
                            prop_assert_eq!(&plan.draws[..i], &available[..i]);
                        }
                    }
                    if full_only { prop_assert!(plan.cash.is_zero()); }
                }
                Err(Insufficient { available: could }) => {
                    prop_assert!(full_only);
                    prop_assert!(total_available < amount);
                    prop_assert_eq!(could.to_fen(), total_available);
                }
            }
        }
    }
}
