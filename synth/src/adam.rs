//! Adam on plain f32 buffers (the optimised tensor is the input batch; the model stays frozen).

use zq_kernels::rng::SplitMix64;
#[derive(Debug, Clone)]
pub struct Adam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    pub fn new(n: usize, lr: f32) -> Adam {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One step: `x -= lr * m_hat / (sqrt(v_hat) + eps)`.
    pub fn step(&mut self, x: &mut [f32], g: &[f32]) {
        assert_eq!(x.len(), g.len());
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for i in 0..x.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = self.m[i] / c1;
            let vh = self.v[i] / c2;
            x[i] -= self.lr * mh / (vh.sqrt() + self.eps);
        }
    }
}

/// ReduceLROnPlateau (mode min): multiply the rate by `factor` after `patience` steps without
/// a relative improvement of 1e-4, down to `min_lr`.
#[derive(Debug, Clone)]
pub struct Plateau {
    pub factor: f32,
    pub patience: usize,
    pub min_lr: f32,
    best: f32,
    bad: usize,
}

impl Plateau {
    pub fn new(patience: usize, min_lr: f32) -> Plateau {
        Plateau {
            factor: 0.1,
            patience,
            min_lr,
            best: f32::INFINITY,
            bad: 0,
        }
    }

    /// Record a loss; returns the new learning rate.
    pub fn observe(&mut self, loss: f32, lr: f32) -> f32 {
        if loss < self.best * (1.0 - 1e-4) {
            self.best = loss;
            self.bad = 0;
            lr
        } else {
            self.bad += 1;
            if self.bad > self.patience {
                self.bad = 0;
                (lr * self.factor).max(self.min_lr)
            } else {
                lr
            }
        }
    }
}

/// SplitMix64 with Box-Muller: seeded normal samples, identical on every machine.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (rng.next_unit(), rng.next_unit());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_minimises_a_quadratic() {
        let mut x = vec![5.0f32, -3.0];
        let mut opt = Adam::new(2, 0.1);
        for _ in 0..500 {
            let g: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
            opt.step(&mut x, &g);
        }
        assert!(x.iter().all(|v| v.abs() < 1e-2), "{x:?}");
    }

    #[test]
    fn plateau_decays() {
        let mut p = Plateau::new(2, 1e-3);
        let mut lr = 1.0;
        for l in [1.0, 0.5, 0.5, 0.5, 0.5] {
            lr = p.observe(l, lr);
        }
        assert!((lr - 0.1).abs() < 1e-7);
    }

    #[test]
    fn normal_is_seeded_and_standard() {
        let a = normal(10000, 1);
        assert_eq!(a, normal(10000, 1));
        assert_ne!(a, normal(10000, 2));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
