//! Lease arithmetic (rule 7).
//!
//! A holder counts its lease from the moment it SENT the request that was
//! answered (it cannot know when the grantor answered), so its view ends no
//! later than the grantor's. A grantor counts from the moment it last
//! answered, and adds a margin for clock-rate drift between the two
//! machines, so its bound ends no earlier than the holder's. The promoting
//! side waits for the grantor's bound; by then the old primary has stopped.

/// Lease tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Lease length as the holder counts it.
    pub lease_ms: u64,
    /// Allowed clock-rate difference between two machines, per mille.
    pub drift_permille: u64,
    /// Fixed extra wait on the grantor's side (scheduling hiccups).
    pub margin_ms: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            lease_ms: 2000,
            drift_permille: 50,
            margin_ms: 100,
        }
    }
}

impl LeaseSettings {
    /// Holder side: the lease obtained by a request sent at `sent_ms` is valid
    /// before this instant.
    pub fn holder_until_ms(&self, sent_ms: u64) -> u64 {
        sent_ms.saturating_add(self.lease_ms)
    }

    /// Grantor side: a lease last granted (answered) at `granted_ms` has
    /// certainly run out on the holder at this instant.
    pub fn grantor_bound_ms(&self, granted_ms: u64) -> u64 {
        let drift = self.lease_ms.saturating_mul(self.drift_permille) / 1000;
        granted_ms
            .saturating_add(self.lease_ms)
            .saturating_add(drift)
            .saturating_add(self.margin_ms)
    }

    /// How often to renew so that one lost message does not lapse the lease.
    pub fn renew_interval_ms(&self) -> u64 {
        (self.lease_ms / 4).max(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grantor_bound_is_after_holder_expiry_even_with_drift() {
        let s = LeaseSettings::default();
        // The holder sent at 1000 (its clock), the grantor answered at its 1000.
        // Even if the holder's clock runs 4 % slow relative to the grantor's,
        // its lease ends (in grantor time) before the grantor's bound.
        let holder_len_in_grantor_time = s.lease_ms * 104 / 100;
        assert!(1000 + holder_len_in_grantor_time < s.grantor_bound_ms(1000));
        assert!(s.holder_until_ms(1000) < s.grantor_bound_ms(1000));
        assert_eq!(s.renew_interval_ms(), 500);
    }
}
