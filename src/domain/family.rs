//! Who may register whom as family (家庭共济): the rules shared by `AccountService.RegisterFamilyMember`
//! and the bulk import. Pure: the caller looks the two people up.

use super::policy::RegionPolicy;
use super::{AccountStatus, InsuranceStatus, Relation};

/// What the family rules need to know of one side of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub region: String,
    pub status: InsuranceStatus,
    /// `None`: the person has no personal account (a resident, say).
    pub account_status: Option<AccountStatus>,
}

/// Why a link may not be registered; each maps to one stable error reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// The owner has no personal account to share (NO_ACCOUNT).
    OwnerHasNoAccount,
    /// The owner's account is closed (ACCOUNT_CLOSED).
    OwnerAccountClosed,
    /// The region's policy does not allow this relation (FAMILY_RELATION_NOT_ALLOWED).
    RelationNotAllowed,
    /// Family members must be insured in the owner's region, 000 §8 (FAMILY_RELATION_NOT_ALLOWED).
    OtherRegion,
    /// A REMOVED or TERMINATED member no longer enjoys benefits, 000 §14 (FAMILY_RELATION_NOT_ALLOWED).
    MemberWithoutBenefits,
}

impl LinkRefusal {
    pub fn message(self, relation: Relation, region: &str) -> String {
        match self {
            LinkRefusal::OwnerHasNoAccount => "the owner has no personal account to share".into(),
            LinkRefusal::OwnerAccountClosed => "the owner's account is closed".into(),
            LinkRefusal::RelationNotAllowed => {
                format!("relation {relation} is not allowed for family use in region {region}")
            }
            LinkRefusal::OtherRegion => "family members must be insured in the owner's region (000 §8)".into(),
            LinkRefusal::MemberWithoutBenefits => "the member no longer enjoys benefits (000 §14)".into(),
        }
    }
}

/// `None` when `owner` may register `member` as `relation` under the owner's region `policy`.
pub fn link_refusal(owner: &Party, member: &Party, relation: Relation, policy: &RegionPolicy) -> Option<LinkRefusal> {
    match owner.account_status {
        None => return Some(LinkRefusal::OwnerHasNoAccount),
        Some(AccountStatus::Closed) => return Some(LinkRefusal::OwnerAccountClosed),
        Some(_) => {}
    }
    if !policy.family_relations.contains(&relation) {
        return Some(LinkRefusal::RelationNotAllowed);
    }
    if member.region != owner.region {
        return Some(LinkRefusal::OtherRegion);
    }
    if matches!(member.status, InsuranceStatus::Removed | InsuranceStatus::Terminated) {
        return Some(LinkRefusal::MemberWithoutBenefits);
    }
    None
}
