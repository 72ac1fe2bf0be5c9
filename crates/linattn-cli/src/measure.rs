//! Timing one attention call: a warm-up, then repetitions reduced to their median, and
//! the memory each timed call allocates beyond its output.

use crate::alloc::ALLOCATOR;
use crate::gates::{Gate, RandomGates};
use linattn::{Attention, Element, HeadLayout, Tensor};
use std::time::{Duration, Instant};

/// Timed runs stop once they add up to this...
const TIME_BUDGET: Duration = Duration::from_secs(1);
/// ...or reach this many...
const MAX_RUNS: usize = 10;
/// ...but are never fewer than this...
const MIN_RUNS: usize = 3;
/// ...unless one run (the warm-up included) takes longer than this; then one timed run
/// is all, since a sweep to long sequences would otherwise take hours.
const SLOW_RUN: Duration = Duration::from_secs(5);

/// What the timed runs of one call showed.
pub struct Measurement<T> {
    /// Median wall time of the timed runs.
    pub median: Duration,
    /// Number of timed runs.
    pub runs: usize,
    /// Most bytes a timed call had allocated at once beyond what was allocated before it
    /// (the output is allocated before).
    pub extra_bytes: usize,
    /// The output of the last run.
    pub output: Tensor<T>,
}

/// Runs `attention` once to warm up (thread pool, page faults), then times it writing
/// into the output of the warm-up, as a caller that serves many requests would: a fresh
/// output per call would time the kernel's zeroing of new pages as well. The gated
/// family runs with random gates ([`RandomGates`], g drawn for `gate`), its final state
/// made anew each call.
pub fn measure<T: Element>(
    attention: &Attention,
    gate: Option<Gate>,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
) -> linattn::Result<Measurement<T>> {
    let gated = attention.method().info().layout == HeadLayout::GroupedValues;
    let gates = RandomGates::for_call(attention.method(), gate, v.shape(), q.head_dim())?;
    let into = |output: &mut Tensor<T>| match gated {
        true => attention
            .forward_gated_into(q, k, v, &gates.inputs(), output)
            .map(drop),
        false => attention.forward_into(q, k, v, output),
    };
    let warm_up_start = Instant::now();
    let mut output = if gated {
        attention.forward_gated(q, k, v, &gates.inputs())?.out
    } else {
        attention.forward(q, k, v)?
    };
    let warm_up = warm_up_start.elapsed();
    let mut times = Vec::new();
    let mut extra_bytes = 0;
    loop {
        let before = ALLOCATOR.mark();
        let start = Instant::now();
        into(&mut output)?;
        times.push(start.elapsed());
        extra_bytes = extra_bytes.max(ALLOCATOR.peak().saturating_sub(before));
        if !wants_another_run(&times, warm_up) {
            return Ok(Measurement {
                median: median(&mut times),
                runs: times.len(),
                extra_bytes,
                output,
            });
        }
    }
}

fn wants_another_run(times: &[Duration], warm_up: Duration) -> bool {
    let slow = warm_up > SLOW_RUN || times.iter().any(|&t| t > SLOW_RUN);
    let total: Duration = times.iter().sum();
    !slow && (times.len() < MIN_RUNS || (total < TIME_BUDGET && times.len() < MAX_RUNS))
}

/// The middle time, or the mean of the two middle ones; `times` must not be empty.
pub fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    let middle = times.len() / 2;
    if times.len() % 2 == 1 {
        times[middle]
    } else {
        (times[middle - 1] + times[middle]) / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn repeats_fast_calls_up_to_ten_and_slow_ones_once() {
        assert!(wants_another_run(&[MS], MS));
        assert!(!wants_another_run(&[MS; 10], MS));
        assert!(wants_another_run(&[400 * MS; 2], MS));
        assert!(!wants_another_run(&[400 * MS; 3], MS));
        assert!(wants_another_run(&[2000 * MS], 2000 * MS));
        assert!(!wants_another_run(&[6000 * MS], 6000 * MS));
        assert!(!wants_another_run(&[MS], 6000 * MS));
    }

    #[test]
    fn takes_the_middle() {
        assert_eq!(median(&mut [3 * MS, MS, 2 * MS]), 2 * MS);
        assert_eq!(median(&mut [4 * MS, MS, 2 * MS, 3 * MS]), 5 * MS / 2);
    }
}
