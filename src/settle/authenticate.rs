//! Who may take the money: the PIN, the no-PIN tier, or a PIN-exempt channel (000 §12,
//! 002 Q8–Q9). The decision is pure; verifying a PIN counts the attempt durably first.

use crate::domain::policy::RegionPolicy;
use crate::domain::{AuthMethod, Channel, Money};
use crate::error::{Failure, Outcome, Reason};
use crate::gateway::Gateway;
use crate::ledger::PinAttempt;
use crate::pin::{self, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub method: AuthMethod,
    /// The payer's PIN is needed (given or not).
    pub pin_required: bool,
    /// For a no-PIN-tier payment, the daily ceiling the ledger re-checks at commit.
    pub no_pin_daily_max: Option<Money>,
}

/// Decides how a payment drawing `draw` from accounts is authorised.
pub fn decide(
    policy: &RegionPolicy,
    channel: Channel,
    draw: Money,
    tier_name: Option<&str>,
    no_pin_used_today: Money,
    pin_given: bool,
) -> Decision {
    // Registration is exempt only up to the cap, so the exemption cannot carry large sums.
    let exempt = policy.pin_exempt_channels.contains(&channel)
        && !(channel == Channel::Registration && draw > policy.registration_cap);
    if exempt {
        return Decision { method: AuthMethod::ChannelExempt, pin_required: false, no_pin_daily_max: None };
    }
    let tier = tier_name.and_then(|name| policy.tier(name)).filter(|tier| {
        draw <= tier.per_payment_max && no_pin_used_today.checked_add(draw).is_some_and(|total| total <= tier.daily_max)
    });
    match (pin_given, tier) {
        (false, Some(tier)) => {
            Decision { method: AuthMethod::NoPinLimit, pin_required: false, no_pin_daily_max: Some(tier.daily_max) }
        }
        (true, Some(_)) => Decision { method: AuthMethod::Pin, pin_required: false, no_pin_daily_max: None },
        (_, None) => Decision { method: AuthMethod::Pin, pin_required: true, no_pin_daily_max: None },
    }
}

/// Checks the payer's PIN against the stored hash. The attempt is counted durably before the
/// hash is computed, so concurrent guesses cannot exceed the lockout count.
pub async fn verify_pin(gateway: &Gateway, policy: &RegionPolicy, psn_no: &str, pin: &Secret) -> Outcome<()> {
    if !pin::is_well_formed(pin.expose(), policy.pin_length) {
        return Err(Failure::invalid("pin", format!("must be {} digits", policy.pin_length)));
    }
    let today = gateway.clock.today();
    let (failures, phc) = match gateway.ledger.pin_attempt_begin(psn_no, today, policy.pin_lockout_failures).await? {
        PinAttempt::NotSet => return Err(Failure::new(Reason::PinNotSet, "no payment PIN is set for this person")),
        PinAttempt::Locked { until } => {
            return Err(Failure::new(Reason::PinLocked, format!("PIN payments are locked until {until}"))
                .with_metadata("locked-until", until))
        }
        // The hash as stored when the attempt was counted: a concurrent ChangePin is not missed.
        PinAttempt::Proceed { failures, phc } => (failures, phc),
    };
    let matches = gateway.pins.verify(pin, phc.expose()).await.map_err(|error| {
        tracing::error!(%error, "PIN verification failed");
        Failure::new(Reason::Internal, "PIN verification failed")
    })?;
    if matches {
        gateway.ledger.pin_attempt_succeeded(psn_no).await?;
        return Ok(());
    }
    let left = policy.pin_lockout_failures.saturating_sub(failures);
    Err(Failure::new(Reason::PinIncorrect, format!("wrong PIN; {left} attempts left before PIN payments lock"))
        .with_metadata("attempts-left", left))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::Policies;

    fn yuan(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    #[test]
    fn decisions_follow_policy() {
        let policies = Policies::builtin();
        let beijing = policies.region("110000").unwrap();
        let decide_card = |draw, tier, used, pin| decide(beijing, Channel::Card, yuan(draw), tier, yuan(used), pin);
        assert_eq!(
            decide(beijing, Channel::EVoucher, yuan("900"), None, Money::ZERO, false).method,
            AuthMethod::ChannelExempt
        );
        // Registration above the cap is not exempt.
        assert!(decide(beijing, Channel::Registration, yuan("100.01"), None, Money::ZERO, false).pin_required);
        assert!(!decide(beijing, Channel::Registration, yuan("100.00"), None, Money::ZERO, false).pin_required);
        assert!(decide_card("1", None, "0", false).pin_required);
        let tier = decide_card("200", Some("T200"), "300", false);
        assert_eq!((tier.method, tier.no_pin_daily_max), (AuthMethod::NoPinLimit, Some(yuan("500"))));
        assert!(decide_card("200.01", Some("T200"), "0", false).pin_required);
        assert!(decide_card("200", Some("T200"), "300.01", false).pin_required);
        assert_eq!(decide_card("999", None, "0", true).method, AuthMethod::Pin);
    }
}
