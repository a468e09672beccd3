//! `--pareto`: ZeroQ sensitivity of every candidate layer at every candidate width, the exact
//! byte cost of each choice in the output format (measured by serialising), the Pareto frontier
//! and the point chosen under the budgets. The algorithms are zq-quant's; this file feeds them
//! the model and the output format.

use std::collections::HashMap;

use candle_core::Tensor as CTensor;
use zq_quant::pareto::{self, BopsChoice, Choice, Infeasible, Point};
use zq_quant::sensitivity::{sensitivity_table, Candidate};

use super::calibrate::Calibration;
use super::report::{self, ParetoReport};
use super::{end_layers, finalize, plan_node, quantization_plan, ParetoOptions, QuantizeOptions};
use crate::adapters::quant::PlanPerturb;
use crate::error::{Error, Result};
use crate::exec::Plan;
use crate::ir::passes::insert_qdq;
use crate::ir::{Graph, ValueId};
use crate::units::human_bytes;

/// The message for a budget nothing meets, naming the figures that would be feasible.
fn infeasible_message(i: &Infeasible) -> String {
    match *i {
        Infeasible::Bops {
            budget,
            least,
            bits,
        } => format!(
            "--bops-budget {budget} is below the smallest achievable {least} bit-operations per image (every layer at {bits} bits)"
        ),
        Infeasible::Both { bytes } => {
            format!("no assignment meets both --budget {bytes} bytes and --bops-budget")
        }
        Infeasible::Bytes {
            budget,
            smallest,
            bits,
        } => format!(
            "--budget {budget} bytes is below the smallest achievable size, {smallest} bytes ({} with every layer at {bits} bits)",
            human_bytes(smallest)
        ),
    }
}

