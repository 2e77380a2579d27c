//! Seeded runs: many random schedules per test (2000 by default,
//! `BLKREP_SIM_SEEDS=N` for more, `BLKREP_SIM_SEED=N` to replay one), every
//! failing seed listed, with coverage counters that show the schedules
//! reached the paths they exist for.

use super::*;

pub(super) fn run_seed(seed: u64, steps: usize, crashes: bool, witness: bool) -> Coverage {
    let mut sim = Sim::with_witness(seed, witness);
    sim.crashes = crashes;
    sim.power_cuts = crashes;
    for _ in 0..steps {
        sim.step();
    }
    sim.settle();
    check_converged(&sim, "after heal");
    if crashes {
        // Both nodes lose power at once (a building's outage): only what a
        // flush or FUA covered must survive (P1), and the copies converge.
        sim.double_power_cut();
        sim.settle();
        check_converged(&sim, "after a power cut of both nodes");
    }
    sim.cov
}

pub(super) fn run_seeds(crashes: bool) {
    run_seeds_with(crashes, false)
}

pub(super) fn run_seeds_with(crashes: bool, witness: bool) {
    let seeds: Vec<u64> = match std::env::var("BLKREP_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("BLKREP_SIM_SEED must be a number")],
        // A long run: BLKREP_SIM_SEEDS=100000 cargo test --release --lib seeded
        Err(_) => (1..=std::env::var("BLKREP_SIM_SEEDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2000))
            .collect(),
    };
    let many = seeds.len() >= 1000;
    let mut total = Coverage::default();
    // A long run reports every failing seed, not just the first.
    let mut failed = Vec::new();
    for seed in seeds {
        match std::panic::catch_unwind(|| run_seed(seed, 400, crashes, witness)) {
            Ok(c) => {
                total.promotions += c.promotions;
                total.forwarded_writes += c.forwarded_writes;
                total.reads += c.reads;
                total.hand_overs += c.hand_overs;
                total.frozen_steps += c.frozen_steps;
                total.power_cuts += c.power_cuts;
                total.dropped_writes += c.dropped_writes;
                total.torn_writes += c.torn_writes;
                total.promotions_after_landing += c.promotions_after_landing;
            }
            Err(_) => {
                eprintln!("simulation failed for seed {seed}; replay with BLKREP_SIM_SEED={seed}");
                failed.push(seed);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "simulation failed for seeds {failed:?}; replay one with BLKREP_SIM_SEED=<seed>"
    );
    eprintln!("coverage (crashes {crashes}, witness {witness}): {total:?}");
    if many {
        assert!(
            total.promotions > 0
                && total.forwarded_writes > 0
                && total.reads > 0
                && total.hand_overs > 0
                && total.frozen_steps > 0,
            "the schedules never reached a promoted sync target's paths: {total:?}"
        );
        assert!(
            !crashes || (total.power_cuts > 0 && total.dropped_writes > 0 && total.torn_writes > 0),
            "the schedules never cut power, dropped or tore a write: {total:?}"
        );
    }
}

/// Issue 18: runs a schedule until an incomplete copy can be forced while
/// the complete one is away, forces it, runs on (the forced copy writes,
/// links flap, nodes crash) with the complete copy checked after every
/// step, then heals: both must report a split brain. `resolve` on the
/// forced copy then makes both equal to the complete copy's lineage.
/// Returns whether the schedule reached a forced promotion.
pub(super) fn run_forced_seed(seed: u64, crashes: bool, witness: bool) -> bool {
    let mut sim = Sim::with_witness(seed, witness);
    sim.crashes = crashes;
    let mut forced_at = None;
    for step in 0..1200 {
        sim.step();
        if forced_at.is_none() && sim.rng2.below(4) == 0 && sim.try_force() {
            forced_at = Some(step);
        }
        sim.check_complete_copy();
        if forced_at.is_some_and(|at| step > at + 300) {
            break;
        }
    }
    let Some(f) = sim.forced.as_ref().map(|f| 1 - f.complete) else {
        return false;
    };
    let c = 1 - f;
    sim.settle();
    sim.check_complete_copy();
    let held = sim
        .forced
        .as_ref()
        .map(|r| r.held.clone())
        .unwrap_or_default();
    let synced = (0..2).all(|n| sim.nodes[n].eng.status().relation == Some(Relation::InSync));
    if !synced {
        for n in 0..2 {
            // A split brain, or refused for another reason first (both
            // primary; a forced promotion that is not durable yet).
            let rel = sim.nodes[n].eng.status().relation;
            assert!(
                matches!(rel, Some(Relation::Diverged | Relation::Refused(_))),
                "seed {seed}: node {n} neither in sync nor refusing after the heal ({rel:?}); log {:?}",
                sim.log
            );
        }
        // The operator discards the forced copy, or the complete one where
        // it was left Inconsistent (it took resync data from the forced
        // copy while the force was not durable yet, when the forced copy
        // still announced its older, complete state).
        let victim = if sim.nodes[c].eng.disk == DiskState::Inconsistent {
            c
        } else {
            f
        };
        if sim.nodes[victim].eng.role == Role::Primary {
            sim.demote(victim).expect("the victim is idle");
        }
        sim.nodes[victim].eng.discard_local().expect("resolve");
        sim.log.push(format!("resolve {victim}"));
        sim.drain(victim);
    }
    // (In sync on their own: the forced copy, forced from an Outdated one,
    // descends from the complete copy's generation, so it held every write
    // the complete copy acknowledged; the per-step check made sure that
    // none of them regressed there, and the check below that both have them.)
    sim.forced = None;
    sim.settle();
    let (a, b) = (&sim.nodes[0], &sim.nodes[1]);
    for n in 0..2 {
        assert_eq!(
            sim.nodes[n].eng.status().relation,
            Some(Relation::InSync),
            "seed {seed}: node {n} not in sync after the resolve;\n a {:?}\n b {:?}\n log {:?}",
            a.eng.status(),
            b.eng.status(),
            sim.log
        );
    }
    assert_eq!(
        norm(&a.disk),
        norm(&b.disk),
        "seed {seed}: replicas differ after the resolve; log {:?}",
        sim.log
    );
    // Every write acknowledged before the force is on both copies.
    for (b, v) in &held {
        let have = a.disk.get(b).copied().unwrap_or(0) & !ZERO_FLAG;
        assert!(
            have >= *v,
            "seed {seed}: acknowledged v{v} at block {b} lost after the resolve (have v{have}); log {:?}",
            sim.log
        );
    }
    true
}

pub(super) fn run_forced_seeds(crashes: bool, witness: bool) {
    let seeds: Vec<u64> = match std::env::var("BLKREP_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("BLKREP_SIM_SEED must be a number")],
        Err(_) => (1..=std::env::var("BLKREP_SIM_SEEDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(500))
            .collect(),
    };
    let many = seeds.len() >= 100;
    let mut reached = 0;
    for seed in seeds {
        match std::panic::catch_unwind(|| run_forced_seed(seed, crashes, witness)) {
            Ok(r) => reached += u64::from(r),
            Err(_) => panic!(
                "forced-promotion simulation failed for seed {seed}; replay with BLKREP_SIM_SEED={seed} cargo test --lib forced"
            ),
        }
    }
    eprintln!("forced promotions reached (crashes {crashes}, witness {witness}): {reached}");
    if many {
        assert!(reached > 0, "no schedule reached a forced promotion");
    }
}

#[test]
fn seeded_forced_promotions_never_overwrite_the_complete_copy() {
    run_forced_seeds(true, false);
}

#[test]
fn seeded_forced_promotions_with_a_witness_never_overwrite_the_complete_copy() {
    run_forced_seeds(true, true);
}

#[test]
fn seeded_crashes_never_lose_acknowledged_writes_and_converge() {
    run_seeds(true);
}

#[test]
fn seeded_schedules_keep_the_rules_and_converge() {
    run_seeds(false);
}

#[test]
fn seeded_witness_schedules_keep_rule_2_and_converge() {
    run_seeds_with(false, true);
}

#[test]
fn seeded_witness_crashes_never_lose_acknowledged_writes() {
    run_seeds_with(true, true);
}
