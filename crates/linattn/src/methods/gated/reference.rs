//! The family's recurrences written out token by token in f64, from their definitions
//! (flash-linear-attention's `naive_recurrent_*`):
//!
//! - `S' = Diag(e^{g_t}) S_{t−1}` (no decay: `S' = S_{t−1}`);
//! - `S_t = S' + k_t v_tᵀ`, or with the delta rule `S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ`;
//! - `o_t = s · S_tᵀ q_t`.

use super::{GateInputs, GatedOutput, Rule, RuleDecay, gated_shape};
use crate::base::{Problem, Result, Tensor};

/// Outputs and final states of `rule` on q, k, v and `inputs`, one token at a time.
pub(crate) fn recurrence(
    rule: &Rule,
    problem: &Problem,
    [q, k, v]: [&Tensor<f64>; 3],
    inputs: &GateInputs<'_, f64>,
) -> Result<GatedOutput<f64>> {
    let shape = gated_shape(problem);
    let computed = super::raw::Computed::of(inputs)?;
    let inputs = rule.check_inputs(&shape, &computed.inputs(inputs))?;
    let (dk, dv) = (shape.dim_k, shape.dim_v);
    let group = shape.heads_v / shape.heads;
    let scale = rule.scale(dk);
    let mut out = Tensor::zeros([shape.batch, shape.len, shape.heads_v, dv])?;
    // Each sequence as (batch row, tokens, its state): the batch's rows, or the packed
    // sequences of a batch of one.
    let sequences: Vec<(usize, std::ops::Range<usize>, usize)> = match inputs.cu_seqlens {
        Some(cu) => (0..cu.len() - 1)
            .map(|n| (0, cu[n]..cu[n + 1], n))
            .collect(),
        None => (0..shape.batch).map(|b| (b, 0..shape.len, b)).collect(),
    };
    let mut final_state = match inputs.initial_state {
        Some(initial) => initial.clone(),
        None => Tensor::zeros([sequences.len(), shape.heads_v, dk, dv])?,
    };
    let normalised = |x: &[f64]| -> Vec<f64> {
        if !rule.l2norm_qk {
            return x.to_vec();
        }
        let norm = (x.iter().map(|a| a * a).sum::<f64>() + 1e-6).sqrt();
        x.iter().map(|a| a / norm).collect()
    };
    for (b, tokens, sequence) in sequences {
        for hv in 0..shape.heads_v {
            let h = hv / group;
            let unit = (sequence * shape.heads_v + hv) * dk * dv;
            let state = &mut final_state.as_mut_slice()[unit..unit + dk * dv];
            for t in tokens.clone() {
                let token = (b * shape.len + t) * shape.heads_v + hv;
                for i in 0..dk {
                    let g = match (&rule.decay, inputs.g) {
                        (RuleDecay::None, _) => 0.0,
                        (RuleDecay::Fixed(per_head), _) => per_head[hv],
                        (RuleDecay::Input, Some(g)) if g.head_dim() == 1 => g.as_slice()[token],
                        (RuleDecay::Input, Some(g)) => g.as_slice()[token * dk + i],
                        (RuleDecay::Input, None) => unreachable!("checked: g is given"),
                    };
                    for j in 0..dv {
                        state[i * dv + j] *= g.exp();
                    }
                }
                let row = |x: &Tensor<f64>, heads: usize, head: usize, d: usize| {
                    let at = ((b * shape.len + t) * heads + head) * d;
                    x.as_slice()[at..at + d].to_vec()
                };
                let q_t = normalised(&row(q, shape.heads, h, dk));
                let k_t = normalised(&row(k, shape.heads, h, dk));
                let v_t = row(v, shape.heads_v, hv, dv);
                let mut added = v_t.clone();
                if let Some(beta) = inputs.beta {
                    let beta = beta.as_slice()[token];
                    for j in 0..dv {
                        let read: f64 = (0..dk).map(|i| state[i * dv + j] * k_t[i]).sum();
                        added[j] = beta * (v_t[j] - read);
                    }
                }
                for i in 0..dk {
                    for j in 0..dv {
                        state[i * dv + j] += k_t[i] * added[j];
                    }
                }
                let o = &mut out.as_mut_slice()[token * dv..(token + 1) * dv];
                for (j, o_j) in o.iter_mut().enumerate() {
                    *o_j = scale * (0..dk).map(|i| state[i * dv + j] * q_t[i]).sum::<f64>();
                }
            }
        }
    }
    Ok(GatedOutput { out, final_state })
}