/// Search per-layer bits for the BN-folded graph `g`, calibrated as `cal`; `x` holds `batch`
/// calibration images for the sensitivity measurement.
#[allow(clippy::too_many_arguments)]
pub fn search(
    g: &Graph,
    x: &[f32],
    batch: usize,
    cal: &Calibration,
    o: &QuantizeOptions,
    p: &ParetoOptions,
    model_name: &str,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<ParetoReport> {
    let t0 = std::time::Instant::now();
    let plan = Plan::new(g, batch)?;
    let cand = candidates(&plan.graph, o)?;
    let names: Vec<String> = cand
        .iter()
        .map(|&(ni, _)| plan.graph.nodes[ni].name.clone())
        .collect();
    let sens = sensitivities(&plan, x, &cand, o, p, progress)?;
    let (base, cost) = sizes(g, cal, o, p, &names, model_name, progress)?;
    let options: Vec<Vec<Choice>> = sens
        .iter()
        .zip(&cost)
        .map(|(row, bytes)| {
            row.iter()
                .zip(bytes)
                .map(|(&(bits, sensitivity), &bytes)| Choice {
                    bits,
                    bytes,
                    sensitivity,
                })
                .collect()
        })
        .collect();
    let front = pareto::frontier(base, &options);
    let uniform: Vec<Point> = p
        .bits
        .iter()
        .enumerate()
        .map(|(k, &b)| Point {
            bytes: base + cost.iter().map(|c| c[k]).sum::<u64>(),
            sensitivity: sens.iter().map(|r| r[k].1).sum(),
            bits: vec![b; cand.len()],
        })
        .collect();
    let macs = layer_macs(&plan.graph, &cand);
    // BOPs count each layer's input at the activation bits it is quantized to.
    let act = super::calibrate::activation_bits(&plan.graph, o);
    let abits: Vec<u8> = cand
        .iter()
        .map(|&(ni, _)| {
            plan.graph.nodes[ni]
                .input(0)
                .and_then(|v| act.get(&v).copied())
                .unwrap_or(8)
        })
        .collect();
    // Joint weight x input-bit choices: each candidate's activation sensitivity at every
    // candidate input width (a --layer-abits pin is that width alone, at no cost).
    let act_sens: Vec<Vec<(u8, f64)>> = if p.abits.is_empty() || p.bops_budget.is_none() {
        Vec::new()
    } else {
        let xt = CTensor::from_slice(x, plan.input_shape(0), plan.device())?;
        let mut model = PlanPerturb::new(&plan, &xt, &cand)?;
        let reference = model.reference()?;
        let classes = reference.len() / plan.input_shape(0)[0].max(1);
        let total = cand.len() * p.abits.len();
        let mut table = Vec::with_capacity(cand.len());
        for (ci, name) in names.iter().enumerate() {
            if let Some(&b) = o.layer_abits.get(name) {
                table.push(vec![(b, 0.0)]);
                continue;
            }
            let mut row = Vec::with_capacity(p.abits.len());
            for (k, &b) in p.abits.iter().enumerate() {
                progress(
                    "measuring activation sensitivity",
                    ci * p.abits.len() + k + 1,
                    total,
                );
                let out = model.with_input_bits(ci, b)?;
                row.push((
                    b,
                    zq_quant::sensitivity::kl_divergence(&reference, &out, classes),
                ));
            }
            table.push(row);
        }
        table
    };
    let (mut chosen, chosen_abits) = choose(&front, base, &options, &macs, &abits, &act_sens, p)?;
    let abits = chosen_abits.unwrap_or(abits);
    let total_bops = |bits: &[u8]| -> u64 {
        bits.iter()
            .zip(&macs)
            .zip(&abits)
            .map(|((&b, &m), &a)| zq_quant::cost::bops(m, b, a))
            .sum()
    };
    // The per-layer deltas are exact but not quite additive (safetensors pads its header to 8
    // bytes): measure the chosen point, and where it does not fit after all, take the least
    // sensitive frontier point that does.
    let measure = |bits: &[u8]| -> Result<u64> {
        let mut one = o.clone();
        for (nm, &b) in names.iter().zip(bits) {
            one.layer_bits.insert(nm.clone(), b);
        }
        let plan = quantization_plan(g, cal, &one);
        bytes_of(g, &plan, &finalize(insert_qdq(g, &plan)?)?, o, model_name)
    };
    let mut actual = measure(&chosen.bits)?;
    if actual > p.budget {
        let fits_bops = |bits: &[u8]| p.bops_budget.is_none_or(|max| total_bops(bits) <= max);
        let mut others: Vec<&Point> = front
            .iter()
            .filter(|q| q.bytes <= p.budget && fits_bops(&q.bits))
            .collect();
        others.sort_by(|a, b| a.sensitivity.total_cmp(&b.sensitivity));
        let mut found = None;
        for q in others {
            let a = measure(&q.bits)?;
            if a <= p.budget {
                found = Some((q.clone(), a));
                break;
            }
        }
        let Some((q, a)) = found else {
            return Err(Error::Infeasible(format!(
                "--budget {} bytes: no frontier point fits once written",
                p.budget
            )));
        };
        chosen = q;
        actual = a;
    }
    chosen.bytes = actual;
    let chosen_bops = total_bops(&chosen.bits);
    Ok(ParetoReport {
        chosen_bops,
        bops_budget: p.bops_budget,
        macs,
        abits,
        act_sensitivity: act_sens,
        budget: p.budget,
        candidate_bits: p.bits.clone(),
        layers: names,
        sensitivity: sens,
        predicted_bytes: chosen.bytes,
        chosen,
        frontier: front,
        uniform,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Candidate layers of the specialised graph: weighted, constant weight, not kept in float, not
/// pinned by `--layer-bits`; (node index, weight value).
fn candidates(pg: &Graph, o: &QuantizeOptions) -> Result<Vec<(usize, ValueId)>> {
    let cand: Vec<(usize, ValueId)> = pg
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op.is_weighted()
                && !o.keep_float.contains(&n.name)
                && !o.layer_bits.contains_key(&n.name)
        })
        .filter_map(|(i, n)| {
            n.input(1)
                .filter(|w| pg.konst(*w).is_some())
                .map(|w| (i, w))
        })
        .collect();
    if cand.is_empty() {
        return Err(Error::Usage(
            "--pareto: no layer left to choose bits for".into(),
        ));
    }
    Ok(cand)
}

/// ZeroQ sensitivity of every candidate at every width: each perturbed run starts at its layer
/// from the cached FP32 activations of the calibration batch.
fn sensitivities(
    plan: &Plan,
    x: &[f32],
    cand: &[(usize, ValueId)],
    o: &QuantizeOptions,
    p: &ParetoOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<Vec<(u8, f64)>>> {
    let pg = &plan.graph;
    let xt = CTensor::from_slice(x, plan.input_shape(0), plan.device())?;
    let mut model = PlanPerturb::new(plan, &xt, cand)?;
    let reference = model.reference()?;
    let classes = reference.len() / plan.input_shape(0)[0].max(1);
    let weights: Vec<Vec<f32>> = cand
        .iter()
        .map(|&(_, w)| pg.konst(w).unwrap().to_f32_vec())
        .collect();
    let layers: Vec<Candidate> = cand
        .iter()
        .zip(&weights)
        .map(|(&(ni, w), wf)| Candidate {
            weight: wf,
            channels: if super::layer_kind(&pg.nodes[ni].op).out_axis_first() && !o.per_tensor {
                pg.konst(w).unwrap().shape[0]
            } else {
                1
            },
        })
        .collect();
    sensitivity_table(
        &mut model,
        &reference,
        classes,
        &layers,
        &p.bits,
        zq_quant::sensitivity::Scheme {
            clip: o.clip,
            int4: o.int4_grid,
        },
        &mut |done, total| progress("measuring sensitivity", done, total),
    )
}

/// The bytes of `qg` (quantized from `g` by `plan`) written in the output format.
fn bytes_of(
    g: &Graph,
    plan: &zq_quant::QuantPlan<ValueId>,
    qg: &Graph,
    o: &QuantizeOptions,
    model_name: &str,
) -> Result<u64> {
    let (layers, _, _) = report::layers(g, plan);
    Ok(report::serialize(qg, o.format, model_name, &layers)?.len() as u64)
}

/// Exact sizes in the output format: serialise once with every candidate at 8 bits, then each
/// choice with only its own layer changed (layers' bytes are independent of each other).
/// Returns the base size and, per candidate and width, the bytes above that layer's cheapest.
#[allow(clippy::too_many_arguments)]
fn sizes(
    g: &Graph,
    cal: &Calibration,
    o: &QuantizeOptions,
    p: &ParetoOptions,
    names: &[String],
    model_name: &str,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(u64, Vec<Vec<u64>>)> {
    let mut all8 = o.clone();
    for nm in names {
        all8.layer_bits.insert(nm.clone(), 8);
    }
    let plan8 = quantization_plan(g, cal, &all8);
    let size_of = |plan: &zq_quant::QuantPlan<ValueId>, qg: &Graph| -> Result<i64> {
        Ok(bytes_of(g, plan, qg, o, model_name)? as i64)
    };
    // The written file also declares its output shapes; the deltas are taken without them.
    let size8 = size_of(&plan8, &finalize(insert_qdq(g, &plan8)?)?)?;
    let raw8 = size_of(&plan8, &insert_qdq(g, &plan8)?)?;
    let ends = end_layers(g);
    let by_name: HashMap<&str, &crate::ir::Node> =
        g.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut delta: Vec<Vec<i64>> = Vec::with_capacity(names.len());
    for (ci, nm) in names.iter().enumerate() {
        let mut row = Vec::with_capacity(p.bits.len());
        for &b in &p.bits {
            if b == 8 {
                row.push(0);
                continue;
            }
            progress(
                "measuring sizes",
                ci * p.bits.len() + 1,
                names.len() * p.bits.len(),
            );
            let mut one = all8.clone();
            one.layer_bits.insert(nm.clone(), b);
            let mut pb = plan8.clone();
            if let Some(l) = by_name
                .get(nm.as_str())
                .and_then(|n| plan_node(g, n, cal, &one, &ends))
            {
                pb.layers.insert(nm.clone(), l);
            }
            row.push(size_of(&pb, &insert_qdq(g, &pb)?)? - raw8);
        }
        delta.push(row);
    }
    let low: Vec<i64> = delta
        .iter()
        .map(|r| r.iter().copied().min().unwrap_or(0))
        .collect();
    let cost = delta
        .iter()
        .zip(&low)
        .map(|(r, &l)| r.iter().map(|&d| (d - l) as u64).collect())
        .collect();
    Ok(((size8 + low.iter().sum::<i64>()) as u64, cost))
}

/// Multiply-accumulates per image of each candidate: output elements x weights per output.
fn layer_macs(pg: &Graph, cand: &[(usize, ValueId)]) -> Vec<u64> {
    cand.iter()
        .map(|&(ni, wv)| {
            let n = &pg.nodes[ni];
            let out = pg.values[n.outputs[0]].shape.clone().unwrap_or_default();
            let per_image: usize = out.iter().skip(1).product();
            let oc = out.get(1).copied().unwrap_or(1);
            zq_quant::cost::macs(per_image, pg.konst(wv).unwrap().len(), oc)
        })
        .collect()
}

/// The least sensitive assignment within the budgets, or why there is none; with `act`
/// (per candidate, (input bits, activation sensitivity)) the input bits are chosen too and
/// returned beside the point.
fn choose(
    front: &[Point],
    base: u64,
    options: &[Vec<Choice>],
    macs: &[u64],
    abits: &[u8],
    act: &[Vec<(u8, f64)>],
    p: &ParetoOptions,
) -> Result<(Point, Option<Vec<u8>>)> {
    // Without input-bit candidates each layer's input keeps its bits, at no sensitivity.
    let fixed: Vec<Vec<(u8, f64)>>;
    let act = if act.is_empty() {
        fixed = abits.iter().map(|&a| vec![(a, 0.0)]).collect();
        &fixed
    } else {
        act
    };
    let chosen = match p.bops_budget {
        None => pareto::pick(front, p.budget).cloned().map(|q| (q, None)),
        Some(max_bops) => {
            // A choice's label is its index in the layer's (weight, input) product.
            let joint: Vec<Vec<(u8, u8)>> = options
                .iter()
                .zip(act)
                .map(|(row, arow)| {
                    row.iter()
                        .flat_map(|c| arow.iter().map(move |&(a, _)| (c.bits, a)))
                        .collect()
                })
                .collect();
            let with_bops: Vec<Vec<BopsChoice>> = options
                .iter()
                .zip(act)
                .enumerate()
                .map(|(ci, (row, arow))| {
                    row.iter()
                        .flat_map(|c| arow.iter().map(move |&(a, s)| (c, a, s)))
                        .enumerate()
                        .map(|(k, (c, a, s))| BopsChoice {
                            bits: k as u8,
                            bytes: c.bytes,
                            bops: zq_quant::cost::bops(macs[ci], c.bits, a),
                            sensitivity: c.sensitivity + s,
                        })
                        .collect()
                })
                .collect();
            let points = pareto::frontier_with_bops(base, &with_bops);
            pareto::pick_with_bops(&points, p.budget, max_bops).map(|q| {
                let pairs: Vec<(u8, u8)> = q
                    .bits
                    .iter()
                    .enumerate()
                    .map(|(ci, &k)| joint[ci][k as usize])
                    .collect();
                (
                    Point {
                        bytes: q.bytes,
                        sensitivity: q.sensitivity,
                        bits: pairs.iter().map(|&(w, _)| w).collect(),
                    },
                    Some(pairs.iter().map(|&(_, a)| a).collect()),
                )
            })
        }
    };
    chosen.ok_or_else(|| {
        let fewest_bits = p.bits.iter().min().copied().unwrap_or(0);
        let smallest = front.first().map_or(0, |f| f.bytes);
        let least_bops = (0..options.len())
            .map(|ci| {
                let a = act[ci].iter().map(|&(a, _)| a).min().unwrap_or(abits[ci]);
                zq_quant::cost::bops(macs[ci], fewest_bits, a)
            })
            .sum();
        Error::Infeasible(infeasible_message(&pareto::diagnose(
            p.budget,
            p.bops_budget,
            smallest,
            least_bops,
            fewest_bits,
        )))
    })
}
